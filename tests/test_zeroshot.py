"""The zero-shot suite (harness/data/zeroshot.py, harness/metrics/zeroshot.py): the detokenisers on
hand-worked strings, the loaders on small local files that imitate each set's own format, the
chunking, missing sets, the config section, and `evaluate zeroshot` end to end on a tiny run.
Nothing here reaches the network: the hub path is tried with a stand-in for `datasets`."""
from __future__ import annotations

import json
import math
import sys
import types
from dataclasses import replace

import pytest
import torch
import yaml

from harness.data import zeroshot as zs
from harness.core.config import config_hash, load_config, schema
from harness.core.errors import UserError
from harness.core.settings import ZeroshotSettings


# --- detokenisers ---------------------------------------------------------------------------
@pytest.mark.parametrize("raw, clean", [
    (" = Robert Boulter = \n", " = Robert Boulter =\n"),
    (" = = Career = = \n", " == Career ==\n"),
    (" = = = 2000 – 2005 = = = \n", " === 2000 – 2005 ===\n"),
    (" a 1 @,@ 000 @-@ year @-@ old bridge , 3 @.@ 5 km long . It fell ; then \n",
     " a 1,000-year-old bridge, 3.5 km long. It fell; then\n"),
    (" He was born ( in 1960 ) in [ Leeds ] , and said \" yes \" : no ! why ? ok \n",
     ' He was born (in 1960) in [Leeds], and said "yes": no! why? ok\n'),
    (" the players ' union \n", " the players' union\n"),
    (" Boulter 's role at 20 \u00b0 C \n", " Boulter's role at 20\u00b0C\n"),
    # the lineage's quirk, kept: text between two apostrophes is taken for a quotation
    (" the players ' union and Boulter 's \n", " the players'union and Boulter's\n"),
])
def test_wikitext_detokenizer(raw, clean):
    assert zs.wikitext_detokenizer(raw) == clean


@pytest.mark.parametrize("raw, clean", [
    ("no it was n't black monday", "no it wasn't black monday"),
    ("the company 's shares and the workers ' union", "the company's shares and the workers' union"),
    ("sales rose to $ N million from $ N billion", "sales rose to $1 million from $1 billion"),
    ("the <unk> <unk> plan is n't new", "the <unk> <unk> plan isn't new"),  # <unk> is kept literally
    ("item # N was up N N", "item #1 was up1 N"),   # the lineage's quirk: " N " -> "1 ", one match per pair
])
def test_ptb_detokenizer(raw, clean):
    assert zs.ptb_detokenizer(raw) == clean


@pytest.mark.parametrize("raw, clean", [
    ("They 've said it 's fine , but not here .", "They've said it's fine, but not here."),
    ("See http : / / example.com / page now ? Yes !", "See http://example.com/page now? Yes!"),
    ('He said " no way " ( twice ) at the [ Ritz ] : odd ; fine', 'He said "no way" (twice) at the [Ritz]: odd; fine'),
    ("It cost $ 5 or \u00a3 3 .", "It cost $5 or \u00a33."),
])
def test_lm1b_detokenizer(raw, clean):
    assert zs.lm1b_detokenizer(raw) == clean


def test_lambada_detokenizer_and_none():
    assert zs.lambada_detokenizer("  \u201cHi,\u201d she said.  ") == '\n"Hi," she said.'
    assert zs.detokenize(None, ["a , b"]) == ["a , b"]
    assert zs.detokenize("ptb", ["is n't"]) == ["isn't"]
    with pytest.raises(UserError, match="unknown detokenizer"):
        zs.detokenize("moses", ["x"])
    assert {s.name: s.detokenizer for s in zs.SETS.values()} == {
        "wikitext103": "wikitext", "lambada": "lambada", "pubmed": None, "ag_news": None, "lm1b": "lm1b",
        "arxiv": None, "ptb": "ptb"}


# --- loaders on local files imitating each set's format ---------------------------------------
WIKI = " \n = Robert Boulter = \n \n Robert Boulter is an English actor . \n = = Career = = \n \n In 2000 Boulter had a 1 @,@ 000 @-@ word role . \n"


