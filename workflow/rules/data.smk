"""Corpus -> tokenizer -> {train,valid,test}.{fixed,varlen}.pt + tokenizer/ + manifest.json.

manifest.json is written last by `harness prepare`, so it marks a complete data directory.

Both rules download (the corpus, the evaluator LM) where their caches are empty, so they are
localrules: on a cluster they run on the submitting (login) node, which has the network that
compute nodes often lack; every other job only reads their files.
"""


localrules:
    prepare_data,
    evaluator_cache,


rule prepare_data:
    output:
        marker=DATA_MARKER,
    params:
        cfg=study_config,
        out=marker_dir,
        settings=settings_hash("data"),
    log:
        f"{LOGS}/prepare_data.log",
    benchmark:
        f"{BENCH}/prepare_data.tsv"
    threads: 1
    resources:
        **CPU_RESOURCES,
    conda:
        CONDA_ENV
    shell:
        "python -m harness prepare --config {params.cfg:q} --out {params.out:q} > {log:q} 2>&1"


# The evaluator LM (gen PPL, MAUVE features), cached once as a plain HF folder whose marker
# file is written last. Shared by all studies (DIDBENCH_EVALUATORS moves it).
rule evaluator_cache:
    output:
        marker=f"{EVALUATORS}/{{name}}/didbench_evaluator.json",
    params:
        cfg=study_config,
        out=marker_dir,
    log:
        f"{LOGS}/evaluator_cache/{{name}}.log",
    benchmark:
        f"{BENCH}/evaluator_cache/{{name}}.tsv"
    threads: 1
    resources:
        **CPU_RESOURCES,
    conda:
        CONDA_ENV
    shell:
        "python -m harness evaluate evaluator --name {wildcards.name:q} --out {params.out:q} > {log:q} 2>&1"
