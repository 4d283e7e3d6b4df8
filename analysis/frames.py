"""What every table shares: the `Table` type, number formatting, seed aggregation, the
reference rows, and writing CSV (full precision), Markdown, LaTeX (by hand, `booktabs`) and HTML
(the report's page for the table, the CSV inside it as a download).

A missing value is an empty CSV cell and "–" in Markdown/LaTeX/HTML.
"""
from __future__ import annotations

import base64
import html
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from harness.core import methods
from harness.core.atomic import atomic_write_text
from harness.results.study import GROUP, Study
from analysis import convergence


DASH = "–"


@dataclass
class Table:
    """One table: `data` (numbers, tidy) goes to CSV, `display` (strings) to Markdown/LaTeX."""

    name: str
    title: str
    data: pd.DataFrame
    display: pd.DataFrame
    notes: list[str] = field(default_factory=list)


def missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA


def fmt(v, kind: str = "auto") -> str:
    """A number for humans: about 4 significant digits, integers as integers, "–" when missing."""
    if missing(v):
        return DASH
    if isinstance(v, str):
        return v
    v = float(v)
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if kind == "sci":
        return f"{v:.3g}"
    if kind == "ratio":
        return f"{v:.2f}×"
    if abs(v) >= 1e9 and kind != "int":   # an untrained model's PPL: digits beyond 4 carry nothing
        return f"{v:.3g}"
    if v.is_integer() and (kind == "int" or abs(v) >= 1000):   # counts; a seed-mean may not be whole
        return f"{v:.0f}"
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 1000:
        return f"{v:.0f}"
    if a >= 100:
        return f"{v:.1f}"
    if a >= 10:
        return f"{v:.2f}"
    if a >= 0.001:
        return f"{v:.3f}"
    return f"{v:.2e}"


def pm(mean, err, kind: str = "auto") -> str:
    """"mean ± err", or just the mean when there is no uncertainty."""
    if missing(mean):
        return DASH
    return fmt(mean, kind) if missing(err) else f"{fmt(mean, kind)} ± {fmt(err, kind)}"


def ci_text(lo, hi) -> str:
    return DASH if missing(lo) or missing(hi) else f"[{fmt(lo)}, {fmt(hi)}]"


def reference_note(ref: dict) -> str:
    """The sentence naming each layout's reference method, for a table's notes."""
    return "Reference (\"DID\") per layout: " + ", ".join(f"{m} for {lay}" for lay, m in sorted(ref.items())) + "."


def reference_methods() -> dict[str, str]:
    """Which method is "DID" (the ratio denominator) for each layout: the registry's
    (`Method.reference_in`)."""
    return methods.reference_methods()


def aggregate(df: pd.DataFrame, keys: list[str], cols: list[str], keep: tuple[str, ...] = ()) -> pd.DataFrame:
    """Mean over seeds of `cols` per `keys`, with `<col>_sd` (NaN for one seed) and `n_seeds`.

    `keep` columns (per-run uncertainties such as a CI) survive only when a group has one seed:
    with several seeds the spread over seeds replaces them.
    """
    ordered = keys + ["n_seeds"] + [x for c in cols for x in (c, f"{c}_sd")] + list(keep) + ["nonfinite"]
    if df.empty:
        return pd.DataFrame({c: pd.Series(dtype=object if c in keys else float) for c in ordered})
    df = df.assign(**{c: np.nan for c in [*cols, *keep] if c not in df.columns})   # absent metric: all missing
    g = df.groupby(keys, dropna=False, sort=False)
    # a seed without the value (a non-finite bound, a failed metric) makes the mean missing, never
    # the mean of the other seeds under the same "n seeds" (inf stays inf)
    out = g[cols].agg(lambda v: v.mean() if v.notna().all() else np.nan)
    sd = g[cols].agg(lambda v: v.std(ddof=1) if v.notna().all() else np.nan).add_suffix("_sd")
    n = g["seed"].nunique(dropna=False).rename("n_seeds") if "seed" in df.columns else g.size().rename("n_seeds")
    bad = (g["nonfinite"].agg(lambda v: bool(v.fillna(False).astype(bool).any())) if "nonfinite" in df.columns
           else pd.Series(False, index=n.index)).rename("nonfinite")
    parts = [n, out, sd, bad]
    kept = list(keep)
    if kept:
        first = g[kept].first()
        first[n > 1] = np.nan
        parts.append(first)
    res = pd.concat(parts, axis=1).reset_index()
    return res[ordered]