def test_wikitext_raw_file_gives_the_hub_rows(tmp_path):
    d = tmp_path / "wikitext-103-raw"
    d.mkdir()
    (d / "wiki.test.raw").write_text(WIKI)
    docs, source = zs.load_documents("wikitext103", str(d))
    assert docs == ["", " = Robert Boulter = \n", "", " Robert Boulter is an English actor . \n", " = = Career = = \n",
                    "", " In 2000 Boulter had a 1 @,@ 000 @-@ word role . \n"]
    assert source == str(d)
    jl = tmp_path / "wiki.jsonl"
    jl.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    assert zs.load_documents("wikitext103", str(jl))[0] == docs


def test_ptb_lambada_lm1b_files(tmp_path):
    (tmp_path / "ptb.test.txt").write_text(" no it was n't black monday \n but while the new york stock exchange did n't "
                                           "fall apart friday <unk> N \n\n")
    assert zs.load_documents("ptb", str(tmp_path / "ptb.test.txt"))[0] == [
        "no it was n't black monday", "but while the new york stock exchange did n't fall apart friday <unk> N"]
    lam = tmp_path / "lambada_test.jsonl"
    lam.write_text(json.dumps({"text": "\u201cCome on,\u201d he said. She took the hand"}) + "\n\n"
                   + json.dumps({"text": "second passage"}) + "\n")
    assert zs.load_documents("lambada", str(tmp_path))[0] == ["\u201cCome on,\u201d he said. She took the hand",
                                                              "second passage"]
    shards = tmp_path / "heldout"
    shards.mkdir()
    (shards / "news.en.heldout-00000-of-00050").write_text("The cat sat .\nIt 's raining .\n")
    (shards / "news.en.heldout-00001-of-00050").write_text("\nA third sentence .\n")
    assert zs.load_documents("lm1b", str(shards))[0] == ["The cat sat .", "It 's raining .", "A third sentence ."]


def test_ag_news_csv_and_jsonl(tmp_path):
    (tmp_path / "test.csv").write_text('"3","Fears for T N pension after talks","Unions representing workers, at '
                                       'Turner Newall say"\n"4","The Race is On","Second-quarter results"\n')
    assert zs.load_documents("ag_news", str(tmp_path))[0] == [
        "Fears for T N pension after talks Unions representing workers, at Turner Newall say",
        "The Race is On Second-quarter results"]
    (tmp_path / "h.csv").write_text("Class Index,Title,Description\n1,Head,Body text\n")
    assert zs.load_documents("ag_news", str(tmp_path / "h.csv"))[0] == ["Head Body text"]
    (tmp_path / "a.jsonl").write_text(json.dumps({"title": "T", "description": "D"}) + "\n"
                                      + json.dumps({"text": "T2 D2", "label": 1}) + "\n")
    assert zs.load_documents("ag_news", str(tmp_path / "a.jsonl"))[0] == ["T D", "T2 D2"]


def test_scientific_papers_abstracts(tmp_path):
    (tmp_path / "pubmed.jsonl").write_text(json.dumps({"article": "long body", "abstract": "we study x .\ny holds ."})
                                           + "\n")
    assert zs.load_documents("pubmed", str(tmp_path / "pubmed.jsonl"))[0] == ["we study x .\ny holds ."]
    d = tmp_path / "arxiv-dataset"   # the original release: test.txt of JSON lines, <S> ... </S> sentences
    d.mkdir()
    (d / "test.txt").write_text(json.dumps({"article_id": "1", "abstract_text": ["<S> we prove a bound . </S>",
                                                                                 "<S> it is tight . </S>"]}) + "\n")
    assert zs.load_documents("arxiv", str(d))[0] == ["we prove a bound .\nit is tight ."]


