"""The plugin engine: registration hooks, duplicates, entry-point discovery, did-you-mean."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from profuser import hookimpl
from profuser.components import KINDS, Curriculum, Phase, PhasePart
from profuser.errors import PluginError
from profuser.plugins import Engine

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "docs" / "examples" / "profuser-warmup-curriculum"


class OneShot(Curriculum):
    name = "one_shot"
    aliases = ("oneshot",)
    modes = ("training",)

    def phases(self, data):
        return [Phase("only", 1.0, [PhasePart("training")])]


def _plugin(module_name: str, cls=OneShot, **register_kwargs):
    module = types.ModuleType(module_name)

    @hookimpl
    def profuser_register_curricula(register):
        register(cls, **register_kwargs)

    module.profuser_register_curricula = profuser_register_curricula
    return module


def test_throwaway_plugin_registers_component_with_alias():
    engine = Engine(entrypoints=False, extra_plugins=[("throwaway", _plugin("throwaway"))])
    info = engine.registry.get("curricula", "oneshot")
    assert info.cls is OneShot and info.name == "one_shot" and info.plugin == "throwaway"
    assert "curricula:one_shot" in [f"{c.kind}:{c.name}" for c in engine.plugins["throwaway"].components]
    # the throwaway plugin is gone from a fresh engine
    assert "one_shot" not in Engine(entrypoints=False).registry.names("curricula")


def test_duplicate_name_names_both_plugins():
    with pytest.raises(PluginError) as err:
        Engine(entrypoints=False, extra_plugins=[("first", _plugin("first")), ("second", _plugin("second"))])
    assert "'first'" in err.value.message and "'second'" in err.value.message


def test_registering_a_non_component_is_an_error_naming_the_plugin():
    with pytest.raises(PluginError) as err:
        Engine(entrypoints=False, extra_plugins=[("bad", _plugin("bad", cls=dict, name="x"))])
    assert "plugin bad" in err.value.lines()[0]


def test_unknown_name_suggests_the_closest():
    engine = Engine(entrypoints=False, extra_plugins=[("throwaway", _plugin("throwaway"))])
    with pytest.raises(PluginError, match="did you mean 'one_shot'"):
        engine.registry.get("curricula", "one_shot_")


def test_builtins_cover_every_kind_without_entry_points():
    engine = Engine(entrypoints=False)
    assert all(p.builtin for p in engine.plugins.values())
    missing = [kind for kind in KINDS if not engine.registry.names(kind)]
    assert missing == []


def test_every_builtin_params_model_forbids_unknown_fields():
    engine = Engine(entrypoints=False)
    for info in engine.registry.components():
        assert info.cls.Params.model_config.get("extra") == "forbid", f"{info.kind}:{info.name}"


def test_example_package_is_discovered_through_its_entry_point(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(EXAMPLE)], check=True)
    env = {**os.environ, "PYTHONPATH": str(target), "PROFUSER_DISABLE_ENTRYPOINTS": ""}
    out = subprocess.run([sys.executable, "-m", "profuser.cli", "plugins", "--json"], env=env,
                         capture_output=True, text=True, check=True).stdout
    rows = {row["plugin"]: row for row in json.loads(out)}
    assert rows["warmup"]["builtin"] is False
    assert rows["warmup"]["version"] == "0.1.0"
    assert rows["warmup"]["components"] == ["curricula:sft_warmup"]
    # and the switch that turns third-party discovery off works
    env["PROFUSER_DISABLE_ENTRYPOINTS"] = "1"
    out = subprocess.run([sys.executable, "-m", "profuser.cli", "plugins", "--json"], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert "warmup" not in {row["plugin"] for row in json.loads(out)}