def sort_rows(df: pd.DataFrame, config: dict | None) -> pd.DataFrame:
    """Rows in the config's `runs` order (label, layout); untrained reference runs (`train: {steps:
    0}`) after the trained rows of their layout, data rows last."""
    if df.empty:
        return df
    entries = [r for r in (config or {}).get("runs") or [] if isinstance(r, dict)]
    order = [(r.get("label") or r.get("method"), r.get("layout")) for r in entries]
    untrained = {k for k, r in zip(order, entries) if isinstance(r.get("train"), dict) and r["train"].get("steps") == 0}
    layouts = list(dict.fromkeys([lay for _, lay in order] + sorted(df["layout"].dropna().astype(str).unique())))
    rank = {k: i for i, k in enumerate(order)}

    def key(row):
        method, layout = row.get("method"), row.get("layout")
        is_data = method == "data"
        return (layouts.index(layout) if layout in layouts else len(layouts), is_data,
                (method, layout) in untrained, rank.get((method, layout), len(rank)), str(method), str(row.get("size")),
                row.get("steps", 0) if not missing(row.get("steps", 0)) else 0)

    keys = [key(r) for r in df.to_dict("records")]
    idx = sorted(range(len(df)), key=lambda i: keys[i])
    return df.iloc[idx].reset_index(drop=True)


def add_ratio(agg: pd.DataFrame, col: str, ref: dict[str, str], match: tuple[str, ...] = ()) -> pd.Series:
    """`col` divided by the reference method's `col` (same layout, size and `match` columns)."""
    out = pd.Series(np.nan, index=agg.index, dtype=float)
    if agg.empty or col not in agg.columns:
        return out
    keys = ["layout", "size", *match]
    refs = agg[agg.apply(lambda r: ref.get(r["layout"]) == r["method"], axis=1)]
    lookup = {tuple(r[k] for k in keys): r[col] for r in refs.to_dict("records")}
    for i, r in agg.iterrows():
        denom = lookup.get(tuple(r[k] for k in keys), np.nan)
        if not missing(denom) and denom != 0 and not missing(r[col]):
            out[i] = r[col] / denom
    return out


def data_rows(df: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    """One reference ("data") row per layout: the real-data statistics every run recorded.

    Runs of one layout share the data split, so their data rows agree; the mean over runs
    is shown (and equals each of them).
    """
    if df.empty:
        return pd.DataFrame({c: pd.Series(dtype=float) for c in cols}).assign(method="data", layout="", size="")
    df = df.assign(**{c: np.nan for c in cols if c not in df.columns})
    res = df.groupby("layout", sort=False)[cols].mean().reset_index()
    return res.assign(method="data", size="")


def stack_frames(config, *frames: pd.DataFrame) -> pd.DataFrame:
    """Rows of all frames (model rows and data rows) in table order; columns are the union."""
    frames = [f for f in frames if len(f)] or [frames[0]]
    out = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0].copy()
    return sort_rows(out, config)


def ensure_columns(df: pd.DataFrame, cols) -> pd.DataFrame:
    return df.assign(**{c: np.nan for c in cols if c not in df.columns})