def test_bad_local_files_are_one_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: not valid JSON"):
        zs.load_documents("lambada", str(tmp_path / "bad.jsonl"))
    (tmp_path / "p.jsonl").write_text(json.dumps({"title": "x"}) + "\n")
    with pytest.raises(UserError, match=r"p.jsonl:1: no 'abstract' string"):
        zs.load_documents("pubmed", str(tmp_path / "p.jsonl"))
    with pytest.raises(UserError, match="holds none of wiki.test.raw"):
        zs.load_documents("wikitext103", str(tmp_path))
    with pytest.raises(UserError, match="unknown zero-shot set 'c4'"):
        zs.load_documents("c4", None)


# --- the hub path, with a stand-in for `datasets` ---------------------------------------------
class _FakeDataset:
    column_names = ["sentence", "id"]

    def __getitem__(self, key):
        return ["a b", None] if key == "sentence" else [0, 1]


def _fake_datasets(monkeypatch, load):
    mod = types.SimpleNamespace(load_dataset=load, disable_progress_bars=lambda: None)
    monkeypatch.setitem(sys.modules, "datasets", mod)


def test_hub_documents_use_the_source_and_its_override(monkeypatch):
    calls = []

    def load(name, config, **kwargs):
        calls.append((name, config, kwargs))
        return _FakeDataset()

    _fake_datasets(monkeypatch, load)
    docs, source = zs.load_documents("ptb")
    assert docs == ["a b", ""]
    assert calls[-1] == ("ptb-text-only/ptb_text_only", "penn_treebank", {"split": "test", "revision": "refs/convert/parquet"})
    assert source == "ptb-text-only/ptb_text_only/penn_treebank:test@refs/convert/parquet"
    zs.load_documents("ptb", hub={"dataset": "me/ptb", "config": None, "revision": None})
    assert calls[-1] == ("me/ptb", None, {"split": "test"})
    with pytest.raises(UserError, match="has no column 'text'"):
        zs.load_documents("ptb", hub={"field": "text"})
    with pytest.raises(UserError, match="unknown key"):
        zs.hub_source("ptb", {"name": "x"})


def test_offline_hub_set_is_one_line_in_missing(monkeypatch, toy_data):
    def load(name, config, **kwargs):
        raise ConnectionError("Couldn't reach 'Salesforce/wikitext' on the Hub (LocalEntryNotFoundError)")

    _fake_datasets(monkeypatch, load)
    from harness.data.manifest import load_tokenizer

    lines = []
    settings = ZeroshotSettings(datasets=["wikitext103", "ptb"], files={"ptb": "/no/such/ptb.test.txt"})
    out = zs.prepare_sets(settings, load_tokenizer(toy_data), 32, log=lines.append)
    assert out["datasets"] == {} and set(out["missing"]) == {"wikitext103", "ptb"}
    assert out["missing"]["wikitext103"].startswith("Salesforce/wikitext/wikitext-103-raw-v1:test is not available "
                                                    "offline (ConnectionError: Couldn't reach")
    assert out["missing"]["ptb"] == "no such file or directory: /no/such/ptb.test.txt"
    assert len(lines) == 2 and all("\n" not in line and line.startswith("zeroshot: ") for line in lines)
    with pytest.raises(UserError, match=r"zero-shot set wikitext103 is required .* not available offline"):
        zs.prepare_sets(replace(settings, required=True), load_tokenizer(toy_data), 32, log=lines.append)


