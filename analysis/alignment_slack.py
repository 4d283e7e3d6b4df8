"""`python -m analysis.alignment_slack [--out results/alignment-slack] [--max-n 6]`: how loose
FlexMDM's bound is for a PERFECT model (issue 25, spec flexmdm.md 4.4).

FlexMDM's network sees x_t with the absent tokens removed, but its loss is the path KL of the
chain augmented with the alignment (which clean token each present one is). The augmented chain
knows the alignment, the model does not, so even the Bayes-optimal network (`oracle_bound`:
posterior means, computed exactly by enumeration) pays a slack = bound - (-log p(x)) > 0. DID's
bound has none: its states are plain strings, the reverse rates sum over alignments through the
subsequence-count DP, and a path ends at its own x0, so the path KL of the exact model is 0 and its
bound equals -log p(x) (by construction, not measured here).

Writes slack.md and slack.csv: for toy sources whose law is enumerable, the oracle's bound, the
exact NLL and the slack in nats per sequence and per token. Seconds on a laptop.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

from harness.core.atomic import atomic_write_text
from harness.data.storage import load_split
from baselines.flexmdm import marginals, oracle_bound


def _segment_terms(n_hidden: int, m: int, mask_idx, absent_counts) -> float:
    """Oracle loss terms (before the hazard weight) of one segment between two revealed tokens:
    its `m` masks sit at a uniformly random m-subset of its `n_hidden` indices in the oracle's
    eyes (every such placement has the same probability), so the i-th mask's token law is the
    i-th order statistic, C(v-1, i-1) C(N-v, m-i) / C(N, m), and every one of the m + 1 gaps has
    lambda = (N - m) / (m + 1)."""
    total = 0.0
    if m:
        log_norm = math.lgamma(n_hidden + 1) - math.lgamma(m + 1) - math.lgamma(n_hidden - m + 1)
        for i, v in enumerate(mask_idx, start=1):  # v: 1-based index of the true token in the segment
            log_p = (math.lgamma(v) - math.lgamma(i) - math.lgamma(v - i + 1)
                     + math.lgamma(n_hidden - v + 1) - math.lgamma(m - i + 1) - math.lgamma(n_hidden - v - m + i + 1)
                     - log_norm)
            total -= log_p
    lam = (n_hidden - m) / (m + 1)
    for k in absent_counts:
        total += lam - k + (k * math.log(k / lam) if k > 0 else 0.0)
    return total


def single_sequence_slack(n: int, draws: int = 20000, seed: int = 0) -> tuple[float, float]:
    """(slack, standard error) of FlexMDM's oracle bound for one sequence of n tokens, by Monte
    Carlo over (t stratified, clocks), the oracle in closed form (`_segment_terms`): the revealed
    tokens cut the sequence into independent segments. For larger n than enumeration allows; the
    exact `oracle_bound` checks it for small n (tests/test_flexmdm.py)."""
    import random

    rng = random.Random(seed)
    values = []
    for r in range(draws):
        t = min((r + rng.random()) / draws, 1 - 1e-6)
        p_abs, p_mask, _ = marginals(t)
        states = []
        for _ in range(n):
            u = rng.random()
            states.append(0 if u < p_abs else 1 if u < p_abs + p_mask else 2)
        total, seg_hidden, mask_idx, gaps = 0.0, 0, [], [0]
        for s in states + [2]:  # a sentinel "revealed" end closes the last segment
            if s == 2:
                total += _segment_terms(seg_hidden, len(mask_idx), mask_idx, gaps)
                seg_hidden, mask_idx, gaps = 0, [], [0]
                continue
            seg_hidden += 1
            if s == 1:
                mask_idx.append(seg_hidden)
                gaps.append(0)
            else:
                gaps[-1] += 1
        values.append(total / (1 - t))
    mean = sum(values) / draws
    var = sum((v - mean) ** 2 for v in values) / (draws - 1)
    return mean, math.sqrt(var / draws)


def toy_sources(max_n: int) -> list[tuple[str, dict[tuple, float]]]:
    """(name, source) pairs: one sequence of n distinct tokens for n = 1..max_n (spec 4.4's
    check), the same with a repeated token, and a three-sequence source with two orders."""
    out = [(f"one sequence, {n} distinct tokens", {tuple(range(n)): 1.0}) for n in range(1, max_n + 1)]
    out.append(("one sequence 'a a b'", {(0, 0, 1): 1.0}))
    out.append(("{'a b': 0.5, 'b a': 0.3, 'a': 0.2}", {(0, 1): 0.5, (1, 0): 0.3, (0,): 0.2}))
    return out


def slack_rows(max_n: int) -> list[dict]:
    names = "abcdefghij"
    rows = []
    for source_name, source in toy_sources(max_n):
        for x, p in source.items():
            bound, nll = oracle_bound(source, x), -math.log(p)
            rows.append({"source": source_name, "x": " ".join(names[i] for i in x), "n": len(x),
                         "exact_nll": nll, "flexmdm_oracle_bound": bound, "slack": bound - nll,
                         "slack_per_token": (bound - nll) / (len(x) + 1)})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["# FlexMDM's alignment slack: the bound of a perfect model (exact, by enumeration)", "",
             "Nats per sequence; per token divides by n + 1 (the content and the end, as every table). "
             "DID's bound of the exact model equals the exact NLL (slack 0 by construction: its DP sums "
             "over alignments). Command: `python -m analysis.alignment_slack`.", "",
             "| Source | x | n | exact NLL | FlexMDM oracle bound | slack | slack / token |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['source']} | {r['x']} | {r['n']} | {r['exact_nll']:.4f} | {r['flexmdm_oracle_bound']:.4f} "
                     f"| {r['slack']:.4f} | {r['slack_per_token']:.4f} |")
    return "\n".join(lines) + "\n"


def source_slack(data_dir: str, split: str, rows: int, draws: int) -> dict:
    """FlexMDM's oracle slack on the first `rows` rows of a prepared varlen split, in nats per
    predicted token (sum over rows / sum of content + 1, the unit of the ppl and bound-gap tables).

    Uses that the slack of a sequence depends on its length alone (checked exactly on the toy
    sources above: every sequence of n tokens of every source there has the same slack), so it is
    sum_i slack(n_i) over the rows, each slack(n) by `single_sequence_slack`."""
    data = load_split(data_dir, split, "varlen")
    n_rows = min(len(data), rows)
    lengths = [int(v) - 1 for v in data.batch(list(range(n_rows))).lengths.tolist()]
    counts: dict[int, int] = {}
    for n in lengths:
        counts[n] = counts.get(n, 0) + 1
    per_n = {n: single_sequence_slack(n, draws, seed=n) for n in sorted(counts)}
    total = sum(c * per_n[n][0] for n, c in counts.items())
    se = math.sqrt(sum((c * per_n[n][1]) ** 2 for n, c in counts.items()))
    tokens = sum(n + 1 for n in lengths)
    return {"data": data_dir, "split": split, "rows": n_rows, "draws_per_length": draws,
            "slack_nats_per_token": total / tokens, "stderr": se / tokens,
            "slack_by_length": {n: per_n[n][0] for n in sorted(per_n)}}


def source_markdown(res: dict) -> str:
    lines = ["", f"## The source of {res['data']} ({res['split']} split, first {res['rows']} rows: the rows the "
             "ppl and bound-gap tables use)", "",
             f"FlexMDM's oracle slack: **{res['slack_nats_per_token']:.4f} ± {res['stderr']:.4f} nats per token** "
             f"(Monte Carlo, {res['draws_per_length']} draws per length; ± one standard error). A trained FlexMDM's "
             "bound gap (bound - exact NLL) is this slack plus what the model has not learned; DID's is the "
             "model's alone.", "", "| n | slack(n) |", "|---:|---:|"]
    lines += [f"| {n} | {v:.3f} |" for n, v in res["slack_by_length"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.alignment_slack", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/alignment-slack", help="output folder (default: %(default)s)")
    ap.add_argument("--max-n", type=int, default=6, help="longest single sequence (3^n states; default: %(default)s)")
    ap.add_argument("--data", default=None,
                    help="a prepared synthetic data folder (e.g. results/synthetic/data): also the slack of its source")
    ap.add_argument("--split", default="test", help="its split (default: %(default)s)")
    ap.add_argument("--rows", type=int, default=256, help="its first rows, as evaluate.ppl.max_sequences (default: %(default)s)")
    ap.add_argument("--draws", type=int, default=100000, help="Monte Carlo draws per length (default: %(default)s)")
    args = ap.parse_args(argv)
    if not 1 <= args.max_n <= 8:
        ap.error("--max-n must be in 1..8 (the enumeration is 3^n states per sequence)")
    rows = slack_rows(args.max_n)
    text = markdown(rows)
    if args.data:
        res = source_slack(args.data, args.split, args.rows, args.draws)
        text += source_markdown(res)
        (Path(args.out) / "source.json").parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.out) / "source.json", json.dumps(res, indent=1) + "\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "slack.md", text)
    with open(out / "slack.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
