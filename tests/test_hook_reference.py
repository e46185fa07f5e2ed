"""docs/plugins.md's hook reference agrees with profuser/hookspecs.py: every hookspec is listed
with exactly its arguments, in order, and a meaning; every hookspec's docstring names each of its
arguments; and `profuser components` shows a Literal param's choices."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import Literal

import pytest
from typer.testing import CliRunner

from profuser import hookspecs
from profuser.cli import app
from profuser.components import Curriculum, Phase, PhasePart, StrictModel
from profuser.plugins import Engine

DOC = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
SPECS = {name: fn for name, fn in vars(hookspecs).items()
         if name.startswith("profuser_") and callable(fn) and hasattr(fn, "profuser_spec")}


def documented() -> dict[str, tuple[list[str], str]]:
    """hook -> (arguments, meaning), from the table under '### Hooks'."""
    section = DOC.read_text(encoding="utf-8").split("\n### Hooks\n", 1)[1].split("\n### ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        rows[cells[0].strip("`")] = ([a.strip().strip("`") for a in cells[1].split(",") if a.strip()], cells[2])
    return rows


def test_every_hookspec_is_found():
    assert {"profuser_register_curricula", "profuser_stage_started", "profuser_run_finished"} <= set(SPECS)


def test_every_hook_is_in_the_reference_with_its_arguments():
    rows = documented()
    assert sorted(rows) == sorted(SPECS), "docs/plugins.md '### Hooks' lists other hooks than profuser/hookspecs.py"
    for name, fn in SPECS.items():
        arguments, meaning = rows[name]
        assert arguments == list(inspect.signature(fn).parameters), f"{name}: arguments differ from the hookspec"
        assert len(meaning) > 20, f"{name}: say when it is called"


@pytest.mark.parametrize("name", sorted(SPECS))
def test_each_hookspec_docstring_names_its_arguments(name):
    doc = inspect.getdoc(SPECS[name]) or ""
    missing = [a for a in inspect.signature(SPECS[name]).parameters if f"``{a}``" not in doc]
    assert not missing, f"{name}'s docstring does not describe {missing}"


class Choosy(Curriculum):
    """A curriculum with a Literal param."""

    name = "choosy"

    class Params(StrictModel):
        order: Literal["easy-first", "hard-first"] = "easy-first"
        maybe: Literal["a", "b"] | None = None

    def phases(self, data):
        return [Phase("all", 1.0, [PhasePart("training")])]


class ChoosyPlugin:
    @staticmethod
    @hookspecs.hookimpl
    def profuser_register_curricula(register):
        register(Choosy)


def test_components_prints_a_literals_choices(monkeypatch):
    from profuser import plugins

    engine = Engine(entrypoints=False, extra_plugins=[("choosy", ChoosyPlugin())])
    monkeypatch.setattr(plugins, "get_engine", lambda *a, **k: engine)
    runner = CliRunner()
    text = runner.invoke(app, ["components", "--kind", "curricula"])
    assert text.exit_code == 0, text.output
    block = text.output.split("choosy", 1)[1]
    assert "'easy-first' | 'hard-first'" in block and "'a' | 'b'" in block
    listed = runner.invoke(app, ["components", "--kind", "curricula", "--json"])
    assert listed.exit_code == 0, listed.output
    [entry] = [c for c in json.loads(listed.output) if c["name"] == "choosy"]  # the JSON schema: enum
    assert entry["params"]["properties"]["order"]["enum"] == ["easy-first", "hard-first"]
