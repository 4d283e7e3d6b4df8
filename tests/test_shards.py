"""Tests for `data.storage: shards` (harness/data/shards.py, harness.data streaming and ShardedTokenData):
the config key and its hash, the per-document split, streaming corpora, identity with the pt
storage, resume after an interruption, damage, and the CLI."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.data.storage import SHARD_DEFAULTS, token_dtype
from harness.data.shards import ShardsInterrupted
from harness.core.config import config_hash as study_hash
from harness.core.config import load_config
from harness.data.manifest import STAMP, load_manifest, load_tokenizer, verify
from harness.data.storage import ShardedTokenData, TokenData, load_split
from harness.data.batches import batch_indices, eval_batches, iter_batches
from harness.data.settings import config_hash, resolve_data_config
from harness.data.corpora import hf_dataset, iter_corpus, iter_hf_dataset, iter_text_files, load_corpus, text_files
from harness.data.prepare import prepare
from harness.data.splits import split_documents, split_of
from harness.core.methods import UserError

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("train", "valid", "test")
LAYOUTS = ("fixed", "varlen")
WORDS = "the of and to a in that is was he for it with as his on be at by had not are but from".split()


def write_corpus(d: Path, n_files: int = 10, per_file: int = 6) -> str:
    """jsonl files (one group each) of documents of varied length, some longer than max_len."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for k in range(n_files):
        with open(d / f"f{k:02d}.jsonl", "w") as fh:
            for i in range(per_file):
                n = int(rng.integers(0, 40))
                text = " ".join(WORDS[j] for j in rng.integers(0, len(WORDS), n))
                fh.write(json.dumps({"text": f"Doc {k}.{i}: {text}."}) + "\n")
    return str(d / "*.jsonl")


def base_cfg(pattern: str, **over) -> dict:
    cfg = {"corpus": {"name": "text-files", "paths": pattern}, "tokenizer": {"kind": "bpe", "vocab_size": 300},
           "seq_len": 16, "max_len": 24, "min_tokens": 3, "valid_fraction": 0.2, "test_fraction": 0.2, "seed": 0}
    cfg.update(over)
    return cfg


def agreeing_seed(cfg: dict) -> int:
    """A split seed for which split_of (shards) and split_documents (pt) split `cfg`'s corpus the
    same way: then both storages must give identical rows."""
    docs = load_corpus(cfg["corpus"])
    for seed in range(500):
        sp = split_documents(docs, cfg["valid_fraction"], cfg["test_fraction"], seed)
        if all(split_of(d.group, seed, cfg["valid_fraction"], cfg["test_fraction"]) == s for s in sp for d in sp[s]):
            return seed
    raise AssertionError("no agreeing seed")


SHARDS = {"kind": "shards", "shard_tokens": 100}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def both(corpus, tmp_path_factory):
    """The same corpus prepared with storage pt and storage shards (many small shards)."""
    cfg = base_cfg(corpus)
    cfg["seed"] = agreeing_seed(cfg)
    root = tmp_path_factory.mktemp("both")
    pt = prepare(cfg, root / "pt")
    sh = prepare({**cfg, "storage": SHARDS}, root / "shards")
    return cfg, root, pt, sh


# --- the config key and the hashes ----------------------------------------------------------------
def test_default_data_config_hash_unchanged():
    # computed with the code before data.storage existed (git 72faac4, harness.data.settings.config_hash and
    # harness.core.config.config_hash): results/ and the workflow's jobs are named by these values
    assert config_hash({}) == "e818473c28813b090c069b3e8352c101e1b982fc45215c80bf50f01231e23117"
    data = load_config({})["data"]  # schema defaults filled in, storage: pt among them
    assert data["storage"] == "pt"
    assert config_hash(data) == "61690402313212d80535cb482786c0a19f7d015f4d1841f7d370f175fff069b8"
    assert study_hash({"data": data}) == "a552288fcbcf"  # the workflow's settings hash of the data section
    assert config_hash({"storage": "pt"}) == config_hash({"storage": {"kind": "pt"}}) == config_hash({})


