"""One training run per (method, layout, seed): checkpoint.pt, history.csv, train.json.

`exec` hands the job's process to the trainer, so a SLURM signal (SIGTERM before the time
limit, or on preemption) reaches it without a shell in between that would die first; the
trainer then checkpoints and exits with a retryable status, and the retry resumes
(resume/state.pt is not an output, so Snakemake never deletes it).
GPUs: config resources.gpus_per_train (default 1, 0 = CPU only; see common.smk:job_resources);
with more than 1 the launcher is `torchrun --standalone` (see common.smk:launcher).
"""


rule train:
    input:
        data=DATA_MARKER,
    output:
        checkpoint=f"{RUNS_DIR}/{{run}}/checkpoint.pt",
        history=f"{RUNS_DIR}/{{run}}/history.csv",
        summary=f"{RUNS_DIR}/{{run}}/train.json",
    params:
        cfg=study_config,
        launcher=launcher,
        method=run_label,
        layout=run_layout,
        seed=run_seed,
        steps=steps_option,
        data=input_data_dir,
        out=train_run_dir,
        settings=train_settings,
    log:
        f"{LOGS}/train/{{run}}.log",
    benchmark:
        f"{BENCH}/train/{{run}}.tsv"
    threads: 1
    resources:
        **TRAIN_RESOURCES,
    conda:
        CONDA_ENV
    shell:
        "exec {params.launcher} -m harness train --config {params.cfg:q}"
        " --method {params.method:q} --layout {params.layout:q} --seed {params.seed:q}"
        " {params.steps} --data {params.data:q} --out {params.out:q} --quiet"
        " > {log:q} 2>&1"
