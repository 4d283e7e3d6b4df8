"""Results of a whole study: read back, checked, and logged.

Owns the study loader (`study`: every run's result files into tables of rows) and MLflow, in
batch (`tracking`, `python -m harness log`) and live while a run trains (`live`).

May import: harness.core (and the result-file schema there); never a stage that computes.
"""
