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

from harness.train import EXIT_PREEMPTED, STATE_FILE, NonFiniteLoss, load_checkpoint, train

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
def other_vocab_data(toy_config, tmp_path_factory) -> Path:
    """The toy corpus prepared with another vocabulary size."""
    from harness.data import prepare

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
    out = tmp_path / "run"
    train(_small_cfg(toy_config, steps=6, lr=1e-3), "ar", "fixed", 0, str(toy_data), str(out), progress=False)
    edited = _small_cfg(toy_config, steps=6, lr=3e-3)
    train(edited, "ar", "fixed", 0, str(toy_data), str(out), progress=False)
    train(edited, "ar", "fixed", 0, str(toy_data), str(tmp_path / "fresh"), progress=False)
    assert_same_weights(out, tmp_path / "fresh")
    # cadence settings are not part of the recipe: changing them still resumes
    state = load_checkpoint(str(out / STATE_FILE))
    train(_small_cfg(toy_config, steps=6, lr=3e-3, log_every=3), "ar", "fixed", 0, str(toy_data), str(out),
          progress=False)
    assert load_checkpoint(str(out / STATE_FILE))["info"]["recipe"] == state["info"]["recipe"]
    assert_same_weights(out, tmp_path / "fresh")


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
    from harness.data import load_split

    test = load_split(tmp_path / "data", "test", "varlen")
    assert int(test.lengths.max()) == max_len


def test_corrupted_checkpoint(train_cfg, toy_data, reference, tmp_path):
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
    state = (reference / STATE_FILE).read_bytes()
    (resumed / STATE_FILE).write_bytes(state[: len(state) // 2])
    proc = cli(*train_args(train_cfg, toy_data, resumed))
    one_error_line(proc, "state.pt is corrupted or unreadable", "delete it to start over")
    assert sorted(os.listdir(resumed)) == ["resume"] and (resumed / STATE_FILE).read_bytes() == state[: len(state) // 2]


def test_mismatched_checkpoint(train_cfg, toy_data, reference, other_vocab_data, tmp_path):
    """A run evaluated against data with another vocabulary, or a resume state of another
    method: one line naming the mismatch, nothing written."""
    out = tmp_path / "eval" / "ppl.json"
    proc = cli("evaluate", "ppl", "--config", train_cfg, "--run", reference, "--data", other_vocab_data, "--out", out)
    one_error_line(proc, "different vocabulary")
    assert not out.parent.exists()

    run = tmp_path / "mdlm"
    (run / "resume").mkdir(parents=True)
    shutil.copy(reference / STATE_FILE, run / STATE_FILE)
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
    from harness import methods
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
    from harness import methods

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
from harness import results
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
    from harness.results import write_result

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
    from harness import tracking

    runs = _active_runs(uri, study)
    names = sorted(d.name for d in (study_dir / "runs").iterdir())
    assert len(names) == 8 and sorted(runs) == sorted(names + ["study"])
    for name in names:
        assert len(runs[name]) == 1 and runs[name][0].info.status == "FINISHED", name
        metrics = runs[name][0].data.metrics
        for f in (study_dir / "runs" / name / "eval").glob("*.json"):
            obj = json.loads(f.read_text())
            for key, value, step, _ in tracking.eval_metrics(obj["kind"], obj["values"]):
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
    from harness import tracking

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
from harness.tracking import log_study
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
@pytest.mark.parametrize("profile", ["slurm", "slurm-cpu"])
def test_slurm_profile_signals_the_trainer_and_retries(profile):
    """On SLURM a preempted or time-limited training job survives only if the job asks for a
    warning signal the trainer handles, delivered to the job steps where it runs (not `B:`, the
    batch shell only), early enough to save, and Snakemake retries the job (which resumes)."""
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
        import harness.train as t
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
    from harness.config import load_config, study_runs

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
