"""Fault injection: each test breaks one thing and checks the promise that covers it.

1. Preemption and crashes: SIGTERM/SIGUSR1 checkpoint and exit 75, SIGKILL at random moments,
   a crash inside torch.save; every re-run resumes to bitwise the weights of an uninterrupted
   run (CPU). The SLURM profile and the Snakemake DAG survive a killed training job.
2. Bad input: one line `error: ...` on stderr, exit status 2, no traceback, and nothing written
   that a later step would take for a valid output.
3. Results are never lost half-written, nor duplicated in MLflow under concurrency.
4. Determinism: same config and seed, same numbers; every result names what reproduces it.

Real `python -m harness` subprocesses wherever the promise is about the command line. Models are
the tiny AR baseline on the toy corpus of conftest.py, so the file runs in a few minutes on 2
cores: `pytest -m faults tests/test_faults.py`.
"""
from __future__ import annotations

import copy
import csv
import json
import multiprocessing
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from harness.run.loop import EXIT_PREEMPTED, NonFiniteLoss, STATE_FILE, train
from harness.run.recipe import load_checkpoint

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parent.parent
STEPS = 48  # CLI training runs in this file: long enough to be interrupted mid-run, ~2 s of steps


# ============================================================================ helpers
def _env(**extra) -> dict:
    """One thread, no progress bars (stderr must be the error line alone), never a hub."""
    env = dict(os.environ)
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.update(extra)
    return env


def _cmd(args, prelude: str | None = None) -> list[str]:
    """`python -m harness ARGS`, or the same CLI entry point after fault-injecting `prelude` code."""
    args = [str(a) for a in args]
    if prelude is None:
        return [sys.executable, "-m", "harness", *args]
    code = textwrap.dedent(prelude) + "\nimport sys\nfrom harness.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return [sys.executable, "-c", code, *args]


def cli(*args, prelude=None, env=None, preexec_fn=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(args, prelude), cwd=REPO, env=env or _env(), capture_output=True, text=True,
                          timeout=timeout, preexec_fn=preexec_fn)


def one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit status 2 and stderr = exactly one line `error: ...` holding every needle."""
    out = f"rc={proc.returncode}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.returncode == 2, out
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    assert "Traceback" not in proc.stderr + proc.stdout, out
    for needle in needles:
        assert needle in lines[0], out
    return lines[0]


def write_config(path: Path, base: dict, **dotted) -> Path:
    """`base` with overrides (`train__lr=-1` sets train.lr) as a YAML file."""
    cfg = copy.deepcopy(base)
    for key, value in dotted.items():
        *parents, leaf = key.split("__")
        node = cfg
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def train_args(cfg: Path, data: Path, out: Path, method="ar", layout="fixed", seed=0) -> list:
    return ["train", "--config", cfg, "--method", method, "--layout", layout, "--seed", seed,
            "--data", data, "--out", out, "--quiet"]


def saved_step(run: Path) -> int:
    state = run / STATE_FILE
    return load_checkpoint(str(state))["step"] if state.exists() else 0


def history_step(run: Path) -> int:
    """Last step in history.csv (rewritten atomically at every checkpoint), 0 if none yet."""
    try:
        lines = (run / "history.csv").read_text().strip().splitlines()
    except FileNotFoundError:
        return 0
    return int(lines[-1].split(",")[0]) if len(lines) > 1 else 0


def wait_until(condition, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"process ended (rc={proc.returncode}) before the fault could be injected: "
                                 f"{proc.stderr.read()[-2000:] if proc.stderr else ''}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError("timed out waiting for the training loop")
        time.sleep(0.01)


def assert_same_weights(run: Path, reference: Path) -> None:
    """Raw and EMA weights of the final checkpoints are bitwise equal."""
    a, b = load_checkpoint(str(run / "checkpoint.pt")), load_checkpoint(str(reference / "checkpoint.pt"))
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs from the uninterrupted run"


def losses(run: Path) -> list[str]:
    return [row.split(",")[1] for row in (run / "history.csv").read_text().splitlines()]


def temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*") if ".tmp" in p.name)


# ============================================================================ fixtures
@pytest.fixture(scope="module")
def cfg_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("configs")


@pytest.fixture(scope="module")
def train_cfg(toy_config, cfg_dir) -> Path:
    """The toy study with dropout (so resuming must also restore the random streams)."""
    return write_config(cfg_dir / "train.yaml", toy_config, train__steps=STEPS, train__checkpoint_every=4,
                        train__log_every=1, train__warmup=4, train__dropout=0.1,
                        evaluate={"ppl": {"mc": 2, "max_sequences": 16, "batch_size": 8},
                                  "samples": {"n": 2, "steps": [2], "batch_size": 2}, "references": {"n": 4},
                                  "genppl": {"evaluator": "gpt2-large"}, "mauve": {"human_samples": 2}})


@pytest.fixture(scope="module")
def reference(train_cfg, toy_data, tmp_path_factory) -> Path:
    """An uninterrupted CLI training run: what every interrupted run must end up equal to."""
    out = tmp_path_factory.mktemp("reference") / "run"
    proc = cli(*train_args(train_cfg, toy_data, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def reference_state(train_cfg, toy_data, tmp_path_factory) -> Path:
    """The resume state of the reference run cut off at its first checkpoint (a finished training
    removes its state: the run is final)."""
    from harness.core.config import load_config
    from harness.run.loop import Preempted

    out = tmp_path_factory.mktemp("reference_state") / "run"
    with pytest.raises(Preempted):
        train(load_config(train_cfg), "ar", "fixed", 0, str(toy_data), str(out), progress=False, stop_after=5)
    return out / STATE_FILE


@pytest.fixture(scope="module")
def other_vocab_data(toy_config, tmp_path_factory) -> Path:
    """The toy corpus prepared with another vocabulary size."""
    from harness.data.prepare import prepare

    out = tmp_path_factory.mktemp("other_vocab")
    prepare({**toy_config["data"], "tokenizer": {"kind": "bpe", "vocab_size": 280}}, out)
    return out


def _small_cfg(toy_config, **train):
    cfg = json.loads(json.dumps(toy_config))
    cfg["train"].update(train)
    return cfg


# ============================================================================ 1. preemption and resume
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_warning_signal_checkpoints_exits_75_and_resume_is_exact(sig, train_cfg, toy_data, reference, tmp_path):
    """SLURM's warning signal mid-run makes `train` save a checkpoint and exit 75 (retry me);
    running the same command again resumes and ends with bitwise the uninterrupted weights."""
    out = tmp_path / "run"
    proc = subprocess.Popen(_cmd(train_args(train_cfg, toy_data, out)), cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: (out / STATE_FILE).exists(), proc)  # first checkpoint: the loop is running
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, stderr[-3000:]
    assert f"received {sig.name}" in stderr and "Traceback" not in stderr
    step = saved_step(out)
    assert 4 <= step < STEPS, f"checkpoint at step {step}: the signal did not land mid-run"
    assert not (out / "checkpoint.pt").exists() and not (out / "train.json").exists()

    again = cli(*train_args(train_cfg, toy_data, out))
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_weights(out, reference)
    assert losses(out) == losses(reference)


def test_sigkill_at_random_moments_then_resume_is_exact(train_cfg, toy_data, reference, tmp_path):
    """SIGKILL (no chance to save) twice at random moments, possibly inside a checkpoint write:
    each re-run resumes from the last complete checkpoint, the end result is bitwise the same."""
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    out = tmp_path / "run"
    for _ in range(2):
        target = rng.randrange(saved_step(out) + 1, saved_step(out) + 9)
        proc = subprocess.Popen(_cmd(train_args(train_cfg, toy_data, out)), cwd=REPO, env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_until(lambda: history_step(out) >= target, proc)
        time.sleep(rng.uniform(0.0, 0.15))  # somewhere in the next few steps or checkpoint writes
        proc.kill()
        proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL, f"seed {seed}: the run ended before it was killed"
        assert target <= saved_step(out) < STEPS, f"seed {seed}"  # a loadable checkpoint, mid-run
    again = cli(*train_args(train_cfg, toy_data, out))
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_weights(out, reference)
    assert losses(out) == losses(reference)


def test_crash_inside_torch_save_keeps_the_previous_checkpoint(toy_config, toy_data, tmp_path, monkeypatch):
    """torch.save dies after writing half a checkpoint: the previous state.pt is intact and
    loadable, no temp file is left behind, and the re-run ends like an uninterrupted run."""
    cfg = _small_cfg(toy_config, steps=6, checkpoint_every=2, dropout=0.1)
    train(cfg, "ar", "fixed", 0, str(toy_data), str(tmp_path / "clean"), progress=False)
    real_save, calls = torch.save, []

    def crashing_save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the step-4 state: half of it reaches the disk, then the process "dies"
            import io

            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            raise RuntimeError("simulated crash inside torch.save")
        return real_save(obj, f, *args, **kwargs)

    out = tmp_path / "run"
    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, "ar", "fixed", 0, str(toy_data), str(out), progress=False)
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(str(out / STATE_FILE))["step"] == 2
    assert temp_files(out) == []
    train(cfg, "ar", "fixed", 0, str(toy_data), str(out), progress=False)
    assert_same_weights(out, tmp_path / "clean")


def test_edited_config_never_resumes_a_stale_state(toy_config, toy_data, tmp_path):
    """Snakemake re-runs `train` when the config changes but keeps resume/state.pt: the new
    recipe must be trained from scratch, not finished off from the old recipe's state."""
    from harness.run.loop import Preempted

    out = tmp_path / "run"
    with pytest.raises(Preempted):   # killed after its step-2 checkpoint: the state stays
        train(_small_cfg(toy_config, steps=6, lr=1e-3), "ar", "fixed", 0, str(toy_data), str(out), progress=False,
              stop_after=3)
    edited = _small_cfg(toy_config, steps=6, lr=3e-3)
    train(edited, "ar", "fixed", 0, str(toy_data), str(out), progress=False)
    train(edited, "ar", "fixed", 0, str(toy_data), str(tmp_path / "fresh"), progress=False)
    assert_same_weights(out, tmp_path / "fresh")
    assert not (out / STATE_FILE).exists()    # a finished run keeps no resume state
    # cadence settings are not part of the recipe: changing them still resumes
    again = tmp_path / "again"
    with pytest.raises(Preempted):
        train(edited, "ar", "fixed", 0, str(toy_data), str(again), progress=False, stop_after=3)
    state = load_checkpoint(str(again / STATE_FILE))
    summary = train(_small_cfg(toy_config, steps=6, lr=3e-3, log_every=3), "ar", "fixed", 0, str(toy_data),
                    str(again), progress=False)
    assert summary["recipe"] == state["info"]["recipe"]
    assert_same_weights(again, tmp_path / "fresh")