def test_storage_key_resolves_and_hashes():
    sh = config_hash({"storage": "shards"})
    assert sh != config_hash({})
    # how fast the files are made does not name them; what they hold does
    assert config_hash({"storage": {"kind": "shards", "workers": 3, "batch_documents": 7}}) == sh
    assert config_hash({"storage": {"kind": "shards", "shard_tokens": 1000}}) != sh
    assert config_hash({"storage": {"kind": "shards", "tokenizer_documents": 10}}) != sh
    r = resolve_data_config({"storage": "shards"})["storage"]
    assert r == {"kind": "shards", **SHARD_DEFAULTS}
    assert resolve_data_config({})["storage"] == {"kind": "pt"}
    assert resolve_data_config(resolve_data_config({"storage": "shards"})) == resolve_data_config({"storage": "shards"})


@pytest.mark.parametrize("value, match", [
    ("zarr", "storage.kind must be one of pt, shards"),
    ({"shard_tokens": 100}, "storage.kind must be one of"),
    ({"kind": "pt", "workers": 2}, "apply to kind shards only"),
    ({"kind": "shards", "shard_size": 2}, "unknown data.storage option.*shard_size"),
    ({"kind": "shards", "shard_tokens": 10}, "shard_tokens must be an integer >= 64"),
    ({"kind": "shards", "workers": 0}, "workers must be an integer >= 1"),
    ({"kind": "shards", "batch_documents": True}, "batch_documents must be an integer"),
    (3, "must be 'pt', 'shards' or a mapping"),
])
def test_storage_key_errors(value, match):
    with pytest.raises(UserError, match=match):
        resolve_data_config({"storage": value})


def test_schema_takes_the_storage_key():
    assert load_config({"data": {"storage": "shards"}})["data"]["storage"] == "shards"
    cfg = load_config({"data": {"storage": {"kind": "shards", "workers": 2}}})
    assert cfg["data"]["storage"] == {"kind": "shards", "workers": 2}
    for bad in ("zarr", {"kind": "shards", "bogus": 1}, {"kind": "shards", "shard_tokens": 1}):
        with pytest.raises(UserError, match="data.storage"):
            load_config({"data": {"storage": bad}})


# --- split, streaming corpora ---------------------------------------------------------------------
def test_split_of_is_per_document_with_the_split_documents_order():
    groups = [f"g{i}" for i in range(20000)]
    got = [split_of(g, 7, 0.1, 0.05) for g in groups]
    assert got == [split_of(g, 7, 0.1, 0.05) for g in groups]  # deterministic
    share = {s: got.count(s) / len(groups) for s in SPLITS}
    assert abs(share["test"] - 0.05) < 0.01 and abs(share["valid"] - 0.1) < 0.01
    assert [split_of(g, 8, 0.1, 0.05) for g in groups] != got
    # test takes the groups first in split_documents' order, then valid, then train
    from harness.data.splits import _group_key

    order = sorted(groups, key=lambda g: _group_key(g, 7))
    ranks = {s: [i for i, g in enumerate(order) if split_of(g, 7, 0.1, 0.05) == s] for s in SPLITS}
    assert max(ranks["test"]) < min(ranks["valid"]) and max(ranks["valid"]) < min(ranks["train"])


