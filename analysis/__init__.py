"""Tables, figures and the summary of a study, from the files under results/<study>/.

`python -m analysis results/<study>` (which the workflow's report rule runs) calls
`main(study_dir, config)`; the study's files are read by harness.results.study. No training code lives here.
"""
from __future__ import annotations

from pathlib import Path

from harness.core.atomic import atomic_write_text
from harness.core.config import load_config
from harness.core.methods import UserError
from harness.results.study import EVAL_FILES, all_eval_files, Study, load_study, run_dirs
from analysis.cost_figures import bench_figure
from analysis.figures import all_figures
from analysis.frames import Table, to_html, to_markdown, write_table
from analysis.sweep import sweep_figure, sweep_table
from analysis.synthetic import bound_gap_table, exact_samples_table, synthetic_figures, synthetic_summary
from analysis.tables import all_tables, summary_table
from analysis.training import training_table

__all__ = ["main", "load_study", "Study", "bench_figure", "write_summary"]


def is_synthetic(study: Study) -> bool:
    """A study on a synthetic corpus: its headline is the exact metrics (analysis.synthetic)."""
    return len(study.bound_gap) > 0 or study.corpus == "synthetic"


def headline(study: Study, config: dict | None) -> Table:
    """The summary's table: a sweep's grid, a synthetic study's exact metrics, else the headline;
    a study whose runs were trained but never evaluated (a recipe study) shows how they trained."""
    if (config or {}).get("sweep"):
        return sweep_table(study, config)
    if len(study.runs) and not study.evaluated():
        return training_table(study, config)
    return synthetic_summary(study, config) if is_synthetic(study) else summary_table(study, config)


def write_summary(study: Study, config: dict | None, path, files: list[Path]) -> Path:
    """results/<study>/summary.md: the headline table, what is missing, and where the rest is."""
    table = headline(study, config)
    root = Path(study.root)
    lines = [f"# Study `{study.name}`: summary", ""]
    n_runs = len(study.runs)
    lines.append(f"{n_runs} trained run(s)" + (f" on corpus `{study.corpus}`." if study.corpus else "."))
    lines += ["", to_markdown(table, heading="##"), significance_line(table), ""]
    gaps = _missing_evaluations(study, config)
    if gaps or study.missing_runs:
        lines += ["## Missing results", ""]
        if study.missing_runs:
            lines += ["These runs of the study's config have no trained result (absent from every table):", ""]
            lines += [f"- `{run}`" for run in study.missing_runs] + [""]
        if gaps:
            lines += ["These evaluations have no result file (shown as – above):", ""]
            lines += [f"- `{run}`: {', '.join(kinds)}" for run, kinds in gaps.items()] + [""]
    if study.problems:
        lines += ["## Files left out, unreadable or non-finite", ""] + [f"- {p}" for p in study.problems] + [""]
    lines += ["## Files", ""]
    lines += [f"- [{p.relative_to(root)}]({p.relative_to(root)})" for p in files]
    # the report's landing page opens on this: the headline table with its significance line
    atomic_write_text(root / "tables" / "summary.html", to_html(table, extra=significance_line(table)))
    return atomic_write_text(Path(path), "\n".join(lines) + "\n")


#: headline columns holding a significance flag -> what they compare (vs the reference method)
SIGNIFICANCE = {"diff_significant": "likelihood bound", "gen_ppl_significant": "gen PPL",
                "entropy_significant": "entropy", "nll_significant": "exact sample NLL",
                "invalid_significant": "invalid fraction"}


