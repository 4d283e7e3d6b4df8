"""Earned comparisons (issue 23): one loss normalisation, counted clipping, run labels, FLOPs-matched
runs, untrained reference runs, the sweep grid, the plateau criterion and the sweep table."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from harness.core import methods
from harness.core.batch import Batch, predicted_tokens
from harness.core.config import load_config, match_targets, run_entries, study_runs
from harness.core.methods import UserError

VARLEN = ["did", "mdlm", "radd", "ilm", "ar"]


def _varlen_batch(vocab_size: int, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 9, 3, 12])
    x0 = torch.zeros(4, 12, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        x0[i, 1:n] = torch.randint(4, vocab_size, (n - 1,), generator=g)
    return Batch(x0=x0, lengths=lengths, layout="varlen")


@pytest.mark.parametrize("name", VARLEN)
def test_every_training_loss_is_the_objective_per_predicted_token(name):
    """The value the optimizer minimises (and clips) is in one unit for every method: the one-draw
    objective per predicted token N(x), the `nats_per_token` stat; DID's per-sequence mean would
    be ~mean(N) times larger and its gradient clipped ~mean(N) times harder."""
    from harness.core.batch import Vocab

    vocab = Vocab(size=12, bos=0, eos=1, pad=2, mask=3)   # content ids 4..11
    torch.manual_seed(0)
    model = methods.build(name, vocab, "tiny", "varlen", 16)
    batch = _varlen_batch(vocab.size)
    loss, stats = model.loss(batch)
    assert float(loss.detach()) == pytest.approx(stats["nats_per_token"], rel=1e-5, abs=1e-5)
    if name == "did":   # and it is the per-sequence values summed over the batch / sum N(x)
        assert float(loss.detach()) * float(predicted_tokens(batch).sum()) == pytest.approx(
            stats["loss_per_sequence"] * batch.size, rel=1e-4)


def test_clipping_counts_clipped_steps():
    from harness.run.loop import Clipping

    p = torch.nn.Parameter(torch.zeros(3))
    clip = Clipping(1.0)
    for scale in (0.1, 5.0, 2.0, 0.5):
        p.grad = torch.tensor([scale, 0.0, 0.0])
        norm = clip([p])
        assert float(norm) == pytest.approx(scale)                  # the pre-clip norm
        assert float(p.grad.norm()) == pytest.approx(min(scale, 1.0), rel=1e-5)
    assert clip.window_fraction() == 0.5 and clip.clipped == 2
    clip.new_window()
    assert clip.window_fraction() == 0.0
    summary = clip.summary([{"grad_norm": 0.1}, {"grad_norm": 5.0}, {"grad_norm": 2.0}], 4)
    assert summary == {"grad_clip": 1.0, "clipped_fraction": 0.5, "grad_norm_median": 2.0}
    state = clip.state_dict()
    again = Clipping(1.0)
    again.load_state_dict(state)
    assert again.clipped == 2                                       # a resume keeps the count


def _study(**extra):
    base = {"study": "x", "seeds": [0, 1],
            "runs": [{"method": "did", "layout": "varlen"},
                     {"method": "did", "layout": "varlen", "label": "did-F", "match": "flops"},
                     {"method": "did", "layout": "varlen", "label": "did-init", "seeds": [0], "train": {"steps": 0}},
                     {"method": "mdlm", "layout": "varlen", "train": {"lr": 3e-4, "batch_size": 64, "steps": 100}}],
            "train": {"steps": 400, "batch_size": 16}}
    base.update(extra)
    return load_config(base)


def test_run_labels_own_recipes_and_matching():
    runs = {r["name"]: r for r in study_runs(_study())}
    assert set(runs) == {"did-varlen-tiny-s0", "did-F-varlen-tiny-s0", "did-init-varlen-tiny-s0",
                         "mdlm-varlen-tiny-s0", "did-varlen-tiny-s1", "did-F-varlen-tiny-s1", "mdlm-varlen-tiny-s1"}
    assert runs["did-F-varlen-tiny-s0"]["steps"] is None and runs["did-F-varlen-tiny-s0"]["match"] == "flops"
    assert runs["did-init-varlen-tiny-s0"]["steps"] == 0
    assert runs["mdlm-varlen-tiny-s1"]["steps"] == 100 and runs["did-varlen-tiny-s1"]["steps"] == 400
    entry = next(e for e in run_entries(_study()) if e["label"] == "did-F")
    # DID-F is matched to every other trained run of its layout (not to itself, DID-F or the untrained one)
    assert match_targets(_study(), entry) == [
        {"label": "did", "method": "did", "steps": 400, "batch_size": 16, "accumulate": 1, "options": {}},
        {"label": "mdlm", "method": "mdlm", "steps": 100, "batch_size": 64, "accumulate": 1, "options": {}}]


def test_match_to_names_the_targets_and_keeps_the_recipe_when_a_run_joins():
    from harness.core.config import run_settings_hash

    def did_f(cfg):
        return next(e for e in run_entries(cfg) if e["label"] == "did-F")

    base = [{"method": "did", "layout": "varlen"}, {"method": "mdlm", "layout": "varlen"},
            {"method": "did", "layout": "varlen", "label": "did-F", "match": "flops"}]
    before = load_config({"runs": base})
    joined = load_config({"runs": base + [{"method": "ar", "layout": "varlen"}]})
    named = load_config({"runs": base[:2] + [{**base[2], "match_to": ["did", "mdlm"]}, {"method": "ar", "layout": "varlen"}]})
    # a run that joins changes the default targets, hence the recipe; naming the old ones keeps it
    assert run_settings_hash(joined, did_f(joined)) != run_settings_hash(before, did_f(before))
    assert run_settings_hash(named, did_f(named)) == run_settings_hash(before, did_f(before))
    assert [t["label"] for t in match_targets(named, did_f(named))] == ["did", "mdlm"]


@pytest.mark.parametrize("runs, message", [
    ([{"method": "did", "layout": "varlen"}, {"method": "did", "layout": "varlen"}], "give one a label"),
    ([{"method": "did", "layout": "varlen", "label": "mdlm"}], "another method's name"),
    ([{"method": "did", "layout": "varlen", "label": "data"}], "data rows"),
    ([{"method": "did", "layout": "varlen", "train": {"steps": 0}}], "needs a label"),
    ([{"method": "did", "layout": "varlen", "match": "flops", "train": {"steps": 5}}], "match flops sets the steps"),
    ([{"method": "did", "layout": "varlen", "match": "most"}], "is not one of"),
    ([{"method": "did", "layout": "varlen", "match_to": ["did"]}], "only a run with match: flops"),
    ([{"method": "mdlm", "layout": "varlen"}, {"method": "did", "layout": "varlen", "match": "flops",
                                               "match_to": ["ar"]}], "'ar' is not a trained run"),
])
def test_bad_run_entries_are_one_line_errors(runs, message):
    with pytest.raises(UserError, match=message):
        load_config({"runs": runs})


def test_sweep_expands_every_run_on_the_same_sequences():
    cfg = load_config({"seeds": [0], "runs": [{"method": "ar", "layout": "varlen"}],
                       "sweep": {"lr": [1e-3, 3e-4], "batch_size": [16, 64]}, "train": {"steps": 400, "batch_size": 16}})
    runs = {r["label"]: r for r in study_runs(cfg)}
    assert set(runs) == {"ar-lr0.001-b16", "ar-lr0.001-b64", "ar-lr0.0003-b16", "ar-lr0.0003-b64"}
    assert runs["ar-lr0.001-b64"]["steps"] == 100 and runs["ar-lr0.0003-b16"]["steps"] == 400   # 6400 sequences each
    entry = next(e for e in run_entries(cfg) if e["label"] == "ar-lr0.0003-b64")
    assert entry["train"] == {"lr": 3e-4, "batch_size": 64, "steps": 100}


def test_flops_matched_run_trains_to_the_most_expensive_baseline(toy_config, toy_data, tmp_path):
    """DID-F's steps come from the measured FLOPs per step: ceil(target total / own per step), and
    an untrained run (0 steps) is the initial network with its validation bound."""
    from harness.run.loop import train

    cfg = json.loads(json.dumps(toy_config))
    cfg["runs"] = [{"method": "mdlm", "layout": "varlen"},
                   {"method": "did", "layout": "varlen", "label": "did-F", "match": "flops"},
                   {"method": "did", "layout": "varlen", "label": "did-init", "train": {"steps": 0}}]
    cfg["train"].update(steps=2, batch_size=4, valid_sequences=4, valid_mc=1)
    cfg = load_config(cfg)
    mdlm = train(cfg, "mdlm", "varlen", 0, str(toy_data), str(tmp_path / "m"), progress=False)
    did_f = train(cfg, "did-F", "varlen", 0, str(toy_data), str(tmp_path / "f"), progress=False)
    assert did_f["run"] == "did-F-varlen-tiny-s0" and did_f["label"] == "did-F" and did_f["method"] == "did"
    assert did_f["matched_to"] == "mdlm"
    target = mdlm["flops_per_step"] * 2
    assert did_f["matched_flops"] == pytest.approx(target, rel=1e-5)
    # the fewest steps whose FLOPs reach the target (train.json rounds FLOPs to 6 digits)
    assert did_f["steps"] * did_f["flops_per_step"] >= target * (1 - 1e-5)
    assert (did_f["steps"] - 1) * did_f["flops_per_step"] < target * (1 + 1e-5)
    assert did_f["steps"] > 2                                             # MDLM's dense canvas costs more per step
    init = train(cfg, "did-init", "varlen", 0, str(toy_data), str(tmp_path / "i"), progress=False)
    assert init["steps"] == 0 and init["final_loss"] is None and math.isfinite(init["valid_nats_per_token"])
    with pytest.raises(UserError, match="--steps must be an integer from 1"):
        train(cfg, "did", "varlen", 0, str(toy_data), str(tmp_path / "z"), steps=0, progress=False)


def test_plateau_criterion_and_sweep_summary():
    from analysis.convergence import PLATEAU_NATS, last_quarter_improvement
    from analysis.sweep import sweep_summary

    curve = pd.DataFrame({"step": [100, 200, 300, 400], "valid_nats_per_token": [2.0, 1.7, 1.650, 1.645]})
    assert last_quarter_improvement(curve) == pytest.approx(0.005) and 0.005 < PLATEAU_NATS   # 300 -> 400
    falling = curve.assign(valid_nats_per_token=[2.0, 1.8, 1.7, 1.6])
    assert last_quarter_improvement(falling) == pytest.approx(0.1)
    assert math.isnan(last_quarter_improvement(curve.iloc[:1]))
    points = pd.DataFrame({"base_method": ["a"] * 3 + ["b"] * 3, "layout": "varlen",
                           "lr": [1e-3, 3e-3, 1e-2] * 2, "batch_size": 32, "steps": 10, "seed": 0,
                           "valid_nats_per_token": [1.5, 1.4, 1.9, 1.2, 1.21, 1.22], "valid_stderr": 0.01})
    s = sweep_summary(points).set_index("base_method")
    assert s.loc["a", "best_lr"] == 3e-3 and s.loc["a", "median_minus_best"] == pytest.approx(0.1)
    assert s.loc["a", "worst_minus_best"] == pytest.approx(0.5)
    assert s.loc["b", "best_lr"] == 1e-3 and s.loc["b", "worst_minus_best"] == pytest.approx(0.02)


def test_labelled_rows_sort_in_config_order_with_untrained_references_last():
    from analysis.frames import sort_rows

    config = {"runs": [{"method": "did", "layout": "varlen"},
                       {"method": "did", "layout": "varlen", "label": "did-F", "match": "flops"},
                       {"method": "did", "layout": "varlen", "label": "did-init", "train": {"steps": 0}},
                       {"method": "mdlm", "layout": "varlen"}]}
    rows = pd.DataFrame({"method": ["did-init", "mdlm", "data", "did-F", "did"], "layout": "varlen", "size": "tiny"})
    assert list(sort_rows(rows, config)["method"]) == ["did", "did-F", "mdlm", "did-init", "data"]


def test_significance_line_names_the_matching_and_rows_that_have_not_plateaued():
    import analysis
    from analysis.frames import Table

    data = pd.DataFrame({"method": ["mdlm", "ar"], "layout": "varlen", "diff_vs_ref": [-0.2, -1.0],
                         "diff_significant": [True, True], "diff_vs_flops_ref": [0.05, -0.9],
                         "diff_flops_significant": [False, True], "converged": [False, True]})
    line = analysis.significance_line(Table("summary", "Headline results", data, data))
    assert "mdlm (varlen): lower likelihood bound (n.c.)" in line
    assert "ar (varlen): lower likelihood bound vs DID-F." in line      # converged: no n.c.
    assert "mdlm (varlen): lower likelihood bound vs DID-F" not in line and "no verdict rests on it" in line
