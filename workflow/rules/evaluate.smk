"""Evaluation: `python -m harness evaluate <what> ...`, one result JSON per (run, what).

samples -> RUN/eval/samples.json + samples.jsonl (every step count of evaluate.samples.steps)
           + references.jsonl (held-out texts through the same decode path: the "data" row of
           genppl, the human side of MAUVE, the reference lengths)
genppl  -> RUN/eval/genppl.json + features.npz (evaluator features of both, read by mauve)
mauve, diversity, lengths (varlen runs only) -> from those; ppl, speed -> from the checkpoint
exact   -> RUN/eval/exact.json: synthetic corpora only, from ppl + samples + the source's exact law
cost    -> results/<study>/cost/<layout>.json: one study-level job per layout, after every run of
           the layout is trained (see rule cost)
zeroshot -> RUN/eval/zeroshot.json (fixed-length runs, when evaluate.zeroshot.datasets names a set):
           both bounds on the DID paper's Table 1 test sets, read from results/<study>/zeroshot/
           sets.pt, which one local job per study prepares (it may download: see zeroshot_data)
<plugin> -> RUN/eval/<plugin>.json: a metric of the `didbench.metrics` entry points, planned from its
           declaration alone (rules eval_registered / eval_registered_cpu, at the end)
"""

#: the zero-shot test sets of the study, tokenised and chunked (harness.data.zeroshot), and their summary
ZEROSHOT_SETS = f"{RESULTS}/zeroshot/sets.pt"


localrules:
    zeroshot_data,


rule eval_ppl:
    input:
        data=DATA_MARKER,
        checkpoint=f"{RUNS_DIR}/{{run}}/checkpoint.pt",
    output:
        result=f"{RUNS_DIR}/{{run}}/eval/ppl.json",
    params:
        cfg=study_config,
        run=eval_run_dir,
        data=input_data_dir,
        settings=settings_hash("evaluate.ppl"),
    log:
        f"{LOGS}/eval_ppl/{{run}}.log",
    benchmark:
        f"{BENCH}/eval_ppl/{{run}}.tsv"
    threads: 1
    resources:
        **GPU_EVAL_RESOURCES,
    conda:
        CONDA_ENV
    shell:
        "python -m harness evaluate ppl --config {params.cfg:q} --run {params.run:q} --data {params.data:q}"
        " --out {output.result:q} > {log:q} 2>&1"


rule eval_samples:
    input:
        data=DATA_MARKER,
        checkpoint=f"{RUNS_DIR}/{{run}}/checkpoint.pt",
    output:
        result=f"{RUNS_DIR}/{{run}}/eval/samples.json",
        samples=f"{RUNS_DIR}/{{run}}/eval/samples.jsonl",
        references=f"{RUNS_DIR}/{{run}}/eval/references.jsonl",
    params:
        cfg=study_config,
        run=eval_run_dir,
        data=input_data_dir,
        settings=settings_hash("evaluate.samples", "evaluate.references", "evaluate.mauve.human_samples",
                               "evaluate.mauve.subsets"),
    log:
        f"{LOGS}/eval_samples/{{run}}.log",
    benchmark:
        f"{BENCH}/eval_samples/{{run}}.tsv"
    threads: 1
    resources:
        **GPU_EVAL_RESOURCES,
    conda:
        CONDA_ENV
    shell:
        "python -m harness evaluate samples --config {params.cfg:q} --run {params.run:q} --data {params.data:q}"
        " --out {output.result:q} --jsonl {output.samples:q} --references {output.references:q} > {log:q} 2>&1"


rule eval_genppl:
    input:
        samples=f"{RUNS_DIR}/{{run}}/eval/samples.json",
        samples_jsonl=f"{RUNS_DIR}/{{run}}/eval/samples.jsonl",
        references=f"{RUNS_DIR}/{{run}}/eval/references.jsonl",
        evaluator=f"{EVALUATORS}/{EVALUATOR}/didbench_evaluator.json",
    output:
        result=f"{RUNS_DIR}/{{run}}/eval/genppl.json",
        features=f"{RUNS_DIR}/{{run}}/eval/features.npz",
    params:
        cfg=study_config,
        evaluator=input_evaluator_dir,
        settings=settings_hash("evaluate.genppl"),
    log:
        f"{LOGS}/eval_genppl/{{run}}.log",
    benchmark:
        f"{BENCH}/eval_genppl/{{run}}.tsv"
    threads: 1
    resources:
        **GPU_EVAL_RESOURCES,
    conda:
        CONDA_ENV
    shell:
        "python -m harness evaluate genppl --config {params.cfg:q} --samples {input.samples:q}"
        " --references {input.references:q} --evaluator-dir {params.evaluator:q}"
        " --out {output.result:q} --features {output.features:q} > {log:q} 2>&1"


