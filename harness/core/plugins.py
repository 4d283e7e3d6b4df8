"""Which methods this checkout ships, read without importing torch.

The `didbench.methods` entry points of this checkout's pyproject.toml: the config validator (no
torch) and the method registry (harness.core.methods) both read them here.
"""
from __future__ import annotations

from pathlib import Path

#: the entry-point group of the method registry (harness.core.methods.ENTRY_POINT_GROUP)
METHODS_GROUP = "didbench.methods"


def checkout_methods() -> dict[str, str]:
    """{name: 'module:attr'} of the `didbench.methods` entry points in this checkout's
    pyproject.toml ({} where there is none, e.g. an installed wheel: its metadata has them)."""
    import tomllib

    path = Path(__file__).resolve().parents[2] / "pyproject.toml"
    if not path.is_file():
        return {}
    project = tomllib.loads(path.read_text()).get("project", {})
    return dict(project.get("entry-points", {}).get(METHODS_GROUP, {}))
