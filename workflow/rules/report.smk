"""Study-level aggregation, run on the submitting machine (localrules): tables and figures from
every result file (`harness report` checks each against its schema first, then runs `python -m
analysis` and `python -m analysis paper`), all marked with report() for `snakemake --report`
(captions: workflow/report/), then one MLflow experiment for the study (a single writer, so cluster jobs
never contend for the tracking database; `harness log` is idempotent)."""


localrules:
    report,
    mlflow_log,


rule report:
    input:
        results=study_results(),
    output:
        # report(): `snakemake --report report.html` shows every table and figure with its caption
        # the tables as HTML (each with its CSV inside as a download), only those with rows
        tables=report(directory(f"{RESULTS}/tables"), patterns=["{name}.html"], caption="../report/table.rst",
                      category="Tables", labels={"table": "{name}"}),
        figures=report(directory(f"{RESULTS}/figures"), patterns=["{name}.png"], caption="../report/figure.rst",
                       category="Figures", labels={"figure": "{name}"}),
        paper=report(directory(f"{RESULTS}/paper"), patterns=["{name}.csv", "{name}.png"], caption="../report/paper.rst",
                     category="The paper's layout", labels={"table": "{name}"}),
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
        paper=f"{RESULTS}/paper",
    output:
        marker=MLFLOW_MARKER,
    params:
        cfg=study_config,
        study=marker_dir,
        settings=config_hash(CFG),
        checkpoints="yes" if TRACKING["log_checkpoints"] else "no",
    log:
        f"{LOGS}/mlflow_log.log",
    benchmark:
        f"{BENCH}/mlflow_log.tsv"
    conda:
        CONDA_ENV
    shell:
        "python -m harness log --config {params.cfg:q} --study-dir {params.study:q}"
        " --marker {output.marker:q} --checkpoints {params.checkpoints:q} > {log:q} 2>&1"