rule eval_mauve:
    input:
        samples=f"{RUNS_DIR}/{{run}}/eval/samples.json",
        features=f"{RUNS_DIR}/{{run}}/eval/features.npz",
    output:
        result=f"{RUNS_DIR}/{{run}}/eval/mauve.json",
    params:
        cfg=study_config,
        settings=settings_hash("evaluate.mauve"),
    log:
        f"{LOGS}/eval_mauve/{{run}}.log",
    benchmark:
        f"{BENCH}/eval_mauve/{{run}}.tsv"
    threads: 1
    resources:
        **CPU_RESOURCES,
    conda:
        CONDA_ENV
    shell:
        "python -m harness evaluate mauve --config {params.cfg:q} --samples {input.samples:q}"
        " --features {input.features:q} --out {output.result:q} > {log:q} 2>&1"


rule eval_diversity:
    input:
        samples=f"{RUNS_DIR}/{{run}}/eval/samples.json",
        samples_jsonl=f"{RUNS_DIR}/{{run}}/eval/samples.jsonl",
        references=f"{RUNS_DIR}/{{run}}/eval/references.jsonl",
    output:
        result=f"{RUNS_DIR}/{{run}}/eval/diversity.json",
    params:
        cfg=study_config,
        settings=settings_hash("evaluate.diversity"),
    log:
        f"{LOGS}/eval_diversity/{{run}}.log",
    benchmark:
        f"{BENCH}/eval_diversity/{{run}}.tsv"
    threads: 1
    resources:
        **CPU_RESOURCES,
    conda:
        CONDA_ENV
    shell:
        "python -m harness evaluate diversity --config {params.cfg:q} --samples {input.samples:q}"
        " --references {input.references:q} --out {output.result:q} > {log:q} 2>&1"


rule eval_lengths:
    input:
        samples=f"{RUNS_DIR}/{{run}}/eval/samples.json",
        samples_jsonl=f"{RUNS_DIR}/{{run}}/eval/samples.jsonl",
        references=f"{RUNS_DIR}/{{run}}/eval/references.jsonl",
    output:
        result=f"{RUNS_DIR}/{{run}}/eval/lengths.json",
    params:
        cfg=study_config,
        settings=settings_hash("evaluate.lengths"),
    log:
        f"{LOGS}/eval_lengths/{{run}}.log",
    benchmark:
        f"{BENCH}/eval_lengths/{{run}}.tsv"
    threads: 1
    resources:
        **CPU_RESOURCES,
    conda:
        CONDA_ENV
    shell:
        "python -m harness evaluate lengths --config {params.cfg:q} --samples {input.samples:q}"
        " --references {input.references:q} --out {output.result:q} > {log:q} 2>&1"


rule eval_exact:
    input:
        data=DATA_MARKER,
        ppl=f"{RUNS_DIR}/{{run}}/eval/ppl.json",
        samples=f"{RUNS_DIR}/{{run}}/eval/samples.json",
        samples_jsonl=f"{RUNS_DIR}/{{run}}/eval/samples.jsonl",
        references=f"{RUNS_DIR}/{{run}}/eval/references.jsonl",
    output:
        result=f"{RUNS_DIR}/{{run}}/eval/exact.json",
    params:
        cfg=study_config,
        data=input_data_dir,
        settings=settings_hash("train.valid_sequences", "evaluate.samples.seed"),
    log:
        f"{LOGS}/eval_exact/{{run}}.log",
    benchmark:
        f"{BENCH}/eval_exact/{{run}}.tsv"
    threads: 1
    resources:
        **CPU_RESOURCES,
    conda:
        CONDA_ENV
    shell:
        "python -m harness evaluate exact --config {params.cfg:q} --data {params.data:q} --ppl {input.ppl:q}"
        " --samples {input.samples:q} --references {input.references:q} --out {output.result:q} > {log:q} 2>&1"


rule eval_speed:
    input:
        data=DATA_MARKER,
        checkpoint=f"{RUNS_DIR}/{{run}}/checkpoint.pt",
    output:
        result=f"{RUNS_DIR}/{{run}}/eval/speed.json",
    params:
        cfg=study_config,
        run=eval_run_dir,
        data=input_data_dir,
        settings=settings_hash("evaluate.speed", "evaluate.samples.steps"),
    log:
        f"{LOGS}/eval_speed/{{run}}.log",
    benchmark:
        f"{BENCH}/eval_speed/{{run}}.tsv"
    threads: 1
    resources:
        **GPU_EVAL_RESOURCES,
    conda:
        CONDA_ENV
    shell:
        "python -m harness evaluate speed --config {params.cfg:q} --run {params.run:q} --data {params.data:q}"
        " --out {output.result:q} > {log:q} 2>&1"