def ident_display(df: pd.DataFrame, steps: bool = False, facts: pd.DataFrame | None = None) -> dict:
    """The identity columns of a table's rows; with `facts` (analysis.convergence.run_facts) also
    how each row was trained: its budget (steps x batch), its matching (DID-S / DID-F) and whether
    its validation curve plateaued, so no number is read without them (issue 23)."""
    bad = df["nonfinite"].fillna(False).astype(bool).tolist() if "nonfinite" in df.columns else [False] * len(df)
    cols = {"Method": [f"{m} (non-finite!)" if b else str(m) for m, b in zip(df["method"], bad)],
            "Layout": df["layout"].astype(str), "Size": df["size"].fillna("").astype(str)}
    if facts is not None:
        f = df[GROUP].merge(facts, on=GROUP, how="left") if len(df) else pd.DataFrame(columns=list(facts.columns))
        is_data = (df["method"] == "data").to_numpy() if len(df) else np.array([], bool)
        for col, label in (("budget", "Steps x batch"), ("matching", "Matching"), ("plateau_text", "Plateau")):
            cols[label] = ["" if d else (DASH if missing(v) else str(v)) for v, d in zip(f[col], is_data)]
    if steps:
        cols["Sampling steps" if facts is not None else "Steps"] = df["steps"].map(lambda s: fmt(s, "int"))
    return cols


def facts_of(study: Study, config: dict | None) -> pd.DataFrame:
    """analysis.convergence.run_facts with this study's references."""
    return convergence.run_facts(study, reference_methods())


def with_facts(data: pd.DataFrame, facts: pd.DataFrame) -> pd.DataFrame:
    """A table's CSV numbers with each row's matching, budget and plateau columns appended."""
    extra = facts[GROUP + ["matching", "budget", "plateau_text", "converged"]].rename(columns={"plateau_text": "plateau"})
    if data.empty or "method" not in data.columns:
        return data.assign(**{c: pd.Series(dtype=object) for c in extra.columns if c not in data.columns})
    return data.merge(extra, on=GROUP, how="left")


def display_columns(df: pd.DataFrame, cols: dict) -> pd.DataFrame:
    return pd.DataFrame({k: list(v) for k, v in cols.items()}, index=range(len(df)))


def pm_column(df: pd.DataFrame, col: str, err: str | None = None, kind: str = "auto") -> list[str]:
    """"mean ± sd" per row (`err` names another uncertainty column)."""
    return [pm(r[col], r[err or f"{col}_sd"], kind) for r in df.to_dict("records")]


def fmt_column(df: pd.DataFrame, col: str, kind: str = "auto") -> list[str]:
    return [fmt(v, kind) for v in df[col]]


def error_of(row, col: str, file_err: str | None = None):
    """The uncertainty shown next to `col`: sd over seeds, else the file's own (e.g. stderr)."""
    sd = row.get(f"{col}_sd")
    if not missing(sd):
        return sd
    return row.get(file_err) if file_err else np.nan


def steps_columns(cols: list[str]) -> list[str]:
    return ["method", "layout", "size", "steps", "n_seeds"] + [x for c in cols for x in (c, f"{c}_sd")]


def row_key(row) -> tuple:
    return tuple(row[k] for k in GROUP)


def reference_key(row, ref: dict) -> tuple | None:
    method = ref.get(row["layout"])
    return (method, row["layout"], row["size"]) if method and method != row["method"] else None


def runs_of(frame: pd.DataFrame, key: tuple) -> pd.DataFrame:
    return frame[(frame["method"] == key[0]) & (frame["layout"] == key[1]) & (frame["size"] == key[2])] \
        if len(frame) else frame


def to_markdown(table: Table, heading: str = "###") -> str:
    d = table.display
    cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")
    lines = [f"{heading} {table.title}", ""]
    if d.empty:
        lines.append("_No results for this table in this study._")
    else:
        lines.append("| " + " | ".join(cell(c) for c in d.columns) + " |")
        lines.append("|" + "|".join("---" if i < 3 else "---:" for i in range(len(d.columns))) + "|")
        lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in d.itertuples(index=False)]
    lines += [""] + [f"*{n}*" for n in table.notes]
    return "\n".join(lines) + "\n"


TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "–": "--",
        "×": r"$\times$", "≤": r"$\le$", "†": r"\textsuperscript{\dag}", "‡": r"\textsuperscript{\ddag}", "→": r"$\to$"}


def tex_escape(s) -> str:
    return "".join(TEX_ESCAPES.get(ch, ch) for ch in str(s))


def to_latex(table: Table) -> str:
    d = table.display
    lines = [f"% {table.title}", "% generated by `python -m analysis`; needs \\usepackage{booktabs}"]
    if d.empty:
        return "\n".join(lines + ["% no results for this table in this study"]) + "\n"
    align = "".join("l" if i < 3 else "r" for i in range(len(d.columns)))
    lines += [f"\\begin{{tabular}}{{{align}}}", "\\toprule",
              " & ".join(tex_escape(c) for c in d.columns) + r" \\", "\\midrule"]
    lines += [" & ".join(tex_escape(v) for v in row) + r" \\" for row in d.itertuples(index=False)]
    lines += ["\\bottomrule", "\\end{tabular}"] + [f"% {n}" for n in table.notes]
    return "\n".join(lines) + "\n"


#: the HTML tables' look, scoped to their class (the report's page has its own styles)
HTML_STYLE = ("<style>table.didbench{border-collapse:collapse;font:13px/1.35 system-ui,sans-serif;margin:.4em 0}"
              "table.didbench th,table.didbench td{border-bottom:1px solid #ddd;padding:3px 8px;text-align:right;"
              "white-space:nowrap}table.didbench th{background:#f4f4f4;border-bottom:2px solid #999}"
              "table.didbench td:nth-child(-n+3),table.didbench th:nth-child(-n+3){text-align:left}"
              "div.didbench p{font:13px/1.4 system-ui,sans-serif;max-width:70em;margin:.3em 0}"
              "div.didbench div.scroll{overflow-x:auto;max-width:100%}</style>")


def _inline_markdown(text: str) -> str:
    """A note's **bold** and *italic* as HTML (the notes and the significance line are Markdown)."""
    out = html.escape(text)
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    return re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"<em>\1</em>", out)


def to_html(table: Table, extra: str = "") -> str:
    """The table as an HTML fragment the report shows in its page: title, the display table, the
    notes (and `extra`, e.g. the significance line), and the full-precision CSV as a download."""
    d = table.display
    body = ("<p><em>No results for this table in this study.</em></p>" if d.empty else
            '<div class="scroll">' + d.to_html(index=False, escape=True, border=0, classes="didbench", na_rep=DASH)
            + "</div>")
    csv = table.data.to_csv(index=False, na_rep="")
    uri = "data:text/csv;base64," + base64.b64encode(csv.encode("utf-8")).decode("ascii")
    notes = "".join(f"<p>{_inline_markdown(n)}</p>" for n in ([extra] if extra else []) + list(table.notes))
    return (f'<div class="didbench">{HTML_STYLE}<h3>{html.escape(table.title)}</h3>{body}{notes}'
            f'<p><a download="{table.name}.csv" href="{uri}">{table.name}.csv</a> (every number at full precision, '
            "one column per value)</p></div>\n")


def write_table(table: Table, out_dir) -> list[Path]:
    """tables/<name>.csv (numbers), .md and .tex (display), and .html (the report's page) for a
    table with rows: the report shows only the tables that apply to the study, while the CSV,
    Markdown and LaTeX files are written for every table. Returns the paths written."""
    out_dir = Path(out_dir)
    paths = [atomic_write_text(out_dir / f"{table.name}.csv", table.data.to_csv(index=False, na_rep="")),
             atomic_write_text(out_dir / f"{table.name}.md", to_markdown(table)),
             atomic_write_text(out_dir / f"{table.name}.tex", to_latex(table))]
    html_path = out_dir / f"{table.name}.html"
    if table.display.empty:
        html_path.unlink(missing_ok=True)      # a table that no longer applies leaves the report too
    else:
        paths.append(atomic_write_text(html_path, to_html(table)))
    return paths
