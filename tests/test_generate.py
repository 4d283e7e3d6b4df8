"""`python -m harness sample` on micro runs of every method and layout, the help texts of every
subcommand, and the resume line of the training log."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import cli
from harness.run.loop import Preempted, train

REPO = Path(__file__).resolve().parent.parent

#: (method, layout) of every run the sample command is tried on
RUNS = [("did", "varlen"), ("did-fixed", "fixed"), ("mdlm", "varlen"), ("mdlm", "fixed"), ("radd", "varlen"),
        ("radd", "fixed"), ("ilm", "varlen"), ("ar", "varlen"), ("ar", "fixed")]
PROMPTED = [r for r in RUNS if r[0] != "ilm"]
PROMPT = "To be, or not"


def _cfg(toy_config, **train_settings) -> dict:
    cfg = json.loads(json.dumps(toy_config))
    cfg["train"].update(valid_sequences=4, valid_mc=1, **train_settings)
    return cfg


@pytest.fixture(scope="module")
def runs(toy_config, toy_data, tmp_path_factory) -> dict:
    """{(method, layout): run dir} of 1-step micro runs (the sampler is tried, not the model)."""
    root = tmp_path_factory.mktemp("runs")
    cfg = _cfg(toy_config, steps=1)
    out = {}
    for method, layout in RUNS:
        run = root / f"{method}-{layout}"
        train(cfg, method, layout, 0, str(toy_data), str(run), progress=False)
        out[(method, layout)] = run
    return out


def sample(capsys, run, data, *extra) -> tuple[int, str, str]:
    rc = cli.main(["sample", "--run", str(run), "--data", str(data), *[str(a) for a in extra]])
    got = capsys.readouterr()
    return rc, got.out, got.err


def json_rows(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


@pytest.mark.parametrize("method,layout", RUNS, ids=[f"{m}-{lay}" for m, lay in RUNS])
def test_prints_n_texts_and_valid_ids(method, layout, runs, toy_data, capsys):
    from harness.data.manifest import load_tokenizer

    rc, out, err = sample(capsys, runs[(method, layout)], toy_data, "--n", 3, "--steps", 4)
    assert rc == 0, err
    headers = [line for line in out.splitlines() if line.startswith("--- sample ")]
    assert headers == [h for h in headers if h.endswith("tokens) ---")] and len(headers) == 3, out
    assert "sampled 3 from" in err
    rc, out, err = sample(capsys, runs[(method, layout)], toy_data, "--n", 3, "--steps", 4, "--json")
    assert rc == 0, err
    rows = json_rows(out)
    size = load_tokenizer(toy_data).vocab.size
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert all(r["method"] == method and r["layout"] == layout for r in rows)
    assert all(isinstance(t, int) and 0 <= t < size for r in rows for t in r["token_ids"])
    assert all(len(r["token_ids"]) <= 31 for r in rows)   # model length 32, BOS removed


@pytest.mark.parametrize("method,layout", [("did", "varlen"), ("mdlm", "fixed"), ("ar", "varlen")])
def test_same_seed_same_samples(method, layout, runs, toy_data, capsys):
    args = ("--n", 3, "--steps", 4, "--json")
    first = json_rows(sample(capsys, runs[(method, layout)], toy_data, *args, "--seed", 5)[1])
    again = json_rows(sample(capsys, runs[(method, layout)], toy_data, *args, "--seed", 5)[1])
    other = json_rows(sample(capsys, runs[(method, layout)], toy_data, *args, "--seed", 6)[1])
    assert [r["token_ids"] for r in first] == [r["token_ids"] for r in again]
    assert [r["token_ids"] for r in first] != [r["token_ids"] for r in other]


@pytest.mark.parametrize("method,layout", PROMPTED, ids=[f"{m}-{lay}" for m, lay in PROMPTED])
def test_prompt_starts_every_sample(method, layout, runs, toy_data, capsys):
    rc, out, err = sample(capsys, runs[(method, layout)], toy_data, "--n", 2, "--steps", 4, "--json",
                          "--prompt", PROMPT, "--top-p", 0.9)
    assert rc == 0, err
    rows = json_rows(out)
    assert len(rows) == 2
    for r in rows:
        assert r["token_ids"][: len(r["prompt_ids"])] == r["prompt_ids"]
        assert r["text"].startswith(PROMPT)
    rc, out, err = sample(capsys, runs[(method, layout)], toy_data, "--n", 2, "--steps", 4, "--prompt", PROMPT)
    assert rc == 0 and out.count("\n" + PROMPT) == 2, out


def test_fixed_length(runs, toy_data, capsys):
    for key in [("mdlm", "fixed"), ("ar", "fixed"), ("did-fixed", "fixed")]:
        rows = json_rows(sample(capsys, runs[key], toy_data, "--n", 2, "--steps", 4, "--json", "--length", 9)[1])
        assert all(len(r["token_ids"]) <= 8 for r in rows), key
    rc, _, err = sample(capsys, runs[("did", "varlen")], toy_data, "--length", 9)
    assert rc == 2 and err.startswith("error: --length is for fixed-layout runs") and len(err.splitlines()) == 1


def _one_error_line(rc: int, err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and all(n in lines[0] for n in needles), err


def test_user_errors_are_one_line(runs, toy_data, tmp_path, capsys):
    rc, out, err = sample(capsys, runs[("ilm", "varlen")], toy_data, "--prompt", PROMPT)
    _one_error_line(rc, err, "ilm does not support prompts")
    assert out == ""
    rc, _, err = sample(capsys, tmp_path / "nowhere", toy_data)
    _one_error_line(rc, err, "nowhere", "does not exist")
    (tmp_path / "empty").mkdir()
    rc, _, err = sample(capsys, tmp_path / "empty", toy_data)
    _one_error_line(rc, err, "checkpoint.pt")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    rc, _, err = sample(capsys, tmp_path / "broken", toy_data)
    _one_error_line(rc, err, "corrupted")
    rc, _, err = sample(capsys, runs[("did", "varlen")], tmp_path / "nodata")
    _one_error_line(rc, err)
    for bad in (("--top-p", 0), ("--steps", 0), ("--n", 0)):
        rc, _, err = sample(capsys, runs[("mdlm", "varlen")], toy_data, *bad)
        _one_error_line(rc, err, bad[0])


def test_command_line(runs, toy_data):
    """The real entry point: `python -m harness sample`, stdout is the samples, errors one line."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "harness", "sample", "--data", str(toy_data), "--n", "2", "--steps", "4"]
    done = subprocess.run([*cmd, "--run", str(runs[("did", "varlen")]), "--json"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(json_rows(done.stdout)) == 2
    done = subprocess.run([*cmd, "--run", str(runs[("ilm", "varlen")]), "--prompt", "To be"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    _one_error_line(done.returncode, done.stderr, "ilm does not support prompts")


# --------------------------------------------------------------------------- help texts
def _parsers() -> dict[str, argparse.ArgumentParser]:
    """Every argparse parser of `python -m harness` (the subcommands and `evaluate`), by name."""
    from harness import metrics as evaluate

    from harness.metrics import bench, bench_attention

    out = {"python -m harness": cli.build_parser(), "evaluate": evaluate.build_parser(),
           "bench": bench.build_parser(), "bench attention": bench_attention.build_parser()}
    todo = list(out.items())
    while todo:
        name, parser = todo.pop()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helped = {a.dest: a.help for a in action._choices_actions}
                for sub, p in action.choices.items():
                    assert helped.get(sub), f"{name} {sub}: the subcommand has no help text"
                    out[f"{name} {sub}"] = p
                    todo.append((f"{name} {sub}", p))
    return out


def test_every_option_has_a_help_text():
    parsers = _parsers()
    assert {"python -m harness sample", "python -m harness train", "python -m harness cost", "evaluate"} <= set(parsers)
    missing = [f"{name}: {'/'.join(a.option_strings) or a.dest}" for name, p in parsers.items() for a in p._actions
               if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
               and not (a.help and a.help.strip())]
    assert not missing, "options without a help text: " + "; ".join(missing)


def test_help_lists_methods_and_sizes(capsys):
    from harness.core.backbone import SIZES
    from harness.core.methods import available

    texts = {}
    for sub in ("train", "sample"):
        with pytest.raises(SystemExit) as done:
            cli.main([sub, "--help"])
        assert done.value.code == 0
        texts[sub] = " ".join(capsys.readouterr().out.split())
        assert all(m in texts[sub] for m in available()), sub
    assert all(size in texts["train"] for size in SIZES)   # the config's `size` picks one of them


# --------------------------------------------------------------------------- resume
def test_resume_is_logged(toy_config, toy_data, tmp_path, capsys):
    """A run stopped after 2 of 4 steps says "resuming from step 2" when re-run, --quiet included."""
    cfg = _cfg(toy_config, steps=4, checkpoint_every=2)
    with pytest.raises(Preempted):
        train(cfg, "ar", "fixed", 0, str(toy_data), str(tmp_path), progress=False, stop_after=3)
    assert "resuming" not in capsys.readouterr().out
    train(cfg, "ar", "fixed", 0, str(toy_data), str(tmp_path), progress=False)
    assert "ar-fixed-tiny-s0: resuming from step 2" in capsys.readouterr().out