# The study's cost measurement (harness/metrics/cost.py): every method of one layout timed in ONE
# process, interleaved per repeat, reseeded identically every repeat. `threads: workflow.cores`
# claims every core Snakemake may use, so the local scheduler starts nothing beside it (and
# Snakemake sets OMP_NUM_THREADS, hence torch's threads, to the same number). On SLURM it is one
# sbatch job with --cpus-per-task = --cores; give it its own node/GPU with the profile
# (set-resources cost: slurm_extra "'--exclusive'"; its GPU: config resources.gpus_per_eval), since other jobs of the workflow
# may otherwise share the node.
rule cost:
    input:
        data=DATA_MARKER,
        checkpoints=layout_checkpoints,
    output:
        result=f"{COST_DIR}/{{layout}}.json",
    params:
        cfg=study_config,
        study=cost_study_dir,
        settings=settings_hash("evaluate.cost", "evaluate.samples.steps", "evaluate.samples.top_p", "train"),
    log:
        f"{LOGS}/cost/{{layout}}.log",
    benchmark:
        f"{BENCH}/cost/{{layout}}.tsv"
    threads: workflow.cores
    resources:
        **GPU_EVAL_RESOURCES,
    conda:
        CONDA_ENV
    shell:
        "python -m harness cost --config {params.cfg:q} --study-dir {params.study:q} --layout {wildcards.layout:q}"
        " --threads {threads} --out {output.result:q} > {log:q} 2>&1"


# The zero-shot test sets (evaluate.zeroshot.datasets), prepared once per study: each set read
# from its local file (evaluate.zeroshot.files) or the Hugging Face hub, detokenised, tokenised
# with the study's tokenizer and chunked like the study's fixed rows. A local rule, like
# prepare_data: it may download, and on a cluster it runs on the submitting node. A set that
# cannot be loaded is one line in the log and in sets.json's `missing` (evaluate.zeroshot.required:
# a failed job instead).
rule zeroshot_data:
    input:
        data=DATA_MARKER,
    output:
        sets=ZEROSHOT_SETS,
        summary=ZEROSHOT_SETS.removesuffix(".pt") + ".json",
    params:
        cfg=study_config,
        data=input_data_dir,
        settings=settings_hash("evaluate.zeroshot.datasets", "evaluate.zeroshot.files", "evaluate.zeroshot.hub",
                               "evaluate.zeroshot.required"),
    log:
        f"{LOGS}/zeroshot_data.log",
    benchmark:
        f"{BENCH}/zeroshot_data.tsv"
    threads: 1
    resources:
        **CPU_RESOURCES,
    conda:
        CONDA_ENV
    shell:
        "python -m harness evaluate zeroshot-data --config {params.cfg:q} --data {params.data:q}"
        " --out {output.sets:q} > {log:q} 2>&1"


rule eval_zeroshot:
    input:
        data=DATA_MARKER,
        checkpoint=f"{RUNS_DIR}/{{run}}/checkpoint.pt",
        sets=ZEROSHOT_SETS,
    output:
        result=f"{RUNS_DIR}/{{run}}/eval/zeroshot.json",
    params:
        cfg=study_config,
        run=eval_run_dir,
        data=input_data_dir,
        settings=settings_hash("evaluate.zeroshot"),
    log:
        f"{LOGS}/eval_zeroshot/{{run}}.log",
    benchmark:
        f"{BENCH}/eval_zeroshot/{{run}}.tsv"
    threads: 1
    resources:
        **GPU_EVAL_RESOURCES,
    conda:
        CONDA_ENV
    shell:
        "python -m harness evaluate zeroshot --config {params.cfg:q} --run {params.run:q} --data {params.data:q}"
        " --sets {input.sets:q} --out {output.result:q} > {log:q} 2>&1"


# Plugin metrics (the `didbench.metrics` entry points, harness.core.metric_registry): one generic
# job per (run, metric), from the metric's declaration alone. Its inputs are the prepared data,
# the run's checkpoint when it reads one (needs_run), and the files of the metrics it needs
# (needs): common.smk's registered_inputs; its settings param hashes evaluate.<name>. Two rules,
# so a metric that reads a checkpoint asks for the evaluation GPU and the others run as CPU jobs.
for _rule, _resources, _metrics in (
    ("eval_registered", GPU_EVAL_RESOURCES, [m.name for m in metric_registry.plugin_metrics() if m.needs_run]),
    ("eval_registered_cpu", CPU_RESOURCES, [m.name for m in metric_registry.plugin_metrics() if not m.needs_run]),
):
    if not _metrics:
        continue

    rule:
        name:
            _rule
        input:
            unpack(registered_inputs),
        output:
            result=f"{RUNS_DIR}/{{run}}/eval/{{metric}}.json",
        wildcard_constraints:
            metric="|".join(re.escape(m) for m in _metrics),
        params:
            cfg=study_config,
            run=eval_run_dir,
            data=input_data_dir,
            settings=registered_settings,
        log:
            f"{LOGS}/eval_{{metric}}/{{run}}.log",
        benchmark:
            f"{BENCH}/eval_{{metric}}/{{run}}.tsv"
        threads: 1
        resources:
            **_resources,
        conda:
            CONDA_ENV
        shell:
            "python -m harness evaluate {wildcards.metric:q} --config {params.cfg:q} --run {params.run:q}"
            " --data {params.data:q} --out {output.result:q} > {log:q} 2>&1"
