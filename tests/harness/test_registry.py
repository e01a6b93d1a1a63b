from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from harness.errors import UnknownNameError
from harness.method import Method, MethodConfig
from harness.registry import REGISTRY, MethodRegistry


def test_builtins_are_found_lazily():
    names = REGISTRY.names()
    assert {"fp", "rtn"} <= set(names)
    assert REGISTRY.source("rtn") == "builtin"


def test_unknown_name_did_you_mean_and_list():
    with pytest.raises(UnknownNameError) as err:
        REGISTRY.get("rnt")
    assert "did you mean 'rtn'" in str(err.value) and "registered:" in str(err.value)


def test_registry_checks_base_class_and_duplicates():
    reg = MethodRegistry()

    class NotAMethod:
        name = "x"

    with pytest.raises(TypeError):
        reg.register(NotAMethod)  # type: ignore[arg-type]

    def make(tag):
        class M(Method):
            name = "dup"
            description = tag

            def quantize(self, model, spec, calibration, context):
                raise NotImplementedError

        return M

    reg.register(make("a"))
    with pytest.raises(ValueError, match="already registered"):
        reg.register(make("b"))


def test_pip_installed_plugin_is_found_through_its_entry_point():
    """tests/plugin_example is a separate package installed by `make setup` (pip install -e)."""
    assert REGISTRY.source("clipped-rtn").startswith("plugin ptqbench_plugin_example")
    out = subprocess.run([sys.executable, "-m", "harness.cli", "methods"], capture_output=True, text=True, check=True).stdout
    assert "clipped-rtn" in out and "rtn" in out


@pytest.mark.parametrize("name", REGISTRY.names())
def test_every_method_config_round_trips(name):
    cls = REGISTRY.get(name)
    config = cls.config_class()
    assert isinstance(config, MethodConfig) and dataclasses.is_dataclass(config)
    again = cls.config_class.from_dict(config.to_dict())
    assert again == config
    assert cls.description and cls.name == name


def test_a_broken_builtin_module_is_reported_and_the_others_still_load(tmp_path, monkeypatch):
    package = tmp_path / "fake_methods"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "good.py").write_text(
        "from harness import Method, MethodConfig, register_method\n"
        "from harness.registry import REGISTRY\n"
        "class Good(Method):\n"
        "    name = 'good'\n    description = 'fine'\n"
        "    def quantize(self, model, spec, calibration, context):\n        return None\n")
    (package / "broken.py").write_text("raise ImportError('a dependency is missing')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr("harness.registry.BUILTIN_PACKAGE", "fake_methods")
    reg = MethodRegistry()
    import fake_methods.good  # noqa: F401  (the decorator of a real built-in would register it; here we do)

    reg.register(fake_methods.good.Good)
    assert "good" in reg.names()  # loading went on past the broken module
    assert "fake_methods.broken" in reg.load_errors and "a dependency is missing" in reg.load_errors["fake_methods.broken"]