# --- chunking ----------------------------------------------------------------------------------
def test_chunking_is_the_study_fixed_layout(toy_data, tmp_path):
    from harness.data.prepare import build_fixed
    from harness.data.manifest import load_tokenizer

    tok = load_tokenizer(toy_data)
    docs = [" = = Act one = = \n", "", " To be , or not to be @-@ that is the question . \n"] * 6
    rows, content = zs.chunk(docs, tok, 16, "wikitext")
    encoded = [tok.encode(zs.wikitext_detokenizer(d)) for d in docs]
    assert content == sum(map(len, encoded))
    assert torch.equal(rows, build_fixed(encoded, tok.vocab, 16))
    stream = [t for e in encoded for t in e + [tok.vocab.eos]]
    assert rows.shape == (len(stream) // 15, 16) and (rows[:, 0] == tok.vocab.bos).all()
    assert rows[:, 1:].reshape(-1).tolist() == stream[: rows.shape[0] * 15]
    # a set too short for one row is missing, with the reason
    (tmp_path / "ptb.test.txt").write_text("a b\n")
    out = zs.prepare_sets(ZeroshotSettings(datasets=["ptb"], files={"ptb": str(tmp_path / "ptb.test.txt")}),
                          tok, 512, log=lambda line: None)
    assert "too few for one row of seq_len=512" in out["missing"]["ptb"]


# --- the config section ------------------------------------------------------------------------
def test_config_section_defaults_and_hash():
    cfg = load_config({})
    section = schema()["properties"]["evaluate"]["properties"]["zeroshot"]
    assert cfg["evaluate"]["zeroshot"] == ZeroshotSettings().as_dict() == zs.settings_of({}).as_dict()
    assert section["properties"]["datasets"]["items"]["enum"] == list(zs.SETS)
    # at its defaults the section is out of the hash: every existing study keeps its hash
    without = json.loads(json.dumps(cfg))
    del without["evaluate"]["zeroshot"]
    assert config_hash(cfg) == config_hash(without)
    asked = load_config({"evaluate": {"zeroshot": {"datasets": ["ptb"]}}})
    assert asked["evaluate"]["zeroshot"]["mc"] == 8 and config_hash(asked) != config_hash(cfg)
    with pytest.raises(UserError, match="evaluate.zeroshot.datasets\\[0\\]: 'c4' is not one of"):
        load_config({"evaluate": {"zeroshot": {"datasets": ["c4"]}}})
    with pytest.raises(UserError, match="evaluate.zeroshot.files.c4: unknown key"):
        load_config({"evaluate": {"zeroshot": {"files": {"c4": "x"}}}})
    with pytest.raises(UserError, match="zero-shot test sets are real text"):
        load_config({"data": {"corpus": {"name": "synthetic", "source": "dyck"}, "tokenizer": {"kind": "symbols"}},
                     "evaluate": {"zeroshot": {"datasets": ["ptb"]}}})


# --- evaluate zeroshot end to end ---------------------------------------------------------------
def _write_sets(tmp_path) -> dict:
    wiki = tmp_path / "wiki.test.raw"
    wiki.write_text(WIKI * 4)
    ptb = tmp_path / "ptb.test.txt"
    ptb.write_text(" to be or not to be that is the question N \n whether 't is nobler in the <unk> \n" * 6)
    return {"wikitext103": str(wiki), "ptb": str(ptb), "lambada": str(tmp_path / "absent.jsonl")}


@pytest.fixture(scope="module")
def fixed_run(toy_config, toy_data, tmp_path_factory):
    from harness.run.loop import train

    root = tmp_path_factory.mktemp("zs")
    cfg = json.loads(json.dumps(toy_config))
    cfg["train"].update(steps=1, valid_sequences=4, valid_mc=1)
    cfg["evaluate"]["zeroshot"] = {**ZeroshotSettings().as_dict(), "datasets": ["wikitext103", "ptb", "lambada"],
                                   "files": _write_sets(root), "mc": 2, "max_sequences": 3, "batch_size": 2}
    cfg_path = root / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    run = root / "runs" / "mdlm-fixed-tiny-s0"
    train(cfg, "mdlm", "fixed", 0, str(toy_data), str(run), progress=False)
    return {"cfg": cfg, "cfg_path": cfg_path, "run": run, "root": root}


def test_evaluate_zeroshot_end_to_end(fixed_run, toy_data, capsys):
    from harness import cli
    from harness.data.storage import TokenData
    from harness.data.batches import eval_batches
    from harness.core.bounds import evaluate_ppl
    from harness.core.records import read_result
    from harness.run.recipe import load_run
    from harness.results.study import check_results, load_study

    sets = fixed_run["root"] / "zeroshot" / "sets.pt"
    assert cli.main(["evaluate", "zeroshot-data", "--config", str(fixed_run["cfg_path"]), "--data", str(toy_data),
                     "--out", str(sets)]) == 0
    summary = json.loads(sets.with_suffix(".json").read_text())
    assert set(summary["datasets"]) == {"wikitext103", "ptb"} and set(summary["missing"]) == {"lambada"}
    assert summary["datasets"]["ptb"]["detokenizer"] == "ptb" and summary["datasets"]["ptb"]["documents"] == 12
    out = fixed_run["run"] / "eval" / "zeroshot.json"
    assert cli.main(["evaluate", "zeroshot", "--config", str(fixed_run["cfg_path"]), "--run", str(fixed_run["run"]),
                     "--data", str(toy_data), "--sets", str(sets), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "zeroshot: lambada missing: no such file or directory" in printed
    result = read_result(out, "zeroshot")
    assert result["run"] == "mdlm-fixed-tiny-s0" and result["method"] == "mdlm" and result["layout"] == "fixed"
    v = result["values"]
    assert v["datasets_requested"] == ["wikitext103", "ptb", "lambada"]
    assert list(v["missing"]) == ["lambada"] and "\n" not in v["missing"]["lambada"]
    ppl_keys = {"nats_per_token", "ppl", "stderr", "per_sequence_mean", "n_sequences", "n_tokens", "convention",
                "omits", "paper_convention", "conventions", "seconds"}
    for name in ("wikitext103", "ptb"):
        d = v["datasets"][name]
        assert ppl_keys | {"source", "documents", "detokenizer", "rows_available"} == set(d)
        assert d["n_sequences"] == min(3, d["rows_available"]) and d["n_tokens"] == 31 * d["n_sequences"]
        assert d["convention"] == "strict" and d["ppl"] == pytest.approx(math.exp(d["nats_per_token"]))
        pc = d["paper_convention"]
        assert pc["divided_by_seq_len"]["nats_per_token"] == pytest.approx(pc["nats_per_token"] * 31 / 32)
    assert v["datasets"]["ptb"]["source"].endswith("ptb.test.txt")
    # the numbers are harness.metrics.ppl's on the same rows with the same seed
    prepared = torch.load(sets, weights_only=True)
    loaded = load_run(str(fixed_run["run"]), data_dir=str(toy_data))
    rows = prepared["datasets"]["wikitext103"]["tokens"].long()
    data = TokenData({"layout": "fixed", "vocab": loaded.method.vocab.to_dict(), "tokens": rows, "seq_len": 32})
    again = evaluate_ppl(loaded.method, list(eval_batches(data, 2, 3)), mc=2, seed=0)
    assert again["nats_per_token"] == pytest.approx(v["datasets"]["wikitext103"]["nats_per_token"], rel=1e-9)
    # the study loader and the report's strict check read it
    assert check_results(fixed_run["root"]) >= 1
    frame = load_study(fixed_run["root"]).zeroshot
    assert set(frame["dataset"]) == {"wikitext103", "ptb", "lambada"}
    assert frame.set_index("dataset").loc["lambada", "reason"].startswith("no such file")


def test_evaluate_zeroshot_refuses_what_it_cannot_score(fixed_run, toy_config, toy_data, tmp_path):
    from harness.metrics import zeroshot as ev

    args = types.SimpleNamespace(run=str(fixed_run["run"]), data=str(toy_data), out=str(tmp_path / "z.json"),
                                 device="cpu", no_ema=False, sets=str(tmp_path / "nope.pt"))
    with pytest.raises(UserError, match="prepared zero-shot sets .* are missing"):
        ev.run(args, fixed_run["cfg"])
    required = json.loads(json.dumps(fixed_run["cfg"]))
    required["evaluate"]["zeroshot"]["required"] = True
    args.sets = None            # prepared in the process: the absent lambada file is now an error
    with pytest.raises(UserError, match="zero-shot set lambada is required"):
        ev.run(args, required)
