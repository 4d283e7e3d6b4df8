"""Study-level aggregation, run on the submitting machine (localrules): tables and figures from
every result file (`harness report` checks each against its schema first, then runs `python -m
analysis`), then one MLflow experiment for the study (a single writer, so cluster jobs
never contend for the tracking database; `harness log` is idempotent)."""


localrules:
    report,
    mlflow_log,


rule report:
    input:
        results=study_results(),
    output:
        tables=directory(f"{RESULTS}/tables"),
        figures=directory(f"{RESULTS}/figures"),
    params:
        cfg=study_config,
        study=report_study_dir,
        settings=config_hash(CFG),
    log:
        f"{LOGS}/report.log",
    benchmark:
        f"{BENCH}/report.tsv"
    conda:
        CONDA_ENV
    shell:
        "python -m harness report --config {params.cfg:q} --study-dir {params.study:q} > {log:q} 2>&1"


rule mlflow_log:
    input:
        results=study_results(),
        tables=f"{RESULTS}/tables",
        figures=f"{RESULTS}/figures",
    output:
        marker=MLFLOW_MARKER,
    params:
        cfg=study_config,
        study=marker_dir,
        settings=config_hash(CFG),
    log:
        f"{LOGS}/mlflow_log.log",
    benchmark:
        f"{BENCH}/mlflow_log.tsv"
    conda:
        CONDA_ENV
    shell:
        "python -m harness log --config {params.cfg:q} --study-dir {params.study:q}"
        " --marker {output.marker:q} > {log:q} 2>&1"