def significance_line(table: Table) -> str:
    """One sentence: which headline comparisons with the reference are significant at 95%, or none.

    Columns `<what>[_<steps>][_flops]_significant` (`_flops`: against the FLOPs-matched DID-F; a
    synthetic headline only marks what both rows' convergence allows, see analysis.synthetic)."""
    d = table.data
    if not any(c.endswith("_significant") for c in d.columns):
        return "*No significance test in this table (no evaluation compares the rows).*"
    hits = []
    for col in [c for c in d.columns if c.endswith("_significant")]:
        flops = "_flops_" in col
        parts = col.replace("_flops", "").split("_")
        steps = parts[-2] if len(parts) > 2 and parts[-2].isdigit() else None
        key = "_".join(parts[:-2] if steps else parts[:-1]) + "_significant"
        what = SIGNIFICANCE.get(key, col)
        for r in d[d[col] == True].to_dict("records"):  # noqa: E712 (None = not tested)
            side = ""
            diff = r.get("diff_vs_flops_ref" if flops else "diff_vs_ref")
            if key == "diff_significant" and diff == diff and diff is not None:   # the bound's sign
                side = " lower" if diff < 0 else " higher"
            hits.append(f"{r['method']} ({r['layout']}):{side} {what}" + (f" @{steps}" if steps else "")
                        + (" vs DID-F" if flops else "") + _not_converged(r))
    if not hits:
        return ("**Significance:** no comparison in this table differs from the reference (DID) row at 95% "
                "(for a synthetic study: among rows that converged): the table cannot rank the methods.")
    return ("**Significant at 95% vs the reference (DID) row:** " + "; ".join(hits) + "."
            + (" (n.c.: that row has not plateaued, see its Plateau column: measured, but no verdict rests on it.)"
               if any(h.endswith("(n.c.)") for h in hits) else ""))


def _not_converged(r: dict) -> str:
    """' (n.c.)' where the row has not plateaued (its Plateau column): the difference is measured,
    but no verdict may rest on it."""
    return " (n.c.)" if r.get("converged") == False else ""  # noqa: E712 (a numpy bool; None: not known)


def _missing_evaluations(study: Study, config: dict | None = None) -> dict[str, list[str]]:
    """Per run, the evaluations the study's config asks for (evaluate.metrics) that have no file."""
    asked = ((config or {}).get("evaluate") or {}).get("metrics")
    if asked is None and config:
        try:   # the schema's default for this study (a synthetic corpus has exact metrics, no evaluator LM)

            asked = load_config(config)["evaluate"]["metrics"]
        except Exception:   # noqa: BLE001 (a partial config: every per-run metric is expected)
            asked = None
    expected = [k for k in all_eval_files() if k in asked] if isinstance(asked, list) else list(EVAL_FILES)
    gaps = {}
    kept = set(study.runs["run"]) if len(study.runs) else set()   # runs left out are listed as problems
    for d in run_dirs(study.root):
        if d.name not in kept:
            continue
        layout = study.runs.set_index("run")["layout"].get(d.name) if len(study.runs) else None
        kinds = [k for k in expected if not (d / "eval" / f"{k}.json").is_file()
                 and not (k == "lengths" and layout == "fixed")]   # fixed-length runs have no lengths
        if kinds:
            gaps[d.name] = kinds
    return gaps


def main(study_dir, config: dict | None = None) -> list[Path]:
    """Write tables/*.{csv,md,tex}, figures/*.png and summary.md for one study; return the paths.

    Every file is written atomically; files for evaluations a study skipped are still written
    (with "–" cells or a "no results" figure) so the output set does not depend on the data.
    """
    study_dir = Path(study_dir)
    if not study_dir.is_dir():
        raise UserError(f"study directory {study_dir} does not exist (run the workflow first)")
    study = load_study(study_dir, config)
    files: list[Path] = []
    tables = all_tables(study, config) + [bound_gap_table(study, config), exact_samples_table(study, config)]
    tables.append(training_table(study, config))
    for table in tables + [headline(study, config)]:
        files += write_table(table, study_dir / "tables")
    files += all_figures(study, config, study_dir / "figures") + synthetic_figures(study, config, study_dir / "figures")
    if (config or {}).get("sweep"):
        files.append(sweep_figure(study, config, study_dir / "figures" / "sweep.png"))
    files.append(write_summary(study, config, study_dir / "summary.md", files))
    return files
