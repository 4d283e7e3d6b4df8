"""The package boundaries of docs/architecture.md, checked on the import statements.

Dependencies point down: harness.core <- harness.data <- harness.run <- harness.metrics, with
harness.results beside them on the core only, and harness.cli on top of the harness. did/ and
baselines/ are methods on the core alone and never import each other, so a method can be added
or removed without touching the others. analysis/ reads result files: nothing imports it. Every
check reads the source (function-level imports included), so a deferred import cannot hide an
edge.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("harness", "did", "baselines", "analysis")

#: what each part may import of the project (beyond itself)
ALLOWED = {
    "harness.core": {"harness"},   # the root package for __version__ only
    "harness.data": {"harness", "harness.core"},
    "harness.run": {"harness", "harness.core", "harness.data"},
    "harness.metrics": {"harness", "harness.core", "harness.data", "harness.run"},
    "harness.results": {"harness", "harness.core"},
    "harness.cli": {"harness", "harness.core", "harness.data", "harness.run", "harness.metrics", "harness.results"},
    "harness.__main__": {"harness.cli"},
    "did": {"harness.core"},
    "baselines": {"harness.core"},
    "analysis": {"harness", "harness.core", "harness.data", "harness.metrics", "harness.results", "baselines", "did"},
}


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(REPO).with_suffix("").parts)
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def part_of(module: str) -> str:
    """The part a module belongs to: a harness stage (harness.core, ...) or a top-level package."""
    bits = module.split(".")
    return ".".join(bits[:2]) if bits[0] == "harness" and len(bits) > 1 else bits[0]


def project_imports(path: Path, known: set[str]) -> set[str]:
    """Every project module a file imports (function-level imports included), as module names."""
    own = module_name(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        out |= {n for n in names if n.split(".")[0] in PACKAGES}
    return out - {own}


def project_graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))]
    known = {module_name(p) for p in files}
    return {module_name(p): project_imports(p, known) for p in files}


GRAPH = project_graph()


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_each_part_imports_only_what_is_below_it(part):
    bad = {m: sorted(d for d in deps if part_of(d) != part and part_of(d) not in ALLOWED[part])
           for m, deps in GRAPH.items() if part_of(m) == part}
    assert not {m: d for m, d in bad.items() if d}


def test_every_harness_module_belongs_to_a_stage():
    """A new module goes into a stage (or is the CLI), so the rules above cover it."""
    loose = sorted(m for m in GRAPH if m.startswith("harness.") and part_of(m) not in ALLOWED)
    assert not loose


def test_no_import_cycle():
    """Tarjan over the whole project graph: not one strongly connected component of two or more."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH.get(v, ()):
            if w not in GRAPH:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_uses(path: Path) -> list[str]:
    """Another project module's private names that a file uses: `from x import _name`, and
    `m._name` where `m` is bound by a project import."""
    tree = ast.parse(path.read_text())
    bound, out = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PACKAGES:
            out += [f"{node.module}.{a.name}" for a in node.names if _private(a.name)]
            bound |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            bound |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.split(".")[0] in PACKAGES}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                and _private(node.attr)):
            out.append(f"{node.value.id}.{node.attr} (line {node.lineno})")
    return out


def test_no_module_uses_another_modules_private_names():
    """A name another module needs is not private: make it public where it is defined."""
    bad = {str(p.relative_to(REPO)): private_uses(p) for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}
    assert not {k: v for k, v in bad.items() if v}


def test_the_private_check_sees_both_forms(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("from harness.core import config as C\nfrom analysis.tables import _f\nC._hidden()\n")
    assert private_uses(f) == ["analysis.tables._f", "C._hidden (line 3)"]


def test_the_check_sees_nested_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "harness" / "core"
    pkg.mkdir(parents=True)
    f = pkg / "m.py"
    f.write_text("def f():\n    import analysis.tables\n    from did import method\n")
    monkeypatch.setattr(__import__(__name__), "REPO", tmp_path)
    assert project_imports(f, {"did.method"}) == {"analysis.tables", "did.method"}
    assert part_of("harness.core.m") == "harness.core" and part_of("analysis.tables") == "analysis"


def test_harness_report_runs_the_analysis_as_its_own_process(tmp_path, toy_config):
    import yaml

    from harness import cli

    sys_path = tmp_path / "cfg.yaml"
    sys_path.write_text(yaml.safe_dump(toy_config))
    study = tmp_path / "results" / "toy"
    study.mkdir(parents=True)
    assert cli.main(["report", "--config", str(sys_path), "--study-dir", str(study)]) == 0
    assert (study / "summary.md").is_file() and (study / "tables" / "ppl.md").is_file()


def test_no_method_name_outside_its_own_module():
    """What the harness and the analysis need to know about a method (its layouts, dense canvas,
    display order, colour, which method is a layout's reference, its name in the paper) is a
    class attribute read through the registry: no string of theirs names a method. The configs,
    the schema (its enum documents the shipped methods) and the tests may."""
    from harness.core.plugins import checkout_methods

    names = set(checkout_methods())
    found = []
    for pkg in ("harness", "analysis", "scripts"):
        for p in sorted((REPO / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(p.read_text())):
                if isinstance(node, ast.Constant) and node.value in names:
                    found.append(f"{p.relative_to(REPO)}:{node.lineno} {node.value!r}")
    rules = [REPO / "Snakefile", *sorted((REPO / "workflow" / "rules").glob("*.smk"))]
    for p in rules:
        for i, line in enumerate(p.read_text().splitlines(), 1):
            found += [f"{p.relative_to(REPO)}:{i} {n!r}" for n in names if f'"{n}"' in line or f"'{n}'" in line]
    assert names and not found
