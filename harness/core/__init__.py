"""The ground floor: what every stage and every method builds on.

Owns the batch and vocabulary types, the noise schedules, categorical sampling, attention, the
shared transformer backbone, the Method interface and its registry (with the shipped-method list
read from pyproject without torch), the metric registry (what the workflow, the evaluate CLI and
the study loader know of each evaluation), the NLL-bound aggregation every method's perplexity goes
through, and the utilities every job uses: config loading and validation (the study plan: run
names, runs, FLOPs-matching targets), typed settings per config section (`settings.py`), atomic writes, the result-file schema, errors, the device
and progress bars.

May import: nothing else of the project. `did/` and `baselines/` import only this package.
"""
