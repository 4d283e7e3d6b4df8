"""The training loop: falling loss, exact resume, preemption, non-finite loss, validation curve, DDP (2 gloo ranks)."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from harness.core import methods
from harness.core.backbone import Backbone, backbone_config
from harness.core.batch import Batch
from harness.core.methods import Method, UserError, register
from harness.run.loop import Preempted, train
from harness.run.recipe import load_checkpoint


@register("toy-test")
class ToyAR(Method):
    """Test double: a causal LM on the shared backbone (dense rows), exact NLL."""

    layouts = ("fixed", "varlen")

    def __init__(self, vocab, size, layout, max_len, dropout=0.0, nan_at=None, **options):
        super().__init__(vocab, size, layout, max_len, **options)
        cfg = backbone_config(size, n_layers=1, d_model=32, n_heads=2, causal=True, dropout=dropout, max_len=max_len)
        self.net = Backbone(cfg, vocab.size)
        self.head = nn.Linear(cfg.d_model, vocab.size)
        self.nan_at = nan_at
        self.calls = 0

    def _nll(self, batch: Batch) -> torch.Tensor:
        x = batch.x0
        logp = torch.log_softmax(self.head(self.net(x[:, :-1])), -1)
        tok = logp.gather(-1, x[:, 1:, None])[..., 0]
        valid = batch.valid_mask()[:, 1:]
        return -(tok * valid).sum(1)

    def loss(self, batch):
        self.calls += 1
        loss = self._nll(batch).mean()
        if self.nan_at is not None and self.calls > self.nan_at:
            loss = loss * float("nan")
        return loss, {"toy_stat": 1.0}

    def nll_bound(self, batch, mc, generator=None, convention="strict"):
        return self._nll(batch).double()

    def flops_per_token(self, batch):
        return 1000.0 + batch.size  # made up; depends on the batch so the mean over batches is exercised


def _cfg(toy_config, **train):
    cfg = json.loads(json.dumps(toy_config))
    cfg["train"].update(train)
    return cfg


def test_registry_lists_and_rejects():
    assert "toy-test" in methods.available()
    with pytest.raises(UserError, match="unknown method"):
        methods.get("nope")


def test_loss_falls_and_outputs(toy_config, toy_data, tmp_path):
    cfg = _cfg(toy_config, steps=30, lr=3e-3, checkpoint_every=10, log_every=5)
    train(cfg, "toy-test", "fixed", 0, str(toy_data), str(tmp_path), progress=False)
    hist = (tmp_path / "history.csv").read_text().splitlines()
    assert hist[0].startswith("step,loss,lr")
    assert len(hist) == 1 + 6
    first, last = float(hist[1].split(",")[1]), float(hist[-1].split(",")[1])
    assert last < first
    info = json.loads((tmp_path / "train.json").read_text())
    assert info["run"] == "toy-test-fixed-tiny-s0" and info["tokens_per_s"] > 0
    assert "valid_nats_per_token" in info and info["git_commit"]
    assert (tmp_path / "checkpoint.pt").exists()


def _weights(path):
    return load_checkpoint(str(path))["model"]


def _history(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_resume_gives_identical_weights(toy_config, toy_data, tmp_path):
    cfg = _cfg(toy_config, steps=6, checkpoint_every=2, dropout=0.1, valid_every=2)
    train(cfg, "toy-test", "fixed", 3, str(toy_data), str(tmp_path / "a"), progress=False)
    with pytest.raises(Preempted):  # "killed" after 3 steps: only the step-2 checkpoint survives
        train(cfg, "toy-test", "fixed", 3, str(toy_data), str(tmp_path / "b"), progress=False, stop_after=3)
    assert not (tmp_path / "b" / "checkpoint.pt").exists()
    train(cfg, "toy-test", "fixed", 3, str(toy_data), str(tmp_path / "b"), progress=False)
    a, b = _weights(tmp_path / "a" / "checkpoint.pt"), _weights(tmp_path / "b" / "checkpoint.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    ha = (tmp_path / "a" / "history.csv").read_text().splitlines()
    hb = (tmp_path / "b" / "history.csv").read_text().splitlines()
    assert [r.split(",")[1] for r in ha] == [r.split(",")[1] for r in hb]
    va, vb = _history(tmp_path / "a" / "history.csv"), _history(tmp_path / "b" / "history.csv")
    for col in ("valid_nats_per_token", "valid_stderr", "train_flops"):
        assert [r[col] for r in va] == [r[col] for r in vb], col
    assert [r["step"] for r in va if r["valid_nats_per_token"]] == ["2", "4", "6"]


def test_validation_curve_is_strict_fixed_and_leaves_training_alone(toy_config, toy_data, tmp_path):
    """valid_every: strict bound of the EMA weights at those steps (same rows and seed, so the last
    point is train.json's), training FLOPs on every row, and the weights of a run without it."""
    from harness.data.storage import load_split
    from harness.data.manifest import load_tokenizer
    from harness.run.recipe import TrainSettings, build_method
    from harness.run.validation import strict_validation

    cfg = _cfg(toy_config, steps=4, valid_every=2, valid_sequences=6, valid_mc=2, dropout=0.1)
    off = _cfg(toy_config, steps=4, valid_sequences=6, valid_mc=2, dropout=0.1)
    info = train(cfg, "did", "varlen", 0, str(toy_data), str(tmp_path / "on"), progress=False)
    train(off, "did", "varlen", 0, str(toy_data), str(tmp_path / "off"), progress=False)
    for k, v in _weights(tmp_path / "off" / "checkpoint.pt").items():
        torch.testing.assert_close(_weights(tmp_path / "on" / "checkpoint.pt")[k], v, rtol=0, atol=0)
    rows = _history(tmp_path / "on" / "history.csv")
    assert [r["step"] for r in rows if r["valid_nats_per_token"]] == ["2", "4"]
    assert all(not r["valid_stderr"] and not r["valid_seconds"] for r in rows if not r["valid_nats_per_token"])
    assert all(float(r["valid_stderr"]) > 0 and float(r["valid_seconds"]) >= 0 for r in rows if r["valid_nats_per_token"])
    assert float(rows[-1]["valid_nats_per_token"]) == info["valid_nats_per_token"]
    assert info["valid_convention"] == "strict" and info["valid_sequences"] == 6 and info["valid_mc"] == 2
    assert [float(r["train_flops"]) for r in rows] == pytest.approx([info["flops_per_step"] * (i + 1) for i in range(4)],
                                                                    rel=1e-6)
    # the run without valid_every still has its final point, and it is the same number
    off_rows = _history(tmp_path / "off" / "history.csv")
    assert [r["step"] for r in off_rows if r["valid_nats_per_token"]] == ["4"]
    assert off_rows[-1]["valid_nats_per_token"] == rows[-1]["valid_nats_per_token"]
    # the curve point is the strict bound of the EMA weights on the first valid rows, seed + 17
    ckpt = load_checkpoint(str(tmp_path / "on" / "checkpoint.pt"))
    model = build_method(cfg, "did", "varlen", None, load_tokenizer(str(toy_data)).vocab)
    model.load_state_dict(ckpt["ema"])
    model.eval()
    res = strict_validation(model, load_split(str(toy_data), "valid", "varlen"),
                            TrainSettings.from_config(cfg["train"]), 0, torch.device("cpu"))
    assert round(res["nats_per_token"], 6) == info["valid_nats_per_token"] and res["n_sequences"] == 6


def test_validation_steps_get_a_history_row_between_log_rows(toy_config, toy_data, tmp_path):
    cfg = _cfg(toy_config, steps=6, log_every=2, valid_every=3)
    train(cfg, "toy-test", "fixed", 0, str(toy_data), str(tmp_path), progress=False)
    rows = list(csv.DictReader(open(tmp_path / "history.csv")))
    assert [int(r["step"]) for r in rows] == [2, 3, 4, 6]
    assert [int(r["step"]) for r in rows if r["valid_nats_per_token"]] == [3, 6]
    cfg = _cfg(toy_config, steps=4, valid_every=-1)
    with pytest.raises(UserError, match=r"train.valid_every=-1 must be >= 0") as err:
        train(cfg, "toy-test", "fixed", 0, str(toy_data), str(tmp_path / "neg"), progress=False)
    assert "\n" not in str(err.value)


def test_nonfinite_loss_stops_with_step_and_keeps_checkpoint(toy_config, toy_data, tmp_path):
    cfg = _cfg(toy_config, steps=6, checkpoint_every=2)
    cfg["methods"] = {"toy-test": {"nan_at": 4}}
    with pytest.raises(UserError, match=r"non-finite loss .* at step 4"):
        train(cfg, "toy-test", "fixed", 0, str(toy_data), str(tmp_path), progress=False)
    assert load_checkpoint(str(tmp_path / "resume" / "state.pt"))["step"] == 4
    assert not (tmp_path / "checkpoint.pt").exists()


def test_mismatched_checkpoint_is_one_clear_error(toy_config, toy_data, tmp_path):
    cfg = _cfg(toy_config, steps=4, checkpoint_every=2)
    with pytest.raises(Preempted):   # stopped after its first checkpoint (a finished run keeps no state)
        train(cfg, "toy-test", "fixed", 0, str(toy_data), str(tmp_path), progress=False, stop_after=3)
    state = load_checkpoint(str(tmp_path / "resume" / "state.pt"))
    with pytest.raises(UserError, match="layout"):
        load_checkpoint(str(tmp_path / "resume" / "state.pt"), expect={**state["info"], "layout": "varlen"})
    (tmp_path / "resume" / "state.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match="corrupted"):
        train(cfg, "toy-test", "fixed", 0, str(toy_data), str(tmp_path), progress=False)


DDP_SCRIPT = r"""
import sys, json, torch
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
import test_train  # registers the test double
from harness.run.loop import train
cfg = json.loads({cfg!r})
train(cfg, "toy-test", "fixed", 0, {data!r}, {out!r}, progress=False)
"""


def test_ddp_two_gloo_ranks_match_single_process(toy_config, toy_data, tmp_path):
    """A DDP step over 2 ranks (each half the batch) equals one process on the whole batch."""
    cfg = _cfg(toy_config, steps=2, checkpoint_every=10)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "ddp.py"
    script.write_text(
        DDP_SCRIPT.format(root=root, tests=os.path.join(root, "tests"), cfg=json.dumps(cfg), data=str(toy_data), out=str(tmp_path / "ddp"))
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)],
        check=True, env=env, cwd=root, capture_output=True, timeout=300,
    )
    single = _cfg(toy_config, steps=2, checkpoint_every=10)
    train(single, "toy-test", "fixed", 0, str(toy_data), str(tmp_path / "one"), progress=False)
    ddp, one = _weights(tmp_path / "ddp" / "checkpoint.pt"), _weights(tmp_path / "one" / "checkpoint.pt")
    # dropout is 0 and the loss is a per-sequence mean, so the averaged gradient is the same
    for k in one:
        torch.testing.assert_close(ddp[k], one[k], rtol=1e-4, atol=1e-5)
