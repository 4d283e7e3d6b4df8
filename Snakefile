"""didbench: train and evaluate DID, MDLM, RADD, ILM and AR on one study config.

    snakemake --cores 2                                     # the tiny CPU study (config/default.yaml)
    snakemake --cores 2 --configfile config/owt-small.yaml  # another study (replaces default.yaml)
    snakemake --cores 8 --profile slurm                     # on a SLURM cluster (slurm/config.yaml)
    snakemake --cores 8 --profile slurm --profile slurm-cpu # SLURM without GPU requests
    snakemake --report report.html                          # the results page: figures and tables, captioned

The study config is validated against workflow/schemas/config.schema.yaml before any job runs;
a mistake stops here with one line. Every job is a `python -m harness ...` command (run with
the `python` on PATH); outputs go to results/<study>/ (see docs/architecture.md), the evaluator
LM cache to resources/evaluators/ (or $DIDBENCH_EVALUATORS).
"""

import os


# --configfile replaces the default study instead of being merged into it (common.smk)
if not workflow.overwrite_configfiles:

    configfile: os.path.join(workflow.basedir, "config", "default.yaml")


report: "workflow/report/workflow.rst"   # `snakemake --report report.html`: the results page


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        report_outputs(),
        MLFLOW_MARKER,
        # every result the report and MLflow summarise is a target too, so a deleted one is rebuilt
        # (Snakemake does not re-create a missing input of a job whose outputs are up to date)
        study_results(),
