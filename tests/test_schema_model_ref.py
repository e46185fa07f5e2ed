"""`profuser schema` says what validation accepts: a model ref may be a plain string."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from profuser.cli import app
from profuser.recipe import ModelSpec, Recipe


def _resolve(schema: dict, node: dict) -> dict:
    while "$ref" in node:
        node = schema["$defs"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def _types(schema: dict, node: dict) -> set[str]:
    """The JSON types a schema node admits (through $ref and anyOf)."""
    node = _resolve(schema, node)
    if "anyOf" in node:
        return set().union(*(_types(schema, branch) for branch in node["anyOf"]))
    return {node["type"]} if "type" in node else set()


def test_schema_admits_a_model_ref_as_a_string():
    result = CliRunner().invoke(app, ["schema"])
    assert result.exit_code == 0, result.output
    schema = json.loads(result.stdout)
    props = schema["properties"]
    evaluate = _resolve(schema, props["evaluate"])["properties"]
    judge = next(b for b in evaluate["judge"]["anyOf"] if "$ref" in b)
    fields = {"target": props["target"], "sources[]": props["sources"]["items"],
              "evaluate.judge.reference": _resolve(schema, judge)["properties"]["reference"],
              "merges[].models[]": _resolve(schema, props["merges"]["items"])["properties"]["models"]["items"]}
    for where, node in fields.items():
        assert {"string", "object"} <= _types(schema, node), where
    spec = next(b for b in _resolve(schema, props["target"])["anyOf"] if b.get("type") == "object")
    assert spec["required"] == ["ref"] and "dtype" in spec["properties"]  # the long form is unchanged
    # and validation agrees: the string is the spec's ref
    assert ModelSpec.model_validate("Qwen/Qwen2.5-7B-Instruct") == ModelSpec(ref="Qwen/Qwen2.5-7B-Instruct")
    recipe = Recipe.model_validate({"name": "r", "target": "org/t", "sources": ["org/a", {"ref": "org/b"}],
                                    "data": {"source": {"name": "builtin_tasks"}}})
    assert [s.ref for s in recipe.sources] == ["org/a", "org/b"] and recipe.target.ref == "org/t"
