"""Methods from other packages: the `didbench.methods` entry-point group (harness.core.methods).

A fake installed package (a dist-info folder and a module on sys.path in tmp_path) declares a
method; the registry finds it, the study config accepts it, and a broken declaration is one
UserError line that names it.
"""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from harness.core import config, methods
from harness.core.config import load_config
from harness.core.errors import UserError

REPO = Path(__file__).resolve().parents[1]

DEMO = '''
from harness.core.methods import Method, register


class Demo(Method):                      # no decorator: registered under the entry point's name
    layouts = ("fixed",)


@register("plugin-decorated")
class Decorated(Method):
    layouts = ("fixed", "varlen")
'''


def fake_package(root: Path, dist: str, entries: list[str], modules: dict[str, str]) -> Path:
    """An 'installed' distribution `dist` in `root`: its metadata, entry points and modules."""
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[didbench.methods]\n" + "\n".join(entries) + "\n")
    for name, src in modules.items():
        (root / f"{name}.py").write_text(src)
    return root


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """Puts a fake package on sys.path; forgets its methods and modules afterwards."""
    made: list[str] = []

    def install(entries, modules, dist="didbench_demo_plugin"):
        made.extend(modules)
        monkeypatch.syspath_prepend(str(fake_package(tmp_path, dist, entries, modules)))
        return tmp_path

    before = dict(methods._REGISTRY)
    yield install
    methods._REGISTRY.clear()
    methods._REGISTRY.update(before)
    for name in made:
        sys.modules.pop(name, None)


def test_builtin_methods_are_declared_as_entry_points():
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"][methods.ENTRY_POINT_GROUP]
    # the schema describes the core methods; flexmdm is shipped through the plugin path alone
    assert set(config.shipped_methods()) <= set(declared) and "flexmdm" not in config.shipped_methods()
    for name, value in declared.items():
        cls = methods.get(name)
        assert value.split("#")[0].strip() == f"{cls.__module__}:{cls.__qualname__}" and cls.name == name
    # the plain-checkout fallback imports exactly the declared modules, read from pyproject.toml
    assert methods.checkout_entry_points() == declared
    assert set(declared) <= set(config.method_names()) <= set(methods.available()) | set(declared)
    assert config.METHODS_GROUP == methods.ENTRY_POINT_GROUP


def test_a_plugin_method_is_registered_and_accepted_by_the_config(plugin):
    plugin(["plugin-demo = demo_plugin:Demo", "plugin-decorated = demo_plugin:Decorated"], {"demo_plugin": DEMO})
    assert {"plugin-demo", "plugin-decorated", "did", "ar"} <= set(methods.available())
    assert "plugin-demo" in config.method_names()
    cfg = load_config({
        "runs": [{"method": "plugin-demo", "layout": "fixed"}, {"method": "plugin-decorated", "layout": "varlen"},
                 {"method": "did", "layout": "varlen"}],
        "methods": {"plugin-demo": {"width": 3}},
        "train": {"step_multiplier": {"plugin-demo": 2}},
    })
    assert [r["method"] for r in cfg["runs"]] == ["plugin-demo", "plugin-decorated", "did"]
    cls = methods.get("plugin-demo")
    assert cls.__name__ == "Demo" and cls.name == "plugin-demo" and issubclass(cls, methods.Method)
    assert methods.get("plugin-decorated").__name__ == "Decorated"
    # the method's own layouts are checked at config time
    with pytest.raises(UserError) as err:
        load_config({"runs": [{"method": "plugin-demo", "layout": "varlen"}]})
    assert str(err.value) == ("config: runs[0].layout: 'varlen' is not allowed here "
                              "(method 'plugin-demo' supports fixed)")
    # still an error: a name nobody declares
    with pytest.raises(UserError, match=r"runs\[0\]\.method: 'nope' is not one of: .*plugin-demo"):
        load_config({"runs": [{"method": "nope", "layout": "fixed"}]})


@pytest.mark.parametrize("entry, module, expect", [
    ("broken = no_such_module_xyz:Thing", {}, "failed to load: ModuleNotFoundError: No module named 'no_such_module_xyz'"),
    ("broken = boom_plugin:Thing", {"boom_plugin": "raise RuntimeError('boom at import')\n"},
     "failed to load: RuntimeError: boom at import"),
    ("broken = thing_plugin:Thing", {"thing_plugin": "Thing = 42\n"}, "is 42, not a subclass of harness.core.methods.Method"),
    ("broken = thing_plugin:Missing", {"thing_plugin": "Thing = 42\n"}, "failed to load: AttributeError"),
    ("broken = named_plugin:Other", {"named_plugin": "from harness.core.methods import Method, register\n"
                                     "@register('another-name')\nclass Other(Method):\n    pass\n"},
     "is registered as 'another-name'"),
])
def test_a_broken_entry_point_is_one_clear_line(plugin, entry, module, expect):
    plugin([entry], module, dist="broken_dist")
    assert "broken" not in methods.available()       # left out: the rest still works
    assert "did" in methods.available() and methods.get("did").name == "did"
    assert "broken" in methods.declared() and "broken" in config.method_names()
    with pytest.raises(UserError) as err:
        methods.get("broken")
    msg = str(err.value)
    assert "\n" not in msg and expect in msg
    assert f"'{entry}' (entry point of group didbench.methods, package broken_dist 0.1)" in msg
    with pytest.raises(UserError) as err:
        load_config({"runs": [{"method": "broken", "layout": "fixed"}]}, source="study.yaml")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("study.yaml: runs[0].method: method 'broken': ") and expect in msg


def test_two_packages_declaring_one_name_is_an_error(plugin, tmp_path):
    plugin(["twice = demo_plugin:Demo"], {"demo_plugin": DEMO}, dist="first")
    fake_package(tmp_path, "second", ["twice = demo_plugin:Decorated"], {})
    with pytest.raises(UserError, match=r"method 'twice' is declared by more than one entry point: ") as err:
        methods.get("twice")
    msg = str(err.value)  # both packages named, in whatever order sys.path lists them
    assert "\n" not in msg and "package first 0.1" in msg and "package second 0.1" in msg


def _python(code: str, **env) -> str:
    import os

    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, **env})
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_config_validation_sees_entry_points_without_importing_torch(tmp_path):
    root = fake_package(tmp_path / "site", "didbench_demo_plugin", ["plugin-demo = demo_plugin:Demo"],
                        {"demo_plugin": DEMO})
    out = _python("import sys; from harness.core import config; "
                  "config.load_config('config/default.yaml'); "
                  "print('plugin-demo' in config.method_names(), 'torch' in sys.modules)", PYTHONPATH=str(root))
    assert out == "True False"


def test_a_plain_checkout_without_package_metadata_still_has_the_builtins():
    out = _python("import importlib.metadata as m; m.entry_points = lambda **kw: []\n"
                  "from harness.core import methods; print(' '.join(methods.available()), methods.get('radd').__module__)")
    assert out == "ar did did-fixed flexmdm ilm mdlm radd baselines.radd"


def test_the_cli_reports_a_broken_entry_point_in_one_line(plugin, tmp_path, capsys):
    import yaml

    from harness import cli

    plugin(["broken = no_such_module_xyz:Thing"], {}, dist="broken_dist")
    cfg = tmp_path / "study.yaml"
    cfg.write_text(yaml.safe_dump({"runs": [{"method": "broken", "layout": "fixed"}]}))
    code = cli.main(["train", "--config", str(cfg), "--method", "broken", "--layout", "fixed",
                     "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: ") and "'broken = no_such_module_xyz:Thing'" in err[0]
    assert "failed to load: ModuleNotFoundError" in err[0]
