"""The install files agree: Makefile, constraints.txt, environment.yml, workflow/envs/didbench.yaml.

constraints.txt is the one list of exact versions; the conda files take Python and pip from
conda and everything else from pip. The slow test resolves each file's pip part against PyPI
with `pip install --dry-run` (it needs the package index; run with -m slow).
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
ENV_FILES = ("environment.yml", "workflow/envs/didbench.yaml")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[_norm(name)] = version
    return pins


def makefile_var(name: str) -> str:
    m = re.search(rf"^{name} \?= *(.*)$", (REPO / "Makefile").read_text(), re.M)
    assert m, name
    return m.group(1).strip()


def env_file(path: str) -> tuple[list, list[str]]:
    """(conda dependencies other than the pip list, the pip list) of a conda environment file."""
    deps = yaml.safe_load((REPO / path).read_text())["dependencies"]
    pip = [d["pip"] for d in deps if isinstance(d, dict)]
    assert len(pip) == 1, path
    return [d for d in deps if not isinstance(d, dict)], pip[0]


@pytest.mark.parametrize("path", ENV_FILES)
def test_conda_gives_only_python_and_pip(path):
    conda, pip = env_file(path)
    assert conda == ["python=3.11", "pip"]
    channels = yaml.safe_load((REPO / path).read_text())["channels"]
    assert "pytorch" not in channels  # that channel stopped at torch 2.5.1; transformers 5 needs >= 2.6
    assert makefile_var("TORCH_SPEC") in pip  # the same torch as `make install`


def test_environment_yml_takes_its_versions_from_constraints():
    _, pip = env_file("environment.yml")
    assert pip[0] == "-c constraints.txt" and "-e .[test]" in pip


def test_the_snakemake_env_pins_agree_with_constraints():
    pins = constraints()
    _, pip = env_file("workflow/envs/didbench.yaml")
    for spec in pip:
        name, version = spec.split("==")
        if _norm(name) == "torch":
            continue
        assert pins.get(_norm(name)) == version, spec


def test_the_makefile_takes_torch_from_the_cpu_index_by_default():
    assert makefile_var("TORCH_INDEX") == "https://download.pytorch.org/whl/cpu"
    assert "--extra-index-url $$idx" in (REPO / "Makefile").read_text()  # PyPI stays a source
    assert "torch" not in constraints()  # else a TORCH_SPEC other than the default would clash


def _requirements(path: str, out: Path) -> Path:
    """The env file's pip list as a requirements file, its relative paths made absolute (conda
    runs pip in the env file's folder)."""
    base = (REPO / path).parent
    lines = []
    for spec in env_file(path)[1]:
        if spec.startswith(("-c ", "-r ")):
            spec = f"{spec[:2]} {base / spec[3:]}"
        elif spec.startswith("-e ."):
            spec = f"-e {base}{spec[4:]}"
        lines.append(spec)
    out.write_text("\n".join(lines) + "\n")
    return out


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("path", ENV_FILES)
def test_the_pip_part_resolves(path, tmp_path):
    """`pip install --dry-run` of the env file's pip list in a fresh resolution (needs PyPI)."""
    req = _requirements(path, tmp_path / "requirements.txt")
    report = tmp_path / "report.json"
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                          "--report", str(report), "-r", str(req)], capture_output=True, text=True, timeout=880)
    assert out.returncode == 0, out.stderr[-3000:]
    got = {_norm(i["metadata"]["name"]): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    assert got["torch"].split("+")[0] == makefile_var("TORCH_SPEC").split("==")[1]
    pins = constraints()
    pinned = pins if path == "environment.yml" else {_norm(s.split("==")[0]): s.split("==")[1]
                                                     for s in env_file(path)[1] if "==" in s}
    wrong = {n: (v, got[n]) for n, v in pinned.items() if n in got and n != "torch" and got[n] != v}
    assert not wrong
    print(f"{path}: {len(got)} packages resolve, e.g. torch {got['torch']}, transformers {got['transformers']}")