def test_streaming_text_files_equal_the_loader(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    (d / "a.jsonl").write_bytes(b'{"text": "one"}\r\n\r\n{"text": "tw\\u00f6"}\r{"text": "three"}\n{"text": "four"}')
    (d / "b.txt").write_bytes("line one\r\nline two\rcaf\u00e9\n".encode())
    for group_by in ("file", "document"):
        spec = {"paths": [str(d / "*.jsonl"), str(d / "*.txt")], "group_by": group_by}
        streamed = list(iter_text_files(**spec))
        assert streamed == text_files(**spec) == list(iter_corpus({"name": "text-files", **spec}))
    assert [x.text for x in streamed] == ["one", "tw\u00f6", "three", "four", "line one\nline two\ncaf\u00e9\n"]
    (d / "c.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"c.jsonl: not UTF-8 text \(byte 28: b'\\xe9'\)"):
        list(iter_text_files(str(d / "c.jsonl")))
    (d / "c.jsonl").write_bytes(b'{"text": "ok"}\n{"te\x00xt": 1}\n')
    with pytest.raises(UserError, match="c.jsonl: a binary file \\(NUL byte at character 19\\)"):
        list(iter_text_files(str(d / "c.jsonl")))
    (d / "e.csv").write_text("x")
    with pytest.raises(UserError, match="neither .txt nor .jsonl"):
        next(iter_text_files(str(d / "*")))


def test_streaming_hf_equals_the_loader(tmp_path):
    pytest.importorskip("datasets")
    f = tmp_path / "rows.jsonl"
    f.write_text("".join(json.dumps({"story": f"story {i}", "book": f"b{i % 3}"}) + "\n" for i in range(7)))
    spec = {"dataset": "json", "data_files": str(f), "text_field": "story", "group_field": "book",
            "cache_dir": str(tmp_path / "cache")}
    assert list(iter_hf_dataset(**spec, batch_rows=3)) == hf_dataset(**spec)
    with pytest.raises(UserError, match="no column 'text'"):
        next(iter_hf_dataset(**{**spec, "text_field": "text"}))


# --- shards == pt ---------------------------------------------------------------------------------
def test_shards_give_the_rows_and_batches_of_pt(both):
    cfg, root, pt, sh = both
    assert sh["storage"] == "shards" and sh["shards"]["count"] > 5 and sh["shards"]["dtype"] == "uint16"
    assert sh["split_groups"] == pt["split_groups"] and sh["tokenizer"] == pt["tokenizer"]
    assert sh["corpus_documents"] == pt["corpus_documents"] and sh["corpus_groups"] == pt["corpus_groups"]
    for s in SPLITS:
        a, b = dict(pt["splits"][s]), dict(sh["splits"][s])
        qa, qb = a.pop("document_tokens"), b.pop("document_tokens")
        assert a == b and qa == pytest.approx(qb)
    assert sh["config"]["storage"] == {"kind": "shards", "shard_tokens": 100, "tokenizer_documents": 100_000}
    assert sh["config_hash"] == config_hash({**cfg, "storage": SHARDS}) != pt["config_hash"]
    assert load_tokenizer(root / "pt").vocab == load_tokenizer(root / "shards").vocab
    for s in SPLITS:
        for lay in LAYOUTS:
            x, y = load_split(root / "pt", s, lay), load_split(root / "shards", s, lay)
            assert isinstance(x, TokenData) and isinstance(y, ShardedTokenData)
            assert (len(x), x.num_tokens(), x.max_len, x.layout, x.vocab) == (len(y), y.num_tokens(), y.max_len,
                                                                              y.layout, y.vocab)
            assert torch.equal(x.lengths, y.lengths) and torch.equal(x.offsets, y.offsets)
            for i in (0, len(x) // 2, len(x) - 1):
                assert torch.equal(x.row(i), y.row(i)) and y.row(i).dtype == torch.long
            for step in range(4):
                idx = batch_indices(len(x), 8, seed=3, step=step)
                bx, by = x.batch(idx), y.batch(idx)
                assert torch.equal(bx.x0, by.x0) and torch.equal(bx.lengths, by.lengths) and bx.layout == by.layout
            (_, bx), (_, by) = next(iter_batches(x, 4, seed=1, start_step=5)), next(iter_batches(y, 4, seed=1, start_step=5))
            assert torch.equal(bx.x0, by.x0)
            assert all(torch.equal(p.x0, q.x0) for p, q in zip(eval_batches(x, 5), eval_batches(y, 5)))
            with pytest.raises(IndexError):
                y.row(len(y))
    verify(root / "shards")
    assert not list((root / "shards").rglob("*.tmp"))


def test_shards_do_not_depend_on_workers_or_batches(both, tmp_path):
    cfg, root, _, sh = both
    other = prepare({**cfg, "storage": {**SHARDS, "workers": 2, "batch_documents": 7}}, tmp_path / "w2")
    assert other["files"] == sh["files"] and other["config_hash"] == sh["config_hash"]


def test_gpt2_and_synthetic_corpora_with_shards(tmp_path, both):
    m = prepare({**both[0], "tokenizer": {"kind": "gpt2"}, "storage": SHARDS}, tmp_path / "g")
    assert m["tokenizer"]["name"] == "gpt2" and m["shards"]["dtype"] == "uint16"
    assert token_dtype(50259) == np.uint16 and token_dtype(70000) == np.uint32
    tok = load_tokenizer(tmp_path / "g")
    row = load_split(tmp_path / "g", "train", "varlen").row(0)
    assert tok.decode(row).startswith("Doc ")
    syn = {"corpus": {"name": "synthetic", "source": "dyck", "documents": 300}, "tokenizer": {"kind": "symbols"},
           "seq_len": 32, "max_len": 64, "min_tokens": 1, "storage": {"kind": "shards", "shard_tokens": 500}}
    m = prepare(syn, tmp_path / "s")
    assert "synthetic" in m and m["splits"]["train"]["varlen"]["truncated"] == 0
    assert sum(m["splits"][s]["documents"] for s in SPLITS) == 300
    # max_documents caps the stream before the split
    m = prepare({**syn, "max_documents": 100}, tmp_path / "cap")
    assert sum(m["splits"][s]["documents"] for s in SPLITS) == 100


# --- resume ---------------------------------------------------------------------------------------
def _stats(out: Path) -> dict:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "shards").glob("*.npy")}


def test_interrupted_prepare_resumes_after_the_last_shard(both, tmp_path, capfd):
    cfg, _, _, sh = both
    cfg = {**cfg, "storage": SHARDS}
    out = tmp_path / "data"
    with pytest.raises(ShardsInterrupted):
        prepare(cfg, out, stop_after_shards=3)
    assert not (out / "manifest.json").exists()
    progress = json.loads((out / "shards" / "progress.json").read_text())
    assert len(progress["shards"]) == 3 and not progress["done"]
    before = _stats(out)
    assert len(before) == 3 * 9  # 3 splits x (fixed + varlen tokens + varlen lengths)
    with pytest.raises(UserError, match="prepare"):
        load_split(out, "train", "fixed")  # no manifest: not a data directory yet
    capfd.readouterr()
    with pytest.raises(ShardsInterrupted):  # a second interruption, later on
        prepare(cfg, out, stop_after_shards=2)
    assert "resuming after shard 2" in capfd.readouterr().err
    m = prepare(cfg, out)
    assert "resuming after shard 4" in capfd.readouterr().err
    assert m["files"] == sh["files"] and m["corpus_chain_sha256"] == sh["corpus_chain_sha256"]
    assert m["splits"] == sh["splits"]
    after = _stats(out)
    assert all(after[name] == stat for name, stat in before.items())  # finished shards not rewritten
    verify(out)
    # a finished prepare run again only checks it
    assert prepare(cfg, out) == m and "complete" in capfd.readouterr().err
    assert _stats(out) == after


def test_resume_starts_over_on_damage_or_change(both, tmp_path, capfd):
    cfg, _, _, sh = both
    cfg = {**cfg, "storage": SHARDS}
    out = tmp_path / "data"
    with pytest.raises(ShardsInterrupted):
        prepare(cfg, out, stop_after_shards=2)
    shard = out / "shards" / "train.fixed.00001.npy"
    shard.write_bytes(shard.read_bytes()[:-4] + b"\x00\x00\x00\x00")  # same size, other bytes
    capfd.readouterr()
    assert prepare(cfg, out)["files"] == sh["files"]
    assert "does not match the progress file: starting over" in capfd.readouterr().err
    # another config (a different seq_len) in the same directory: starts over, no stale shard left
    m = prepare({**cfg, "seq_len": 8}, out)
    assert "another config" in capfd.readouterr().err
    assert m["seq_len"] == 8 and load_split(out, "train", "fixed").row(0).numel() == 8
    assert {f"shards/{p.name}" for p in (out / "shards").glob("*.npy")} == {n for n in m["files"] if n.startswith("shards/")}
    # the corpus changed under a finished prepare: its documents no longer hash the same
    corpus_dir = Path(cfg["corpus"]["paths"]).parent
    changed = tmp_path / "changed"
    changed.mkdir()
    for f in sorted(corpus_dir.glob("*.jsonl")):
        (changed / f.name).write_text(f.read_text())
    (changed / "f00.jsonl").write_text((changed / "f00.jsonl").read_text().replace("Doc 0.1", "Doc 0.X"))
    ccfg = {**cfg, "corpus": {"name": "text-files", "paths": str(changed / "*.jsonl")}}
    m1 = prepare(ccfg, tmp_path / "c")
    with pytest.raises(ShardsInterrupted):
        prepare(ccfg, tmp_path / "c2", stop_after_shards=1)
    (changed / "f00.jsonl").write_text((changed / "f00.jsonl").read_text().replace("Doc 0.X", "Doc 0.Y"))
    capfd.readouterr()
    m2 = prepare(ccfg, tmp_path / "c2")
    assert "the corpus differs" in capfd.readouterr().err
    assert m2["corpus_chain_sha256"] != m1["corpus_chain_sha256"]


def test_pt_and_shards_replace_each_other(both, tmp_path):
    cfg = both[0]
    out = tmp_path / "data"
    prepare({**cfg, "storage": SHARDS}, out)
    prepare(cfg, out)
    assert not (out / "shards").exists() and isinstance(load_split(out, "test", "varlen"), TokenData)
    m = prepare({**cfg, "storage": SHARDS}, out)
    assert not list(out.glob("*.pt")) and isinstance(load_split(out, "test", "varlen"), ShardedTokenData)
    assert set(m["files"]) == {str(p.relative_to(out)) for p in out.rglob("*.*")
                               if p.name not in ("manifest.json", "progress.json", STAMP)}


def test_sharded_user_errors(both, tmp_path):
    cfg, root, _, _ = both
    out = tmp_path / "data"
    m = prepare({**cfg, "storage": SHARDS}, out)
    shard = next(e for e in m["shards"]["files"]["valid.varlen"] if e["rows"] > 0)
    (out / shard["file"]).write_bytes(b"garbage")
    with pytest.raises(UserError, match="manifest hash"):
        verify(out)
    with pytest.raises(UserError, match=f"{shard['file']} does not match the sha256 .*prepare"):   # before any use
        load_split(out, "valid", "varlen")
    (out / "shards" / "test.fixed.00000.npy").unlink()
    with pytest.raises(UserError, match="test.fixed.00000.npy is missing: run `python -m harness prepare`"):
        load_split(out, "test", "fixed")
    with pytest.raises(UserError, match="workers apply to data.storage: shards only"):
        prepare(cfg, tmp_path / "pt", workers=2)
    with pytest.raises(UserError, match="split is empty.*hash"):
        prepare({**cfg, "storage": SHARDS, "corpus": {**cfg["corpus"], "paths": str(Path(cfg["corpus"]["paths"]).parent
                                                                                   / "f0[01].jsonl")}}, tmp_path / "few")
    with pytest.raises(UserError, match="too few for one fixed chunk"):
        prepare({**cfg, "storage": SHARDS, "seq_len": 10_000, "max_len": 10_000}, tmp_path / "long")
    with pytest.raises(UserError, match="has no documents"):
        empty = tmp_path / "empty.jsonl"
        empty.write_text("\n")
        prepare({**cfg, "storage": SHARDS, "corpus": {"name": "text-files", "paths": str(empty)}}, tmp_path / "e")


# --- the CLI --------------------------------------------------------------------------------------
def _cli(*args, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "harness", "prepare", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _write_config(path: Path, data: dict) -> Path:
    path.write_text(json.dumps({"study": "shards-test", "data": data}))  # JSON is YAML
    return path


def test_cli_prepare_with_shards(both, tmp_path, capsys):
    from harness.cli import main

    cfg, _, _, sh = both
    conf = _write_config(tmp_path / "c.yaml", {**cfg, "storage": SHARDS})
    assert main(["prepare", "--config", str(conf), "--out", str(tmp_path / "data"), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert f"in {sh['shards']['count']} shard(s): train=" in out
    assert load_manifest(tmp_path / "data")["files"] == sh["files"]
    bad = _write_config(tmp_path / "bad.yaml", {**cfg, "storage": {"kind": "shards", "shard_tokens": 1}})
    assert main(["prepare", "--config", str(bad), "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and "data.storage" in err, err
    pt = _write_config(tmp_path / "pt.yaml", cfg)
    assert main(["prepare", "--config", str(pt), "--out", str(tmp_path / "pt"), "--workers", "2"]) == 2
    assert "workers apply to data.storage: shards only" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_prepare_killed_then_resumed(tmp_path):
    """A real SIGKILL in the middle of a prepare; the rerun resumes and gives the files of an
    uninterrupted prepare."""
    pattern = write_corpus(tmp_path / "corpus", n_files=40, per_file=200)
    cfg = base_cfg(pattern, storage={"kind": "shards", "shard_tokens": 2000}, valid_fraction=0.1, test_fraction=0.1)
    conf = _write_config(tmp_path / "c.yaml", cfg)
    progress = tmp_path / "data" / "shards" / "progress.json"
    proc = _cli("--config", str(conf), "--out", str(tmp_path / "data"), "--quiet")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        try:
            if len(json.loads(progress.read_text())["shards"]) >= 5:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    done = len(json.loads(progress.read_text())["shards"])
    assert done >= 5 and not (tmp_path / "data" / "manifest.json").exists()
    out, err = _cli("--config", str(conf), "--out", str(tmp_path / "data"), "--quiet").communicate(timeout=600)
    assert f"resuming after shard {done - 1}" in err and "prepared" in out, err
    ref = prepare(cfg, tmp_path / "ref")
    assert load_manifest(tmp_path / "data")["files"] == ref["files"]
