"""Tests for harness/data/ and harness/data/tokenizer.py: corpora, split, tokenizers, layouts, batching."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.core.batch import Vocab
from harness.data.corpora import CORPORA, Document, load_corpus, parse_play
from harness.data.storage import TokenData, load_split
from harness.data.batches import batch_indices, eval_batches, iter_batches
from harness.data.prepare import build_fixed, build_varlen, prepare
from harness.data.settings import config_hash
from harness.data.manifest import load_manifest, load_tokenizer, verify
from harness.data.splits import split_documents
from harness.core.methods import UserError
from harness.data.tokenizer import TextTokenizer, build_tokenizer, gpt2_tokenizer, train_bpe

ROOT = Path(__file__).resolve().parents[1]

SAMPLE_TEXT = (
    "To be, or not to be, that is the question:\n"
    "Whether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune,\n"
    "Or to take arms against a sea of troubles\n"
    "And by opposing end them. To die: to sleep;\n"
)
ODD_TEXT = "  Héllo,  wörld!\n\n\ttabs, emoji 😀, <bos> <|endoftext|> and trailing space "


def make_docs(n_groups: int, per_group: int = 3) -> list[Document]:
    return [
        Document(f"g{g}/{i}", f"g{g}", f"text {g} {i}") for g in range(n_groups) for i in range(per_group)
    ]


def write_text_corpus(tmp_path: Path, n_files: int = 6) -> str:
    """Small .txt corpus, one document (and group) per file."""
    d = tmp_path / "corpus"
    d.mkdir()
    for k in range(n_files):
        (d / f"part{k}.txt").write_text((SAMPLE_TEXT + f"Line number {k}.\n") * 4)
    return str(d / "*.txt")


# --- corpora ------------------------------------------------------------------------------------
def test_unknown_corpus_lists_known_ones():
    with pytest.raises(UserError) as e:
        load_corpus({"name": "nope"})
    for name in ("shakespeare", "text-files", "hf"):
        assert name in str(e.value)
    assert set(CORPORA) >= {"shakespeare", "text-files", "hf"}


def test_parse_play_strips_markdown_and_joins_turns():
    md = (
        "# A Play\n\n## ACT I\n\n### SCENE I. A room.\n\n_Enter ANNE and BEN_\n\n"
        "**ANNE**  \nGood morrow,  \nsweet \\--Ben.\n\n"
        "_Exit BEN, and\nothers_\n\n"
        "Now I am alone.\n\n"
        "**BEN**  \n_\\[Within]_  \nI hear thee.\n"
        "**ANNE**  \n[Aside]_  \nHe hears *Music.* me.\n\n"
        "_Exeunt_\n"
    )
    docs = parse_play(md, "a-play")
    assert [d.text for d in docs] == [
        "Good morrow,\nsweet --Ben.\nNow I am alone.",  # the turn continues after the stage direction
        "I hear thee.",
        "He hears me.",  # a speaker line without a blank line before it still starts a turn
    ]
    assert {d.group for d in docs} == {"a-play"}
    assert len({d.id for d in docs}) == 3


def test_shakespeare_corpus_is_clean_speeches():
    docs = load_corpus("shakespeare")
    groups = {d.group for d in docs}
    assert len(groups) >= 30 and "hamlet" in groups
    assert len(docs) > 20_000
    hamlet = [d.text for d in docs if d.group == "hamlet"]
    assert hamlet[0] == "Who's there?"
    markup = sum(any(c in d.text for c in "*_#\\") for d in docs)
    assert markup <= 3  # a couple of typos in the source survive; no systematic Markdown


def test_text_files_txt_and_jsonl(tmp_path):
    pattern = write_text_corpus(tmp_path, n_files=2)
    docs = load_corpus({"name": "text-files", "paths": pattern})
    assert [d.group for d in docs] == ["part0.txt", "part1.txt"]
    assert docs[0].text.startswith("To be, or not")
    jl = tmp_path / "a.jsonl"
    jl.write_text('{"text": "one"}\n\n{"text": "two", "x": 1}\n')
    docs = load_corpus({"name": "text-files", "paths": [str(jl)]})
    assert [d.text for d in docs] == ["one", "two"] and {d.group for d in docs} == {"a.jsonl"}
    docs = load_corpus({"name": "text-files", "paths": [str(jl)], "group_by": "document"})
    assert len({d.group for d in docs}) == 2
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "part0.txt").write_text("same name, other folder")
    docs = load_corpus({"name": "text-files", "paths": [pattern, str(tmp_path / "other" / "*.txt")]})
    assert len({d.group for d in docs}) == 3 and len({d.id for d in docs}) == 3
    with pytest.raises(UserError, match="no file matches"):
        load_corpus({"name": "text-files", "paths": str(tmp_path / "missing*.txt")})
    with pytest.raises(UserError, match="bad options.*bogus"):
        load_corpus({"name": "text-files", "paths": pattern, "bogus": 1})
    with pytest.raises(UserError, match="bad options.*paths"):
        load_corpus({"name": "text-files"})


def test_hf_loader_on_local_jsonl(tmp_path):
    pytest.importorskip("datasets")
    f = tmp_path / "stories.jsonl"
    rows = [{"story": f"Once upon a time {i}.", "book": f"b{i % 3}"} for i in range(7)]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"name": "hf", "dataset": "json", "data_files": str(f), "text_field": "story",
            "group_field": "book", "cache_dir": str(tmp_path / "cache")}
    docs = load_corpus(spec)
    assert [d.text for d in docs] == [r["story"] for r in rows]
    assert [d.group for d in docs] == [r["book"] for r in rows]
    with pytest.raises(UserError, match="no column 'text'"):
        load_corpus({**spec, "text_field": "text"})


def test_hf_hub_name_offline_is_one_clear_error(tmp_path):
    pytest.importorskip("datasets")
    code = (
        "from harness.data.corpora import load_corpus\n"
        "from harness.core.methods import UserError\n"
        "try:\n"
        "    load_corpus({'name': 'hf', 'dataset': 'openwebtext'})\n"
        "except UserError as e:\n"
        "    print('USERERROR', e)\n"
    )
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
           "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    lines = [l for l in out.stdout.splitlines() if l.startswith("USERERROR")]
    assert len(lines) == 1, out.stdout + out.stderr
    assert "dataset 'openwebtext' is not available offline" in lines[0]
    assert "Traceback" not in out.stdout + out.stderr


# --- split --------------------------------------------------------------------------------------
def test_split_is_deterministic_disjoint_and_complete():
    docs = make_docs(20)
    a = split_documents(docs, 0.1, 0.1, seed=7)
    b = split_documents(list(docs), 0.1, 0.1, seed=7)
    assert {k: [d.id for d in v] for k, v in a.items()} == {k: [d.id for d in v] for k, v in b.items()}
    groups = {k: {d.group for d in v} for k, v in a.items()}
    assert not (groups["train"] & groups["valid"] or groups["train"] & groups["test"] or groups["valid"] & groups["test"])
    assert sorted(d.id for v in a.values() for d in v) == sorted(d.id for d in docs)
    assert all(a[s] for s in a)
    # document order inside a split is the corpus order
    order = {d.id: i for i, d in enumerate(docs)}
    assert all([order[d.id] for d in v] == sorted(order[d.id] for d in v) for v in a.values())
    c = split_documents(docs, 0.1, 0.1, seed=8)
    assert {d.group for d in c["test"]} != groups["test"] or {d.group for d in c["valid"]} != groups["valid"]


def test_split_fractions_and_small_cases():
    docs = make_docs(100, per_group=2)
    s = split_documents(docs, 0.1, 0.2, seed=0)
    assert abs(len(s["test"]) - 40) <= 2 and abs(len(s["valid"]) - 20) <= 2
    three = split_documents(make_docs(3), 0.01, 0.01, seed=0)
    assert all(len({d.group for d in three[k]}) == 1 for k in three)
    big = split_documents(make_docs(3), 0.45, 0.45, seed=0)  # fractions too large: still one group left each
    assert all(big[k] for k in big)
    with pytest.raises(UserError, match="at least 3"):
        split_documents(make_docs(2), 0.1, 0.1, seed=0)
    with pytest.raises(UserError):
        split_documents(make_docs(5), 0.6, 0.5, seed=0)
    with pytest.raises(UserError):
        split_documents(make_docs(5), 0.0, 0.1, seed=0)


def test_adding_a_group_moves_few_groups():
    docs = make_docs(40)
    before = split_documents(docs, 0.1, 0.1, seed=3)
    after = split_documents(docs + [Document(f"new/{i}", "new", "x") for i in range(3)], 0.1, 0.1, seed=3)
    where = lambda s: {d.group: k for k, v in s.items() for d in v}
    wb, wa = where(before), where(after)
    moved = [g for g in wb if wb[g] != wa[g]]
    assert len(moved) <= 2


# --- tokenizers ---------------------------------------------------------------------------------
def test_gpt2_ids_and_round_trip(tmp_path):
    tok = gpt2_tokenizer()
    assert tok.encode("Hello world") == [15496, 995]
    v = tok.vocab
    assert (v.size, v.bos, v.eos, v.pad, v.mask) == (50259, 50256, 50256, 50257, 50258)
    for text in (SAMPLE_TEXT, ODD_TEXT):
        assert tok.decode(tok.encode(text)) == text
    assert 50256 not in tok.encode("<|endoftext|>")  # text never produces a special id
    assert tok.decode([v.bos] + tok.encode("Hi") + [v.eos, v.pad]) == "Hi"
    assert tok.decode([v.bos, 17250, v.pad, v.mask], skip_special=False) == "<|endoftext|>Hi<pad><mask>"
    tok.save(tmp_path / "t")
    back = TextTokenizer.load(tmp_path / "t")
    assert back.vocab == v and back.name == "gpt2" and back.encode(ODD_TEXT) == tok.encode(ODD_TEXT)


def test_bpe_round_trip_specials_and_determinism(tmp_path):
    texts = [SAMPLE_TEXT] * 3 + ["Something completely different, said the player."]
    a = train_bpe(texts, 300)
    b = train_bpe(list(texts), 300)
    v = a.vocab
    assert v.size <= 300 and len({v.bos, v.eos, v.pad, v.mask}) == 4 and v.size - 1 in v.specials
    assert a.encode(SAMPLE_TEXT) == b.encode(SAMPLE_TEXT) and a.vocab == b.vocab
    for text in (SAMPLE_TEXT, ODD_TEXT):
        ids = a.encode(text)
        assert a.decode(ids) == text
        assert not set(ids) & set(v.specials)
    assert len(a.encode(SAMPLE_TEXT)) < len(SAMPLE_TEXT.encode())  # merges were learned
    assert a.decode([v.bos] + a.encode("To be") + [v.eos], skip_special=False) == "<bos>To be<eos>"
    a.save(tmp_path / "t")
    back = TextTokenizer.load(tmp_path / "t")
    assert back.vocab == v and back.encode(ODD_TEXT) == a.encode(ODD_TEXT)
    with pytest.raises(UserError):
        train_bpe(texts, 100)
    with pytest.raises(UserError, match="unknown tokenizer kind"):
        build_tokenizer({"kind": "wordpiece"}, texts)


def test_tokenizer_load_errors(tmp_path):
    with pytest.raises(UserError, match="prepare"):
        TextTokenizer.load(tmp_path / "missing")


# --- layouts ------------------------------------------------------------------------------------
V = Vocab(size=12, bos=8, eos=9, pad=10, mask=11)


def test_fixed_layout_hand_worked():
    rows = build_fixed([[1, 2, 3], [4, 5]], V, seq_len=3)
    # stream 1 2 3 EOS 4 5 EOS -> chunks [1 2] [3 EOS] [4 5], the final [EOS] dropped
    assert rows.tolist() == [[8, 1, 2], [8, 3, 9], [8, 4, 5]]
    assert rows.dtype == torch.long
    assert build_fixed([[1]], V, seq_len=5).shape == (0, 5)


def test_varlen_layout_truncation_and_min_tokens():
    tokens, lengths, truncated, dropped = build_varlen([[1, 2, 3, 4, 5], [1], [2, 3], []], V, max_len=4, min_tokens=3)
    assert lengths.tolist() == [4, 3]  # [BOS 1 2 3] (truncated), [BOS 2 3]; [BOS 1] and [BOS] dropped
    assert tokens.tolist() == [8, 1, 2, 3, 8, 2, 3]
    assert (truncated, dropped) == (1, 2)
    assert V.pad not in tokens.tolist()


def test_tokendata_batch_pads_right():
    tokens, lengths, _, _ = build_varlen([[1, 2, 3], [4], [5, 6]], V, max_len=10, min_tokens=1)
    data = TokenData({"layout": "varlen", "vocab": V.to_dict(), "max_len": 10, "tokens": tokens, "lengths": lengths})
    assert len(data) == 3 and data.max_len == 10
    b = data.batch([1, 0])
    assert b.layout == "varlen" and b.lengths.tolist() == [2, 4]
    assert b.x0.tolist() == [[8, 4, 10, 10], [8, 1, 2, 3]]
    fixed = TokenData({"layout": "fixed", "vocab": V.to_dict(), "seq_len": 3,
                       "tokens": build_fixed([[1, 2, 3], [4, 5]], V, 3)})
    fb = fixed.batch([2, 0])
    assert fb.x0.tolist() == [[8, 4, 5], [8, 1, 2]] and fb.lengths.tolist() == [3, 3] and fb.layout == "fixed"
    assert [x.size for x in eval_batches(data, 2)] == [2, 1]
    assert [x.size for x in eval_batches(data, 2, max_sequences=2)] == [2]


# --- batching -----------------------------------------------------------------------------------
def test_batch_indices_deterministic_epochs_and_resume():
    n, bs = 10, 4
    steps = [batch_indices(n, bs, seed=5, step=s) for s in range(5)]
    assert steps == [batch_indices(n, bs, seed=5, step=s) for s in range(5)]
    flat = [i for s in steps for i in s]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))  # each epoch once
    assert flat[:10] != flat[10:20]  # a new permutation per epoch
    assert steps != [batch_indices(n, bs, seed=6, step=s) for s in range(5)]
    # resume: the generator restarted at step 3 yields what a run from scratch yields at step 3
    tokens = build_fixed([[1, 2, 3, 4, 5, 6, 7] * 5], V, seq_len=3)
    data = TokenData({"layout": "fixed", "vocab": V.to_dict(), "seq_len": 3, "tokens": tokens})
    scratch = iter_batches(data, 4, seed=1)
    for _ in range(3):
        next(scratch)
    s3, b3 = next(scratch)
    r3, rb3 = next(iter_batches(data, 4, seed=1, start_step=3))
    assert s3 == r3 == 3 and torch.equal(b3.x0, rb3.x0)


def test_batch_indices_rank_slices():
    n, bs, world = 50, 8, 4
    for step in range(3):
        parts = [batch_indices(n, bs, seed=2, step=step, rank=r, world=world) for r in range(world)]
        assert all(len(p) == bs // world for p in parts)
        assert [i for p in parts for i in p] == batch_indices(n, bs, seed=2, step=step)
        assert len({i for p in parts for i in p}) == bs  # disjoint
    with pytest.raises(UserError):
        batch_indices(n, 6, seed=0, step=0, rank=0, world=4)


# --- prepare, manifest, loading -----------------------------------------------------------------
def small_cfg(pattern: str, **over) -> dict:
    cfg = {
        "corpus": {"name": "text-files", "paths": pattern},
        "tokenizer": {"kind": "bpe", "vocab_size": 300},
        "seq_len": 16, "max_len": 24, "min_tokens": 2,
        "valid_fraction": 0.2, "test_fraction": 0.2, "seed": 0,
    }
    cfg.update(over)
    return cfg


def test_prepare_files_manifest_and_hashes(tmp_path):
    cfg = small_cfg(write_text_corpus(tmp_path))
    out = tmp_path / "data"
    m = prepare(cfg, out)
    assert m == load_manifest(out)
    names = {f"{s}.{l}.pt" for s in ("train", "valid", "test") for l in ("fixed", "varlen")}
    assert names | {"tokenizer/tokenizer.json", "tokenizer/meta.json"} == set(m["files"])
    assert not list(out.rglob("*.tmp"))
    verify(out)
    assert m["config_hash"] == config_hash(cfg) != config_hash({**cfg, "seed": 1})
    assert m["tokenizer"]["vocab"] == load_tokenizer(out).vocab.to_dict()
    for split in ("train", "valid", "test"):
        f = load_split(out, split, "fixed")
        assert f.tokens.shape[1] == 16 and (f.tokens[:, 0] == f.vocab.bos).all()
        assert m["splits"][split]["fixed"]["sequences"] == len(f)
        v = load_split(out, split, "varlen")
        assert v.tokens.numel() == int(v.lengths.sum()) == m["splits"][split]["varlen"]["tokens"]
        assert v.max_len == 24 and int(v.lengths.max()) <= 24 and int(v.lengths.min()) >= 2
        assert (v.tokens == v.vocab.pad).sum() == 0  # packed storage, no padding
        assert (v.tokens[v.offsets[:-1]] == v.vocab.bos).all()
        # every document is longer than max_len here, so all are truncated, and the count says so
        assert m["splits"][split]["varlen"]["truncated"] == m["splits"][split]["documents"]
    # the same config gives byte-identical files
    m2 = prepare(cfg, tmp_path / "again")
    assert m2["files"] == m["files"]
    # a changed file is caught
    (out / "valid.fixed.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match="manifest hash"):
        verify(out)
    with pytest.raises(UserError, match="prepare"):
        load_split(out, "valid", "fixed")


def test_load_errors_mention_prepare(tmp_path):
    for fn in (lambda: load_split(tmp_path, "train", "fixed"), lambda: load_manifest(tmp_path),
               lambda: load_tokenizer(tmp_path)):
        with pytest.raises(UserError, match="prepare"):
            fn()
    with pytest.raises(UserError, match="unknown layout"):
        load_split(tmp_path, "train", "packed")


def test_prepare_user_errors(tmp_path):
    pattern = write_text_corpus(tmp_path)
    with pytest.raises(UserError, match="too few for one fixed chunk"):
        prepare(small_cfg(pattern, seq_len=10_000), tmp_path / "a")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(UserError, match="no documents"):
        prepare(small_cfg(str(empty)), tmp_path / "b")
    with pytest.raises(UserError, match="unknown data key"):
        prepare({**small_cfg(pattern), "seqlen": 3}, tmp_path / "c")


def test_prepare_real_shakespeare_small_bpe(tmp_path):
    torch.set_num_threads(1)
    cfg = {"corpus": {"name": "shakespeare"}, "tokenizer": {"kind": "bpe", "vocab_size": 512},
           "seq_len": 64, "max_len": 64, "min_tokens": 4, "valid_fraction": 0.05, "test_fraction": 0.05,
           "seed": 1234, "max_documents": 3000}
    m = prepare(cfg, tmp_path / "data")
    sp = m["splits"]
    assert m["corpus_groups"] >= 30 and m["tokenizer"]["vocab"]["size"] == 512
    assert 2800 <= sum(sp[s]["documents"] for s in sp) <= 3200
    assert all(sp[s]["fixed"]["sequences"] > 0 and sp[s]["varlen"]["sequences"] > 0 for s in sp)
    groups = m["split_groups"]
    assert not set(groups["train"]) & (set(groups["valid"]) | set(groups["test"]))
    tok = load_tokenizer(tmp_path / "data")
    data = load_split(tmp_path / "data", "valid", "varlen")
    text = tok.decode(data.row(0))
    assert text and tok.decode(tok.encode(text)) == text
    b = data.batch(batch_indices(len(data), 8, seed=0, step=0))
    assert b.x0.shape[0] == 8 and (b.x0[:, 0] == tok.vocab.bos).all()
