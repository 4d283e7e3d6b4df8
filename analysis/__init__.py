"""Tables, figures and the summary of a study, from the files under results/<study>/.

`python -m analysis results/<study>` (which the workflow's report rule runs) calls
`main(study_dir, config)`; the study's files are read by harness.study. No training code lives here.
"""
from __future__ import annotations

from pathlib import Path

from harness.study import Study, load_study
from analysis.figures import all_figures, bench_figure
from analysis.tables import all_tables, atomic_write_text, summary_table, to_markdown, write_table

__all__ = ["main", "load_study", "Study", "bench_figure", "write_summary"]


def write_summary(study: Study, config: dict | None, path, files: list[Path]) -> Path:
    """results/<study>/summary.md: the headline table, what is missing, and where the rest is."""
    table = summary_table(study, config)
    root = Path(study.root)
    lines = [f"# Study `{study.name}`: summary", ""]
    n_runs = len(study.runs)
    lines.append(f"{n_runs} trained run(s)" + (f" on corpus `{study.corpus}`." if study.corpus else "."))
    lines += ["", to_markdown(table, heading="##")]
    gaps = _missing_evaluations(study)
    if gaps:
        lines += ["## Missing results", "", "These evaluations have no result file (shown as – above):", ""]
        lines += [f"- `{run}`: {', '.join(kinds)}" for run, kinds in gaps.items()] + [""]
    if study.problems:
        lines += ["## Unreadable files", ""] + [f"- {p}" for p in study.problems] + [""]
    lines += ["## Files", ""]
    lines += [f"- [{p.relative_to(root)}]({p.relative_to(root)})" for p in files]
    return atomic_write_text(Path(path), "\n".join(lines) + "\n")


def _missing_evaluations(study: Study) -> dict[str, list[str]]:
    from harness.study import EVAL_FILES, run_dirs

    gaps = {}
    for d in run_dirs(study.root):
        layout = study.runs.set_index("run")["layout"].get(d.name) if len(study.runs) else None
        kinds = [k for k in EVAL_FILES if not (d / "eval" / f"{k}.json").is_file()
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
        from harness.methods import UserError   # lazy: importing torch only to report a mistake

        raise UserError(f"study directory {study_dir} does not exist (run the workflow first)")
    study = load_study(study_dir, config)
    files: list[Path] = []
    for table in all_tables(study, config) + [summary_table(study, config)]:
        files += write_table(table, study_dir / "tables")
    files += all_figures(study, config, study_dir / "figures")
    files.append(write_summary(study, config, study_dir / "summary.md", files))
    return files
