"""Result JSON schema, provenance and the all-or-nothing writes (harness.core.records)."""
import errno
import json
import math
import os
from pathlib import Path

import pytest

from harness.core import records as results
from harness.core.methods import UserError


def _header():
    return results.provenance({"study": "t", "x": 1}, {"run": "ar-fixed-tiny-s0", "method": "ar", "layout": "fixed",
                                                       "size": "tiny", "seed": 0})


def test_provenance_has_every_header_key():
    h = _header()
    assert set(results.HEADER_KEYS) <= set(h)
    assert h["study"] == "t" and h["run"] == "ar-fixed-tiny-s0" and h["seed"] == 0
    assert h["config_hash"] == results.config_hash({"x": 1, "study": "t"})  # key order does not matter
    assert h["config_hash"] != results.config_hash({"study": "t", "x": 2})
    assert h["versions"]["python"] and "torch" in h["versions"] and "mauve-text" in h["versions"]
    assert h["device"].startswith(("cpu", "cuda"))
    assert "T" in h["created"]


def test_git_commit_unknown_outside_a_repository(tmp_path):
    assert results.git_commit(tmp_path) == "unknown"


def test_write_read_roundtrip_and_nan_to_null(tmp_path):
    path = tmp_path / "sub" / "ppl.json"
    obj = results.write_result(path, "ppl", _header(), {"mc": 8}, {"ppl": 12.5, "stderr": float("nan"),
                                                                  "ci": (1.0, math.inf)})
    back = results.read_result(path, kind="ppl")
    assert back == obj
    assert back["schema"] == "didbench.result/1" and back["kind"] == "ppl"
    assert back["values"] == {"ppl": 12.5, "stderr": None, "ci": [1.0, None]}
    assert back["settings"] == {"mc": 8}
    json.loads(path.read_text())  # strict JSON (no NaN tokens)
    assert os.listdir(path.parent) == ["ppl.json"]


def test_read_result_rejects_wrong_schema_kind_and_garbage(tmp_path):
    p = tmp_path / "x.json"
    p.write_text(json.dumps({"schema": "other/1"}))
    with pytest.raises(UserError, match="not a didbench result"):
        results.read_result(p)
    results.write_result(p, "mauve", _header(), {}, {})
    with pytest.raises(UserError, match="expected 'ppl'"):
        results.read_result(p, kind="ppl")
    p.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        results.read_result(p)
    obj = {"schema": results.SCHEMA, "kind": "ppl"}
    p.write_text(json.dumps(obj))
    with pytest.raises(UserError, match="lacks"):
        results.read_result(p)


def test_header_must_come_from_provenance(tmp_path):
    with pytest.raises(ValueError, match="lacks"):
        results.write_result(tmp_path / "x.json", "ppl", {"study": "t"}, {}, {})


@pytest.mark.parametrize("where", ["fsync", "replace"])
def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch, where):
    target = tmp_path / "ppl.json"
    target.write_text("OLD")

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, where, disk_full)
    with pytest.raises(UserError, match=r"could not write .*ppl\.json: No space left on device"):
        results.write_result(target, "ppl", _header(), {}, {"ppl": 1.0})
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ppl.json"]  # temp file removed
    assert target.read_text() == "OLD"  # the previous result is untouched


def test_failed_first_write_creates_nothing(tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(UserError):
        results.atomic_write_jsonl(tmp_path / "s.jsonl", [{"a": 1}])
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


def test_jsonl_roundtrip(tmp_path):
    rows = [{"a": 1, "t": "é"}, {"a": float("nan")}]
    results.atomic_write_jsonl(tmp_path / "s.jsonl", rows)
    assert results.read_jsonl(tmp_path / "s.jsonl") == [{"a": 1, "t": "é"}, {"a": None}]
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{oops\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2"):
        results.read_jsonl(tmp_path / "bad.jsonl")


def test_compare_results_sees_numbers_and_ignores_provenance_and_timings(tmp_path):
    """scripts/compare_results.py, the before/after check of a refactor."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("compare_results", Path(__file__).parents[1] / "scripts" /
                                                  "compare_results.py")
    cr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cr)
    old, new = tmp_path / "old", tmp_path / "new"
    for d, created, secs, value in ((old, "t0", 1.0, 0.5), (new, "t1", 2.0, 0.5)):
        (d / "runs" / "r" / "eval").mkdir(parents=True)
        (d / "runs" / "r" / "eval" / "ppl.json").write_text(json.dumps(
            {"created": created, "git_commit": created, "values": {"nats_per_token": value, "seconds": secs}}))
    assert cr.main([str(old), str(new)]) == 0
    (new / "runs" / "r" / "eval" / "ppl.json").write_text(json.dumps({"values": {"nats_per_token": 0.6}}))
    (new / "extra.json").write_text("{}")
    assert cr.compare(old, new) == ["differs: runs/r/eval/ppl.json", f"only in {new}: extra.json"]