# ============================================================================ 2. bad input: one clear line
def test_unknown_method(train_cfg, toy_data, tmp_path):
    """A method name that is not registered: one line naming it and the known ones."""
    proc = cli(*train_args(train_cfg, toy_data, tmp_path / "run", method="nope"))
    one_error_line(proc, "unknown method 'nope'", "ar")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("change, needle", [
    ({"size": "huge"}, "size: 'huge' is not one of"),
    ({"train__lr": -1}, "train.lr: -1"),
    ({"train__lrr": 1e-3}, "train.lrr: unknown key"),
], ids=["unknown-size", "negative-lr", "unknown-key"])
def test_bad_config(change, needle, toy_config, toy_data, tmp_path):
    """An unknown size, a bad value or a typo in a key stops `train` before anything runs."""
    cfg = write_config(tmp_path / "bad.yaml", toy_config, **change)
    proc = cli(*train_args(cfg, toy_data, tmp_path / "run"))
    one_error_line(proc, "bad.yaml", needle)
    assert not (tmp_path / "run").exists()


def _corpus_dir(root: Path, docs_per_file: list[list[str]]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, docs in enumerate(docs_per_file):
        (root / f"f{i}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    return root


def _prepare_with_corpus(toy_config, tmp_path, corpus: dict, env=None):
    cfg = write_config(tmp_path / "data.yaml", toy_config, data__corpus=corpus)
    return cli("prepare", "--config", cfg, "--out", tmp_path / "data", env=env)


def test_missing_corpus_files(toy_config, tmp_path):
    """A text-files glob that matches nothing names the glob; no data directory appears."""
    proc = _prepare_with_corpus(toy_config, tmp_path, {"name": "text-files", "paths": [str(tmp_path / "no/*.txt")]})
    one_error_line(proc, "no file matches", "no/*.txt")
    assert not (tmp_path / "data").exists()


def test_hf_dataset_unavailable_offline(toy_config, tmp_path):
    """A Hugging Face dataset that is not cached, offline: one line, nothing downloaded or written."""
    env = _env(HF_HOME=str(tmp_path / "hf"), HF_DATASETS_CACHE=str(tmp_path / "hf" / "datasets"))
    proc = _prepare_with_corpus(toy_config, tmp_path, {"name": "hf", "dataset": "wikitext",
                                                       "config": "wikitext-2-raw-v1"}, env=env)
    one_error_line(proc, "dataset 'wikitext' is not available offline")
    assert not (tmp_path / "data").exists()


def test_empty_corpus(toy_config, tmp_path):
    """Corpus files without a single document."""
    corpus = _corpus_dir(tmp_path / "corpus", [[] for _ in range(4)])
    proc = _prepare_with_corpus(toy_config, tmp_path, {"name": "text-files", "paths": [str(corpus / "*.jsonl")]})
    one_error_line(proc, "has no documents")
    assert not (tmp_path / "data").exists()


def test_corpus_too_short_for_one_chunk(toy_config, tmp_path):
    """Too little text for one fixed-layout chunk: the error says so and suggests a fix; no
    tokenizer or token file is left behind (nor next to an earlier manifest)."""
    corpus = _corpus_dir(tmp_path / "corpus", [["To be."] for _ in range(4)])
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text('{"schema": "didbench.data/1", "stale": true}')  # an earlier prepare
    proc = _prepare_with_corpus(toy_config, tmp_path, {"name": "text-files", "paths": [str(corpus / "*.jsonl")]})
    one_error_line(proc, "too few for one fixed chunk of seq_len=32")
    assert sorted(os.listdir(data)) == ["manifest.json"]  # untouched: nothing new, nothing half-replaced


def test_document_longer_than_context_is_truncated_and_counted(toy_config, tmp_path):
    """A document longer than max_len is truncated (varlen) and counted in the manifest, and all
    of its tokens stay in the fixed layout: nothing is silently dropped."""
    long_doc = " ".join(["Now is the winter of our discontent made glorious summer by this sun of York."] * 12)
    short = ["To be, or not to be.", "All the world's a stage."]  # < 31 tokens even byte by byte
    corpus = _corpus_dir(tmp_path / "corpus", [short * 3 + [long_doc] for _ in range(6)])
    proc = _prepare_with_corpus(toy_config, tmp_path, {"name": "text-files", "paths": [str(corpus / "*.jsonl")]})
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    max_len, seq_len = manifest["max_len"], manifest["seq_len"]
    for split, s in manifest["splits"].items():
        files = s["groups"]  # one long document per file
        assert s["varlen"]["truncated"] == files, split
        assert s["varlen"]["sequences"] + s["varlen"]["dropped_short"] == s["documents"], split
        assert s["document_tokens"]["max"] > max_len, split
        # fixed: every content token plus one EOS per document, cut into (seq_len - 1)-token rows
        assert s["fixed"]["sequences"] == (s["content_tokens"] + s["documents"]) // (seq_len - 1), split
    from harness.data.storage import load_split

    test = load_split(tmp_path / "data", "test", "varlen")
    assert int(test.lengths.max()) == max_len


def test_corrupted_checkpoint(train_cfg, toy_data, reference, reference_state, tmp_path):
    """A truncated checkpoint.pt (evaluate) or resume/state.pt (train): one line, no result."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    data = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(data[: len(data) // 3])
    proc = cli("evaluate", "ppl", "--config", train_cfg, "--run", run, "--data", toy_data,
               "--out", run / "eval" / "ppl.json")
    one_error_line(proc, "checkpoint.pt is corrupted or unreadable")
    assert not (run / "eval" / "ppl.json").exists()

    resumed = tmp_path / "resumed"
    (resumed / "resume").mkdir(parents=True)
    state = reference_state.read_bytes()
    (resumed / STATE_FILE).write_bytes(state[: len(state) // 2])
    proc = cli(*train_args(train_cfg, toy_data, resumed))
    one_error_line(proc, "state.pt is corrupted or unreadable", "delete it to start over")
    assert sorted(os.listdir(resumed)) == ["resume"] and (resumed / STATE_FILE).read_bytes() == state[: len(state) // 2]


def test_mismatched_checkpoint(train_cfg, toy_data, reference, reference_state, other_vocab_data, tmp_path):
    """A run evaluated against data with another vocabulary, or a resume state of another
    method: one line naming the mismatch, nothing written."""
    out = tmp_path / "eval" / "ppl.json"
    proc = cli("evaluate", "ppl", "--config", train_cfg, "--run", reference, "--data", other_vocab_data, "--out", out)
    one_error_line(proc, "different vocabulary")
    assert not out.parent.exists()

    run = tmp_path / "mdlm"
    (run / "resume").mkdir(parents=True)
    shutil.copy(reference_state, run / STATE_FILE)
    proc = cli(*train_args(train_cfg, toy_data, run, method="mdlm"))
    one_error_line(proc, "does not match this run: method is 'ar' there, 'mdlm' here")
    assert not (run / "checkpoint.pt").exists()


def test_missing_evaluator(train_cfg, toy_data, reference, tmp_path):
    """genppl with an evaluator that is neither cached nor on disk: one line, no download, no result."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    proc = cli("evaluate", "samples", "--config", train_cfg, "--run", run, "--data", toy_data,
               "--out", run / "eval" / "samples.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    env = _env(HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(tmp_path / "hf" / "hub"))
    proc = cli("evaluate", "genppl", "--config", train_cfg, "--evaluator-dir", tmp_path / "evaluators" / "gpt2-large",
               "--out", run / "eval" / "genppl.json", env=env)
    one_error_line(proc, "evaluator 'gpt2-large' is not available offline")
    assert not (run / "eval" / "genppl.json").exists() and not (tmp_path / "evaluators").exists()
    assert not (tmp_path / "hf" / "hub").exists() or not any((tmp_path / "hf" / "hub").rglob("*.safetensors"))


NAN_AFTER = """
    from harness.core import methods
    cls = methods.get("ar")
    real, calls = cls.loss, []
    def loss(self, batch):  # fault: the loss turns NaN from the {n}th micro-batch on
        calls.append(1)
        value, stats = real(self, batch)
        return (value * float("nan") if len(calls) >= {n} else value), stats
    cls.loss = loss
"""


def test_nan_loss_stops_with_step_and_batch_and_keeps_last_good_checkpoint(toy_config, toy_data, tmp_path):
    """NaN loss at step 5: one line with the step, the batch statistics and the checkpoint
    kept (step 4, finite weights); no final checkpoint or summary that would look trained."""
    cfg = write_config(tmp_path / "c.yaml", toy_config, train__steps=10, train__checkpoint_every=2)
    out = tmp_path / "run"
    proc = cli(*train_args(cfg, toy_data, out), prelude=NAN_AFTER.format(n=6))
    line = one_error_line(proc, "non-finite loss (nan) at step 5", "batch of 4 sequences", "lengths 32-32")
    assert re.search(r"last good checkpoint kept at \S+state\.pt \(step 4\)", line), line
    state = load_checkpoint(str(out / STATE_FILE))
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (out / "checkpoint.pt").exists() and not (out / "train.json").exists()
    # before any checkpoint, the line says so instead of pointing at a file that does not exist
    proc = cli(*train_args(cfg, toy_data, tmp_path / "early"), prelude=NAN_AFTER.format(n=1))
    one_error_line(proc, "non-finite loss (nan) at step 0", "no checkpoint was saved yet")


class _NaNGrad(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradient is poison."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def test_nan_gradient_with_finite_loss_never_reaches_a_checkpoint(toy_config, toy_data, tmp_path, monkeypatch):
    """A finite loss with a NaN gradient stops before the optimizer step, so the checkpoint
    kept is the last good one, not NaN weights saved as if they were."""
    from harness.core import methods

    cls = methods.get("ar")
    real, calls = cls.loss, []

    def loss(self, batch):
        calls.append(1)
        value, stats = real(self, batch)
        return (_NaNGrad.apply(value) if len(calls) == 4 else value), stats

    monkeypatch.setattr(cls, "loss", loss)
    with pytest.raises(NonFiniteLoss, match=r"non-finite gradient norm \(nan\) at step 3; .*\(step 2\)"):
        train(_small_cfg(toy_config, steps=6, checkpoint_every=2), "ar", "fixed", 0, str(toy_data),
              str(tmp_path), progress=False)
    state = load_checkpoint(str(tmp_path / STATE_FILE))
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())


def _fsize_limit(limit: int):
    """preexec_fn: files may not grow beyond `limit` bytes (write() then fails with EFBIG,
    since Python ignores SIGXFSZ): a disk that fills up under the process."""
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    return apply


def test_disk_full_while_writing_a_result_keeps_the_old_one(train_cfg, toy_data, reference, tmp_path):
    """The disk fills up while `evaluate` writes its result: one line, the old result intact."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    old = '{"old": "result"}\n'
    (run / "eval").mkdir()
    (run / "eval" / "ppl.json").write_text(old)
    proc = cli("evaluate", "ppl", "--config", train_cfg, "--run", run, "--data", toy_data,
               "--out", run / "eval" / "ppl.json", preexec_fn=_fsize_limit(256))
    one_error_line(proc, "could not write", "ppl.json: File too large")
    assert (run / "eval" / "ppl.json").read_text() == old
    assert sorted(os.listdir(run / "eval")) == ["ppl.json"]


def test_disk_full_while_training_leaves_nothing_that_looks_trained(train_cfg, toy_data, tmp_path):
    """The disk is full at the first checkpoint: one line, no checkpoint, no temp files."""
    out = tmp_path / "run"
    proc = cli(*train_args(train_cfg, toy_data, out), preexec_fn=_fsize_limit(4096))
    one_error_line(proc, "could not write", "state.pt: File too large")
    assert not [p for p in out.rglob("*") if p.is_file()]


# ============================================================================ 3. results never lost or duplicated
CRASH_IN_WRITE = """
import os, signal, sys
from harness.core import records as results
os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)  # dies with the bytes written, before the rename
header = results.provenance({"study": "s"}, {"run": "r"})
results.write_result(sys.argv[1], "ppl", header, {}, {"nats_per_token": 1.0})
"""


@pytest.mark.parametrize("existing", [False, True], ids=["new", "replacing"])
def test_crash_while_writing_a_result_leaves_no_partial_file(existing, tmp_path):
    """A process killed in the middle of writing a result JSON: the result is absent (or the old
    one intact), and what is left over is not a *.json file any reader would pick up."""
    target = tmp_path / "eval" / "ppl.json"
    if existing:
        target.parent.mkdir()
        target.write_text('{"old": 1}\n')
    proc = subprocess.run([sys.executable, "-c", CRASH_IN_WRITE, str(target)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [p.name for p in target.parent.glob("*.json")] == (["ppl.json"] if existing else [])
    if existing:
        assert target.read_text() == '{"old": 1}\n'


def _rewrite_results(run_dir: str, barrier) -> None:
    """One 'evaluation job': rewrite every result of one run through write_result, at once with 7 others."""
    from harness.core.records import write_result

    files = sorted(Path(run_dir, "eval").glob("*.json"))
    objs = [json.loads(f.read_text()) for f in files]
    for f in files:
        f.unlink()
    barrier.wait()
    for f, obj in zip(files, objs):
        write_result(f, obj["kind"], obj, obj["settings"], obj["values"])


def _active_runs(uri: str, study: str) -> dict[str, list]:
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(study)
    out: dict[str, list] = {}
    for r in client.search_runs([exp.experiment_id], run_view_type=ViewType.ACTIVE_ONLY, max_results=1000):
        out.setdefault(r.info.run_name, []).append(r)
    return out


def _assert_complete(study_dir: Path, uri: str, study: str) -> None:
    """One FINISHED MLflow run per trained model (plus the study run), with every metric of its results."""
    from harness.results import payloads

    runs = _active_runs(uri, study)
    names = sorted(d.name for d in (study_dir / "runs").iterdir())
    assert len(names) == 8 and sorted(runs) == sorted(names + ["study"])
    for name in names:
        assert len(runs[name]) == 1 and runs[name][0].info.status == "FINISHED", name
        metrics = runs[name][0].data.metrics
        for f in (study_dir / "runs" / name / "eval").glob("*.json"):
            obj = json.loads(f.read_text())
            for key, value, step, _ in payloads.eval_metrics(obj["kind"], obj["values"]):
                if "/" not in key:  # curves (steps/...) keep only their last point in `metrics`
                    assert metrics[key] == pytest.approx(value), (name, key)


@pytest.fixture
def fake_study(tmp_path, monkeypatch):
    sys.path.insert(0, str(Path(__file__).parent))
    from fake_study import make_fake_study

    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    study_dir, config, _ = make_fake_study(tmp_path, missing={})
    return study_dir, config, f"sqlite:///{study_dir.resolve() / 'mlflow.db'}"


def test_eight_result_sets_finishing_together_are_all_logged(fake_study):
    """8 evaluation jobs write their result files at the same moment, then `log` runs: exactly
    8 model runs in MLflow, each with every metric of its result files."""
    from harness.results import tracking

    study_dir, config, uri = fake_study
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(8)
    procs = [ctx.Process(target=_rewrite_results, args=(str(d), barrier)) for d in sorted((study_dir / "runs").iterdir())]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * 8
    summary = tracking.log_study(study_dir, config)
    assert summary["runs"] == 8 and len(summary["logged"]) == 9
    _assert_complete(study_dir, uri, config["study"])


LOG_TOGETHER = """
import sys, time
from pathlib import Path
import yaml
from harness.results.tracking import log_study
study_dir, me, other = sys.argv[1:4]
Path(me).touch()
while not Path(other).exists():  # both loggers have imported everything: start together
    time.sleep(0.001)
log_study(study_dir, yaml.safe_load(Path(study_dir, "config.yaml").read_text()))
"""


def test_two_loggers_started_together_make_no_duplicates(fake_study, tmp_path):
    """Two `log` processes on one study started at the same instant (fresh store): both succeed
    and MLflow holds exactly one run per trained model."""
    study_dir, config, uri = fake_study
    (study_dir / "config.yaml").write_text(yaml.safe_dump(config))
    ready = [tmp_path / "ready0", tmp_path / "ready1"]
    procs = [subprocess.Popen([sys.executable, "-c", LOG_TOGETHER, str(study_dir), str(ready[i]), str(ready[1 - i])],
                              cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    _assert_complete(study_dir, uri, config["study"])


# ============================================================================ 4. determinism and provenance
HEX12, HEX40 = re.compile(r"^[0-9a-f]{12}$"), re.compile(r"^[0-9a-f]{40}$")


def _without_timings(values: dict) -> dict:
    return {k: v for k, v in values.items() if k != "seconds"}


def test_same_config_and_seed_give_identical_results_with_provenance(train_cfg, toy_data, reference, tmp_path):
    """A second training with the same config and seed gives the same weights, training summary
    and perplexity JSON (timings aside); every result names config hash, commit, versions, seed."""
    run = tmp_path / "run"
    proc = cli(*train_args(train_cfg, toy_data, run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_weights(run, reference)
    a, b = (json.loads((r / "train.json").read_text()) for r in (run, reference))
    for key in ("final_loss", "valid_nats_per_token", "params", "config_hash", "recipe", "data_hash"):
        assert a[key] == b[key], key
    results = []
    for r, name in ((run, "a.json"), (run, "b.json"), (reference, "c.json")):  # twice on one run, once on the other
        out = tmp_path / "eval" / name
        proc = cli("evaluate", "ppl", "--config", train_cfg, "--run", r, "--data", toy_data, "--out", out)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results.append(json.loads(out.read_text()))
    assert _without_timings(results[0]["values"]) == _without_timings(results[1]["values"]) \
        == _without_timings(results[2]["values"])
    for res in results + [a]:
        assert HEX12.match(res["config_hash"]) and res["seed"] == 0 and res["run"] == "ar-fixed-tiny-s0"
        assert HEX40.match(res["git_commit"]), res["git_commit"]
        assert res["versions"]["torch"] == torch.__version__ and res["versions"]["python"]
    for res in results:
        assert {"mc", "seed", "max_sequences", "split", "ema"} <= set(res["settings"])


# ============================================================================ 1e. the workflow around training
@pytest.mark.parametrize("profile", ["slurm"])  # slurm-cpu is an overlay on it that only sets the GPUs to 0
def test_slurm_profile_signals_the_trainer_and_retries(profile):
    """On SLURM a preempted or time-limited training job survives only if the job asks for a
    warning signal the trainer handles, delivered to the job steps where it runs (not `B:`, the
    batch shell only), early enough to save, and Snakemake retries the job (which resumes)."""
    overlay = yaml.safe_load((REPO / "slurm-cpu" / "config.yaml").read_text())
    assert set(overlay) == {"config"}, "slurm-cpu must not replace the profile's retries or resources"
    cfg = yaml.safe_load((REPO / profile / "config.yaml").read_text())
    assert int(cfg["retries"]) >= 1
    train_res = cfg["set-resources"]["train"]
    m = re.search(r"--signal=(?:R:)?(TERM|USR1)@(\d+)", train_res["slurm_extra"])
    assert m, train_res["slurm_extra"]
    assert 30 <= int(m.group(2)) and (int(m.group(2)) < 60 * int(train_res["runtime"]) if "runtime" in train_res
                                      else True)
    assert getattr(signal, f"SIG{m.group(1)}") in (signal.SIGTERM, signal.SIGUSR1)
    # the rule execs the trainer, so no shell stands between the signal and the trainer
    shell = re.search(r"rule train:.*?shell:\s*\n\s*\"([^\"]*)", (REPO / "workflow/rules/train.smk").read_text(), re.S)
    assert shell and shell.group(1).startswith("exec "), "the train rule must exec the trainer"


KILL_ONCE = """
# sitecustomize for the workflow's jobs (imported at start-up by every Python on PYTHONPATH):
# the first training job to start (claimed with an O_EXCL marker file) SIGKILLs itself when it
# reaches step {step}, after its step-{saved} checkpoint. Every other process, and every retry,
# runs untouched.
import os, sys
argv = getattr(sys, "argv", [])
if "train" in argv and "--method" in argv and "--out" in argv:
    try:
        fd = os.open({marker!r}, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        fd = None
    if fd is not None:
        os.write(fd, argv[argv.index("--out") + 1].encode())
        os.close(fd)
        import signal
        import harness.run.loop as t
        real_lr_at = t.lr_at
        def lr_at(step, settings):
            if step == {step}:
                os.kill(os.getpid(), signal.SIGKILL)
            return real_lr_at(step, settings)
        t.lr_at = lr_at
"""


def _snakemake(workdir: Path, *args: str, inject: Path | None = None) -> subprocess.CompletedProcess:
    """`snakemake --cores 2 [ARGS]` on the micro study in `workdir`; `inject`: a folder put on
    every job's PYTHONPATH (the workflow keeps PYTHONPATH, after the repository)."""
    env = _env(DIDBENCH_EVALUATORS=os.environ.get("DIDBENCH_EVALUATORS", str(REPO / "resources" / "evaluators")))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if inject is not None:
        env["PYTHONPATH"] = f"{env['PYTHONPATH']}{os.pathsep}{inject}"
    cmd = [sys.executable, "-m", "snakemake", "--cores", "2", *args, "--directory", str(workdir),
           "--configfile", "tests/configs/micro.yaml"]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)


@pytest.mark.slow
@pytest.mark.integration
def test_workflow_survives_a_killed_training_job(tmp_path):
    """The micro study with one training job SIGKILLed mid-run: Snakemake reports the failure,
    the next `snakemake` completes the whole study, and the killed run's weights equal those of
    a clean workflow run bitwise (it resumed from its checkpoint, nothing mixed in)."""
    from harness.core.config import load_config, study_runs

    cfg = load_config(REPO / "tests/configs/micro.yaml")
    assert cfg["train"]["checkpoint_every"] == 2 and cfg["train"]["steps"] >= 4
    inject, marker = tmp_path / "inject", tmp_path / "killed"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(KILL_ONCE.format(marker=str(marker), step=3, saved=2))

    faulty = tmp_path / "faulty"
    first = _snakemake(faulty, inject=inject)
    assert first.returncode != 0 and marker.exists(), (first.stdout + first.stderr)[-5000:]
    killed = faulty / marker.read_text()
    assert saved_step(killed) == 2 and not (killed / "checkpoint.pt").exists()
    before = load_checkpoint(str(killed / STATE_FILE))["history"]  # steps 1-2, with their wall-clock timings
    assert [row["step"] for row in before] == [1, 2]

    second = _snakemake(faulty, inject=inject)  # the same command again
    assert second.returncode == 0, (second.stdout + second.stderr)[-5000:]
    study = faulty / "results" / cfg["study"]
    assert json.loads((study / "mlflow.done").read_text())["runs"] == len(study_runs(cfg))
    # it resumed: the first attempt's rows, timings included, are still the head of the history
    with open(killed / "history.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [{k: str(v) for k, v in r.items()} for r in before] == [{k: r[k] for k in b} for r, b in zip(rows, before)]

    clean = tmp_path / "clean"
    targets = [f"results/{cfg['study']}/runs/{r['name']}/checkpoint.pt" for r in study_runs(cfg)]
    third = _snakemake(clean, *targets)
    assert third.returncode == 0, (third.stdout + third.stderr)[-5000:]
    for r in study_runs(cfg):
        rel = Path("results") / cfg["study"] / "runs" / r["name"]
        assert_same_weights(faulty / rel, clean / rel)


# ============================================================================ 5. hardening (issue 13)
# Each case below failed on the code before issue 13 and passes now; the comment names the item.


class _RunsCode:
    """A pickle payload that runs a shell command when unpickled (what a crafted checkpoint holds)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("which", ["checkpoint", "state"])
def test_crafted_checkpoint_never_runs_code(which, train_cfg, toy_data, reference, reference_state, tmp_path):
    """(1) A checkpoint.pt (evaluate) or resume/state.pt (train) whose pickle would run code: it is
    refused with one line, and the code never runs (no marker file)."""
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (run / "resume").mkdir(exist_ok=True)
    shutil.copy(reference_state, run / STATE_FILE)
    good = load_checkpoint(str(run / ("checkpoint.pt" if which == "checkpoint" else STATE_FILE)))
    torch.save({**good, "config" if which == "checkpoint" else "history": _RunsCode(marker)},
               run / ("checkpoint.pt" if which == "checkpoint" else STATE_FILE))
    if which == "checkpoint":
        proc = cli("evaluate", "ppl", "--config", train_cfg, "--run", run, "--data", toy_data,
                   "--out", run / "eval" / "ppl.json")
        assert not (run / "eval" / "ppl.json").exists()
    else:
        (run / "checkpoint.pt").unlink()
        proc = cli(*train_args(train_cfg, toy_data, run))
        assert not (run / "checkpoint.pt").exists()
    one_error_line(proc, "holds objects other than tensors and plain data; refused")
    assert not marker.exists(), "the checkpoint's pickle ran code"


def test_every_path_in_a_rule_is_shell_quoted(tmp_path):
    """(2) DIDBENCH_EVALUATORS = '<dir with a space>/$(touch MARK) --bogus': the jobs that get it
    pass it as one argument and run no command from it; every interpolated value of every rule's
    shell command is quoted (`:q`)."""
    for smk in (REPO / "workflow" / "rules").glob("*.smk"):
        for cmd in re.findall(r'shell:\s*\n((?:\s*"[^\n]*"\n)+)', smk.read_text()):
            for field in re.findall(r"\{([^{}]+)\}", cmd):
                # params.steps: `--steps N` or nothing, built from an integer (common.smk: steps_option)
                assert field.endswith(":q") or field in ("threads", "params.launcher", "params.steps"), \
                    (smk.name, field)
    marker = tmp_path / "MARK"
    hostile = f"{tmp_path}/ev dir/$(touch {marker}) --bogus"
    work = tmp_path / "w"
    env = _env(DIDBENCH_EVALUATORS=hostile)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    dry = subprocess.run([sys.executable, "-m", "snakemake", "-n", "-p", "--cores", "1", "--directory", str(work),
                          "--configfile", "tests/configs/micro.yaml"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr[-3000:]
    commands = [c for c in re.findall(r"^Shell command: (.*)$", dry.stdout, flags=re.M) if "evaluator" in c]
    assert len(commands) >= 2, dry.stdout[-3000:]   # the evaluator cache and every genppl job
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python").write_text(f"#!{sys.executable}\nimport json, sys\n"
                                 f"open({str(tmp_path / 'argv.jsonl')!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    (fake / "python").chmod(0o755)
    for cmd in commands:
        log = re.search(r"> (\S+) 2>&1$", cmd).group(1)
        (work / Path(shlex_split_one(log))).parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(["bash", "-c", f"set -euo pipefail; export PATH={fake}:$PATH; {cmd}"], cwd=work,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
    assert not marker.exists(), "a path from the environment ran a command"
    argvs = [json.loads(line) for line in (tmp_path / "argv.jsonl").read_text().splitlines()]
    for argv in argvs:
        assert "--bogus" not in argv, argv
        flag = "--evaluator-dir" if "--evaluator-dir" in argv else "--out"
        assert argv[argv.index(flag) + 1].startswith(f"{tmp_path}/ev dir/$(touch "), argv


def shlex_split_one(word: str) -> str:
    import shlex

    (value,) = shlex.split(word)
    return value


@pytest.fixture
def logged_study(fake_study):
    """The fake study logged once to its fresh SQLite store: (study_dir, config, uri, run ids by name)."""
    from harness.results import tracking

    study_dir, config, uri = fake_study
    tracking.log_study(study_dir, config)
    return study_dir, config, uri, {n: rs[0].info.run_id for n, rs in _active_runs(uri, config["study"]).items()}


@pytest.mark.parametrize("content", ["truncated", "{}", "not-an-object", "values-a-list"])
def test_bad_result_file_fails_log_and_report_and_keeps_the_good_run(content, logged_study, train_cfg):
    """(3) A truncated or schema-less result in a logged study: `log` and `report` fail with one
    line naming the file, and the good MLflow run is not replaced."""
    from harness.results import tracking
    from harness.core.methods import UserError

    study_dir, config, uri, ids = logged_study
    name = "did-varlen-tiny-s0"
    target = study_dir / "runs" / name / "eval" / "ppl.json"
    text = target.read_text()
    target.write_text({"truncated": text[: len(text) // 2], "{}": "{}", "not-an-object": "[1, 2]",
                       "values-a-list": json.dumps({**json.loads(text), "values": [1]})}[content])
    with pytest.raises(UserError, match=re.escape(str(target))):
        tracking.log_study(study_dir, config)
    after = _active_runs(uri, config["study"])
    assert {n: rs[0].info.run_id for n, rs in after.items()} == ids          # nothing replaced
    assert "nats_per_token" in after[name][0].data.metrics
    proc = cli("report", "--config", train_cfg, "--study-dir", study_dir)
    one_error_line(proc, str(target))


def _dag_skeleton(work: Path) -> None:
    """Every output of the micro study's DAG as an empty file (in DAG order, older to newer), so
    Snakemake sees a finished study without running anything."""
    env = _env(DIDBENCH_EVALUATORS=str(work / "ev"))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    dry = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--directory", str(work),
                          "--configfile", "tests/configs/micro.yaml"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr[-3000:]
    order = ["prepare_data", "evaluator_cache", "train", "eval_ppl", "eval_samples", "eval_genppl", "eval_mauve",
             "eval_diversity", "eval_lengths", "eval_exact", "cost", "report", "mlflow_log"]
    blocks: dict[str, list[str]] = {}
    for chunk in re.split(r"\n(?=\[[^\]]+\]\n(?:local)?rule )", dry.stdout):
        m = re.search(r"^(?:local)?rule (\w+):", chunk, flags=re.M)
        out = re.search(r"^\s+output: (.*)$", chunk, flags=re.M)
        if m and out:
            blocks.setdefault(m.group(1), []).extend(x.strip() for x in out.group(1).split(","))
    t = time.time() - 1000
    for rule in order:
        for o in blocks.get(rule, []):
            p = work / o
            p.mkdir(parents=True, exist_ok=True) if rule == "report" else (
                p.parent.mkdir(parents=True, exist_ok=True), p.touch())
            os.utime(p, (t, t))
        t += 10


def _dry_counts(work: Path, *args) -> subprocess.CompletedProcess:
    env = _env(DIDBENCH_EVALUATORS=str(work / "ev"))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", *args, "--directory", str(work),
                           "--configfile", "tests/configs/micro.yaml"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def test_deleted_result_file_is_rebuilt(tmp_path):
    """(4) A result file deleted from a finished study: `snakemake` rebuilds it, then the report
    and the MLflow log that summarise it (not "Nothing to be done")."""
    work = tmp_path / "w"
    _dag_skeleton(work)
    assert "Nothing to be done" in _dry_counts(work).stdout
    (work / "results/micro/runs/ar-varlen-tiny-s0/eval/ppl.json").unlink()
    out = _dry_counts(work).stdout
    stats = out.split("Job stats:", 1)[1] if "Job stats:" in out else out
    for rule in ("eval_ppl", "report", "mlflow_log"):
        assert re.search(rf"^{rule}\s+1$", stats, flags=re.M), out[-3000:]


@pytest.mark.parametrize("damage", ["cut-mid-row", "binary"])
def test_damaged_history_is_detected(damage, fake_study):
    """(5) history.csv cut mid-row, or binary: `log` fails with one line naming the file (no curve
    that silently lost points, no UnicodeDecodeError), and the report notes the file."""
    from harness.results import tracking
    from harness.core.methods import UserError
    from harness.results.study import load_study

    study_dir, config, _ = fake_study
    hist = study_dir / "runs" / "did-varlen-tiny-s0" / "history.csv"
    text = hist.read_text()
    hist.write_bytes(text[: len(text) - 7].encode() if damage == "cut-mid-row" else b"\x89PNG\r\n\x1a\n\xff\xfe" * 40)
    with pytest.raises(UserError, match=re.escape(str(hist)) + ".*(truncated|not UTF-8)") as err:
        tracking.log_study(study_dir, config)
    assert "\n" not in str(err.value)
    assert any(str(hist) in p for p in load_study(study_dir, config).problems)


def test_checkpoint_of_another_recipe_is_refused(toy_config, train_cfg, toy_data, reference, tmp_path):
    """(6) A checkpoint trained with another recipe (another lr) copied into a run directory is not
    evaluated and labelled with this study's config hash."""
    other = tmp_path / "other"
    train(_small_cfg(toy_config, steps=2, lr=3e-3), "ar", "fixed", 0, str(toy_data), str(other), progress=False)
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.copy(other / "checkpoint.pt", run / "checkpoint.pt")
    proc = cli("evaluate", "ppl", "--config", train_cfg, "--run", run, "--data", toy_data,
               "--out", run / "eval" / "ppl.json")
    one_error_line(proc, "was trained with another recipe", "retrain the run")
    assert not (run / "eval").exists()


def test_seq_len_other_than_the_prepared_data(toy_config, toy_data, tmp_path):
    """(7) data.seq_len 4096 in the config, 32 in the prepared data: `train` stops with one line."""
    cfg = write_config(tmp_path / "c.yaml", toy_config, data__seq_len=4096, data__max_len=4096)
    proc = cli(*train_args(cfg, toy_data, tmp_path / "run"))
    one_error_line(proc, "data.seq_len is 4096 in the config", "seq_len=32")
    assert not (tmp_path / "run").exists()


HALF_BUILT = """
import sys
import sqlalchemy
from alembic import command
from alembic.script import ScriptDirectory
from mlflow.store.db.utils import _get_alembic_config
from mlflow.store.tracking.dbmodels.initial_models import Base as InitialBase
url = "sqlite:///" + sys.argv[1]
engine = sqlalchemy.create_engine(url)
InitialBase.metadata.create_all(engine)
config = _get_alembic_config(url)
revs = [r.revision for r in ScriptDirectory.from_config(config).walk_revisions()][::-1]
tables = lambda: set(sqlalchemy.inspect(engine).get_table_names())  # noqa: E731
for i in range(len(revs) // 2, len(revs)):  # from half way: the first migration that creates a table
    before = tables()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revs[i])
    if tables() - before:
        break
with engine.begin() as connection:  # killed after its DDL, before alembic recorded it (SQLite DDL is not transactional)
    connection.execute(sqlalchemy.text("UPDATE alembic_version SET version_num = :v"), {"v": revs[i - 1]})
"""


def test_half_built_sqlite_store_is_rebuilt(fake_study):
    """(8) A logger killed while MLflow migrated a fresh SQLite store left it half-built: the next
    `log` moves it aside, builds a new store and logs everything (no `table ... already exists`)."""
    from harness.results import tracking

    study_dir, config, uri = fake_study
    db = study_dir / "mlflow.db"
    proc = subprocess.run([sys.executable, "-c", HALF_BUILT, str(db)], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and db.exists(), proc.stderr[-3000:]
    summary = tracking.log_study(study_dir, config)
    assert summary["runs"] == 8
    _assert_complete(study_dir, uri, config["study"])
    assert list(study_dir.glob("mlflow.db.broken-*")) and not list(study_dir.glob(".mlflow.db.*.tmp"))


KILL_IN_CREATE = """
import os, signal, sys
from harness.results import tracking
real = os.replace
os.replace = lambda a, b: os.kill(os.getpid(), signal.SIGKILL)   # dies with the store built, before the rename
tracking.ensure_store("sqlite:///" + sys.argv[1])
"""


def test_killed_while_creating_the_store_leaves_no_half_store(fake_study):
    """(8) SIGKILL while the fresh store is built: no mlflow.db at all (only a temp file), and the
    next `log` builds it and logs everything."""
    from harness.results import tracking

    study_dir, config, uri = fake_study
    proc = subprocess.run([sys.executable, "-c", KILL_IN_CREATE, str(study_dir / "mlflow.db")], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert not (study_dir / "mlflow.db").exists()
    tracking.log_study(study_dir, config)
    _assert_complete(study_dir, uri, config["study"])
    assert not list(study_dir.glob(".mlflow.db.*.tmp"))


@pytest.mark.parametrize("server", ["silent", "unreachable"])
def test_tracking_server_that_never_answers_is_one_line(server, fake_study, train_cfg):
    """(9) A server that accepts connections and never answers, or no server at all: `log` ends
    with one line after bounded waits, never hangs, no traceback."""
    import socket

    from harness.results import tracking

    timeout, retries = int(tracking.HTTP_DEFAULTS["MLFLOW_HTTP_REQUEST_TIMEOUT"]), \
        int(tracking.HTTP_DEFAULTS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"])
    assert timeout * (retries + 1) <= 120                              # the defaults are bounded
    study_dir, _, _ = fake_study
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    if server == "silent":
        sock.listen(64)                                             # accepts (backlog), never answers
        env = _env(MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}", MLFLOW_HTTP_REQUEST_TIMEOUT="2",
                   MLFLOW_HTTP_REQUEST_MAX_RETRIES="1")
    else:
        sock.close()
        env = _env(MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}")  # the defaults
    try:
        t0 = time.monotonic()
        proc = cli("log", "--config", train_cfg, "--study-dir", study_dir, env=env, timeout=240)
        one_error_line(proc, f"MLflow at http://127.0.0.1:{port} failed")
        assert time.monotonic() - t0 < 200
    finally:
        sock.close()


SHARED_LOG = """
import sys, time
from pathlib import Path
import yaml
from harness.results.tracking import log_study
study_dir, me, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
Path(me).touch()
while len(list(Path(me).parent.glob("ready*"))) < n:
    time.sleep(0.001)
log_study(study_dir, yaml.safe_load(Path(study_dir, "config.yaml").read_text()))
"""


def test_four_studies_create_one_shared_store_at_once(tmp_path, monkeypatch):
    """(10) Four studies log at the same instant into one fresh shared SQLite URI: all succeed
    (the store is created once, under a lock), each with all its runs."""
    sys.path.insert(0, str(Path(__file__).parent))
    from fake_study import make_fake_study

    pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'shared' / 'mlflow.db'}"
    (tmp_path / "shared").mkdir()
    studies = []
    for i in range(4):
        study_dir, config, _ = make_fake_study(tmp_path / f"s{i}", study=f"fake{i}", missing={})
        (study_dir / "config.yaml").write_text(yaml.safe_dump(config))
        studies.append((study_dir, config))
    (tmp_path / "sync").mkdir()
    env = _env(MLFLOW_TRACKING_URI=uri)
    procs = [subprocess.Popen([sys.executable, "-c", SHARED_LOG, str(d), str(tmp_path / "sync" / f"ready{i}"), "4"],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, (d, _) in enumerate(studies)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err[-1500:] for _, err in outs]
    for d, config in studies:
        _assert_complete(d, uri, config["study"])


def test_non_utf8_corpus_is_one_line(toy_config, tmp_path):
    """(11) A binary or non-UTF-8 file in a text-files corpus: one line naming it, no data."""
    corpus = _corpus_dir(tmp_path / "corpus", [["To be, or not to be."] * 20 for _ in range(5)])
    (corpus / "f2.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    proc = _prepare_with_corpus(toy_config, tmp_path, {"name": "text-files", "paths": [str(corpus / "*.jsonl")]})
    one_error_line(proc, "f2.jsonl: not UTF-8 text")
    assert not (tmp_path / "data").exists()


def test_nan_learning_rate_is_one_line(toy_config, toy_data, tmp_path):
    """(11) `lr: .nan` passes the schema's bounds (NaN compares false): one line, nothing trained."""
    cfg = write_config(tmp_path / "c.yaml", toy_config, train__lr=float("nan"))
    assert "lr: .nan" in cfg.read_text()
    proc = cli(*train_args(cfg, toy_data, tmp_path / "run"))
    one_error_line(proc, "train.lr: nan is not a finite number")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("damage", ["train.json", "features.npz", "checkpoint-without-config"])
def test_damaged_run_files_are_one_line(damage, train_cfg, toy_data, reference, tmp_path):
    """(11) A truncated train.json (evaluate ppl), a truncated features.npz (evaluate mauve), a
    checkpoint dict without its config: one line each, no result written."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    out = run / "eval" / ("mauve.json" if damage == "features.npz" else "ppl.json")
    if damage == "train.json":
        text = (run / "train.json").read_text()
        (run / "train.json").write_text(text[: len(text) // 2])
        needle = "train.json is not a valid training summary"
    elif damage == "checkpoint-without-config":
        state = load_checkpoint(str(run / "checkpoint.pt"))
        del state["config"]
        torch.save(state, run / "checkpoint.pt")
        needle = "checkpoint.pt is malformed: it lacks config"
    else:
        from harness.metrics.genppl import save_features

        proc = cli("evaluate", "samples", "--config", train_cfg, "--run", run, "--data", toy_data,
                   "--out", run / "eval" / "samples.json")
        assert proc.returncode == 0, proc.stderr[-3000:]
        import numpy as np

        save_features(run / "eval" / "features.npz", np.ones((4, 8), np.float32), {2: np.ones((2, 8), np.float32)})
        data = (run / "eval" / "features.npz").read_bytes()
        (run / "eval" / "features.npz").write_bytes(data[: len(data) // 2])
        needle = "features.npz: truncated or corrupted"
    if damage == "features.npz":
        proc = cli("evaluate", "mauve", "--config", train_cfg, "--out", out)
    else:
        proc = cli("evaluate", "ppl", "--config", train_cfg, "--run", run, "--data", toy_data, "--out", out)
    one_error_line(proc, needle)
    assert not out.exists()


def test_duplicate_yaml_keys_are_refused(toy_config, toy_data, tmp_path):
    """(12) A key given twice in a YAML config is refused (not last-wins), by the CLI and by the
    workflow, with one line naming the key and both lines."""
    text = yaml.safe_dump(toy_config, sort_keys=False).replace("  lr: ", "  lr: 0.5\n  lr: ", 1)
    assert text.count("  lr: ") == 2
    cfg = tmp_path / "dup.yaml"
    cfg.write_text(text)
    proc = cli(*train_args(cfg, toy_data, tmp_path / "run"))
    one_error_line(proc, "dup.yaml", "duplicate key 'lr'")
    assert not (tmp_path / "run").exists()
    env = _env()
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    snake = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--directory", str(tmp_path / "w"),
                            "--configfile", str(cfg)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert snake.returncode != 0 and "duplicate key 'lr'" in snake.stdout + snake.stderr
    assert "Traceback" not in snake.stdout + snake.stderr


RECOVERY_JOB = """
# sitecustomize for one job: `evaluate ppl` writes half its result, says so, and hangs (killed later)
import os, sys, time
argv = getattr(sys, "argv", [])
if "evaluate" in argv and "ppl" in argv:
    out = argv[argv.index("--out") + 1]
    open(out, "w").write('{{"schema": "didbench.result/1", "kind": "pp')
    open({marker!r}, "w").write(out)
    time.sleep(600)
"""


def test_documented_recovery_after_a_killed_snakemake(tmp_path):
    """(13) Snakemake killed mid-job (its lock left, a job's output half-written): the next plain
    `snakemake` refuses; the README's recovery commands, typed as written, unlock and plan the cut-off
    job again."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Recovering from an interruption", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^(\.venv/bin/snakemake [^#\n]*?)\s*(?:#.*)?$", section.split("```bash", 1)[1]
                          .split("```", 1)[0], flags=re.M)
    assert [c.split()[-1] for c in commands] == ["--unlock", "--rerun-incomplete"]
    work = tmp_path / "w"
    _dag_skeleton(work)
    target = work / "results/micro/runs/ar-varlen-tiny-s0/eval/ppl.json"
    target.unlink()
    inject, marker = tmp_path / "inject", tmp_path / "started"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(RECOVERY_JOB.format(marker=str(marker)))
    env = _env(DIDBENCH_EVALUATORS=str(work / "ev"))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = f"{env['PYTHONPATH']}{os.pathsep}{inject}"
    snake = subprocess.Popen([sys.executable, "-m", "snakemake", str(target.relative_to(work)), "--cores", "1",
                              "--directory", str(work), "--configfile", "tests/configs/micro.yaml"], cwd=REPO,
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_until(marker.exists, snake, timeout=300)
    os.killpg(snake.pid, signal.SIGKILL)                     # Snakemake and its job, no chance to clean up
    snake.wait(60)
    assert list((work / ".snakemake" / "locks").iterdir())                   # the dead run's lock is left
    plain = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "1", "--directory", str(work),
                            "--configfile", "tests/configs/micro.yaml"], cwd=REPO, env=_env(), capture_output=True,
                           text=True, timeout=300)
    assert plain.returncode != 0 and "--rerun-incomplete" in plain.stderr     # what the user sees
    extra = ["--directory", str(work), "--configfile", "tests/configs/micro.yaml"]
    for i, command in enumerate(commands):
        argv = [sys.executable, "-m", "snakemake", *command.split()[1:], *extra] + (["-n"] if i == 1 else [])
        proc = subprocess.run(argv, cwd=REPO, env={**env, "PYTHONPATH": _env()["PYTHONPATH"]}, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, (command, (proc.stdout + proc.stderr)[-3000:])
        if i == 0:
            assert not any((work / ".snakemake" / "locks").glob("*.lock"))
    assert re.search(r"^eval_ppl\s+1$", proc.stdout.split("Job stats:", 1)[1], flags=re.M), proc.stdout[-3000:]


def test_the_reason_of_a_disk_full_failure_reaches_the_console(train_cfg, toy_data, tmp_path):
    """(14) A job whose disk is full cannot write its log either: its one error line still reaches
    the console (the workflow's shell prefix keeps it on fd 3)."""
    from harness.core.errors import CONSOLE_PREFIX

    common = (REPO / "workflow" / "rules" / "common.smk").read_text()
    assert "CONSOLE_PREFIX" in common.split("shell.prefix(", 1)[1].split(")\n", 1)[0]
    log, out = tmp_path / "logs" / "train.log", tmp_path / "run"
    log.parent.mkdir()
    args = " ".join(shlex_quote(str(a)) for a in _cmd(train_args(train_cfg, toy_data, out)))
    proc = subprocess.run(["bash", "-c", f"set -euo pipefail; {CONSOLE_PREFIX}{args} > {shlex_quote(str(log))} 2>&1"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300,
                          preexec_fn=_fsize_limit(16))   # the disk fills up after 16 bytes of any file
    assert proc.returncode == 2, proc.stderr
    assert "File too large" not in log.read_text()                     # the reason could not reach the log
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: could not write") and "File too large" in lines[0], \
        proc.stderr


def shlex_quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


def test_results_record_no_machine_paths(tmp_path, monkeypatch):
    """(15) Paths in a result's settings (e.g. the evaluator cache, the samples file) are recorded
    relative to the repository, or to the study's working directory, not as absolute paths."""
    from harness.core import records as results

    monkeypatch.chdir(tmp_path)
    header = results.provenance({"study": "s"}, {"run": "r"})
    obj = results.write_result(tmp_path / "eval" / "x.json", "genppl", header,
                               {"evaluator": {"source": str(REPO / "resources" / "evaluators" / "smollm2")},
                                "samples": str(tmp_path / "results" / "s" / "runs" / "r" / "eval" / "samples.json"),
                                "paths": [str(REPO / "config" / "default.yaml")], "mc": 2}, {"v": 1.0})
    on_disk = json.loads((tmp_path / "eval" / "x.json").read_text())
    assert on_disk["settings"] == obj["settings"] == {
        "evaluator": {"source": "resources/evaluators/smollm2"}, "samples": "results/s/runs/r/eval/samples.json",
        "paths": ["config/default.yaml"], "mc": 2}
