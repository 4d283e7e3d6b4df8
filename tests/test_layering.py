"""The package boundaries of docs/architecture.md, checked on the import statements.

harness/ is the library: it never imports analysis/ (tables and figures depend on the harness,
not the other way round). did/ and baselines/ are methods on top of the harness and never
import each other, so a method can be added or removed without touching the others.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = {"harness": {"analysis"}, "did": {"analysis", "baselines"}, "baselines": {"analysis", "did"}}


def imported_packages(path: Path) -> set[str]:
    """Top-level package of every import in a module (function-level imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_boundaries(package):
    bad = {str(p.relative_to(REPO)): sorted(imported_packages(p) & FORBIDDEN[package])
           for p in sorted((REPO / package).rglob("*.py"))}
    assert not {k: v for k, v in bad.items() if v}


def test_the_check_sees_nested_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    import analysis.tables\n    from did import method\n")
    assert imported_packages(f) == {"analysis", "did"}


def test_harness_report_runs_the_analysis_as_its_own_process(tmp_path, toy_config):
    import yaml

    from harness import cli

    sys_path = tmp_path / "cfg.yaml"
    sys_path.write_text(yaml.safe_dump(toy_config))
    study = tmp_path / "results" / "toy"
    study.mkdir(parents=True)
    assert cli.main(["report", "--config", str(sys_path), "--study-dir", str(study)]) == 0
    assert (study / "summary.md").is_file() and (study / "tables" / "ppl.md").is_file()
