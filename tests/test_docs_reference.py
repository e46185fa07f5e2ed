"""docs/plugins.md's reference tables agree with the code: every dataclass of profuser.components
field by field (name, type, default, in order), every valid ``needs``, and the loss batch the
trainer really passes. Adding a field without documenting it fails here."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from profuser import components
from profuser.components import KINDS, NEEDS, Component

DOC = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"


def _tables() -> dict[str, list[list[str]]]:
    """Heading (``### `X` `` → ``X``, else the heading text) → the rows of the first table under it."""
    tables: dict[str, list[list[str]]] = {}
    heading = None
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("### "):
            title = line[4:].strip()
            match = re.fullmatch(r"`(\w+)`.*", title)
            heading = match.group(1) if match else title
        elif heading and line.startswith("|"):
            cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if set("".join(cells)) <= set("- "):
                continue  # the header's rule
            rows = tables.setdefault(heading, [])
            rows.append(cells)
        elif heading and heading in tables and not line.startswith("|"):
            heading = None if line.strip() else heading
    return {k: rows[1:] for k, rows in tables.items()}  # without the header row


def _unquote(cell: str) -> str:
    return cell[1:-1] if cell.startswith("`") and cell.endswith("`") else cell


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return "`" + ('""' if f.default == "" else repr(f.default)) + "`"
    if f.default_factory is not dataclasses.MISSING:
        return "`" + repr(f.default_factory()) + "`"
    return "–"


DATACLASSES = [obj for obj in vars(components).values()
               if dataclasses.is_dataclass(obj) and obj.__module__ == components.__name__]


def test_every_plugin_facing_dataclass_is_found():
    names = {cls.__name__ for cls in DATACLASSES}
    assert {"Candidates", "Choice", "SourceNLL", "CurriculumInput", "Phase", "PhasePart"} <= names


@pytest.mark.parametrize("cls", DATACLASSES, ids=lambda c: c.__name__)
def test_dataclass_fields_match_the_reference(cls):
    tables = _tables()
    assert cls.__name__ in tables, f"docs/plugins.md has no '### `{cls.__name__}`' section with a field table"
    documented = [(_unquote(r[0]), _unquote(r[1]), r[2]) for r in tables[cls.__name__]]
    actual = [(f.name, str(f.type), _default(f)) for f in dataclasses.fields(cls)]
    expected = "\n".join(f"| `{n}` | `{t.replace('|', chr(92) + '|')}` | {d} | ... |" for n, t, d in actual)
    assert documented == actual, f"docs/plugins.md, `{cls.__name__}`: the rows should start:\n{expected}"
    assert all(r[3] for r in tables[cls.__name__]), "every field needs its meaning"


def test_class_attributes_match_the_base_classes():
    rows = [(_unquote(r[0]), _unquote(r[1]), _unquote(r[2])) for r in _tables()["Class attributes"]]
    actual = [(cls.__name__, attr, str(annotation)) for cls in (Component, *KINDS.values())
              for attr, annotation in inspect.get_annotations(cls).items()]
    assert rows == actual, f"docs/plugins.md, class attributes: the rows should start:\n{actual}"


def test_needs_match_what_the_stages_provide():
    rows = _tables()["needs"]
    assert [(_unquote(r[0]), _unquote(r[1])) for r in rows] == [(mode, need) for mode in NEEDS for need in NEEDS[mode]]


def test_loss_batch_matches_what_the_trainer_passes(tmp_path):
    """The documented keys, shapes and dtypes are those of ExampleSet.collate's tensors."""
    import pyarrow.parquet as pq
    import torch

    from profuser.training.data import SCHEMA, ExampleSet

    k = 3
    table = pa.table({
        "id": ["a", "b"],
        "input_ids": [[5, 6, 7, 8], [5, 6]],
        "labels": [[-100, -100, 7, 8], [-100, 6]],
        "teacher_ids": [[[1, 2, 3]] * 4, [[1, 2, 3]] * 2],
        "teacher_logits": [[[0.5, 0.1, float("-inf")]] * 4, [[0.5, 0.1, 0.0]] * 2],
        "teacher_mask": [[False, False, True, True], [False, True]],
        "gt_length": [2, 1],
    }).cast(SCHEMA)
    pq.write_table(table, tmp_path / "examples.parquet")
    examples = ExampleSet.load({"training": tmp_path / "examples.parquet"}, max_length=16)
    batch = examples.collate(np.array([0, 1]), np.array([1.0, 0.5]), pad_id=0)
    tensors = {key: value for key, value in batch.items() if torch.is_tensor(value)}
    b, t = 2, 4
    dims = {"B": b, "T": t, "k": k}
    rows = _tables()["The loss batch"]
    assert [_unquote(r[0]) for r in rows] == list(tensors), "docs/plugins.md, the loss batch: keys differ from collate's"
    for key, shape, dtype, meaning in rows:
        tensor = tensors[_unquote(key)]
        assert list(tensor.shape) == [dims[d.strip()] for d in shape.strip("[]").split(",")], key
        assert str(tensor.dtype) == f"torch.{dtype}", key
        assert meaning


def test_loss_needs_match_what_collate_provides(tmp_path):
    """Every documented loss need is a valid one, and collate adds exactly the needed entries."""
    import pyarrow.parquet as pq
    import torch

    from profuser.components import LOSS_NEEDS
    from profuser.training.data import ALL_TEACHERS_SCHEMA, EXTRA_SCHEMA, SCHEMA, ExampleSet

    rows = _tables()["Loss `needs`: extra batch entries"]
    assert [_unquote(r[0]) for r in rows] == list(LOSS_NEEDS)
    table = pa.table({
        "id": ["a"], "input_ids": [[5, 6, 7]], "labels": [[-100, 6, 7]], "teacher_ids": [[[1], [2]]],
        "teacher_logits": [[[0.0], [0.0]]], "teacher_mask": [[True, True]], "gt_length": [2],
        "source": ["src"], "category": [[0, 4]], "teacher_logz": [[1.5, 0.0]],
        "all_teacher_ids": [[[[1], [3]], [[2], [4]]]], "all_teacher_logits": [[[[0.0], [1.0]], [[0.0], [1.0]]]],
        "all_teacher_mask": [[[True, False], [True, True]]], "all_teacher_scores": [[0.5, float("nan")]],
    }).cast(pa.schema([*SCHEMA, *EXTRA_SCHEMA, *ALL_TEACHERS_SCHEMA]))
    pq.write_table(table, tmp_path / "examples.parquet")
    plain = ExampleSet.load({"training": tmp_path / "examples.parquet"}, max_length=8)
    assert not set(plain.collate(np.array([0]), np.array([1.0]), pad_id=0)) & set(LOSS_NEEDS)
    full = ExampleSet.load({"training": tmp_path / "examples.parquet"}, max_length=8, needs=frozenset(LOSS_NEEDS))
    batch = full.collate(np.array([0]), np.array([1.0]), pad_id=0)
    assert batch["example_id"] == ["a"] and batch["mode"] == ["training"] and batch["source"] == ["src"]
    assert batch["category"].dtype == torch.int64 and batch["category"].tolist() == [[-1, 0, 4]]
    assert batch["teacher_logz"].dtype == torch.float32 and batch["teacher_logz"][0, 1:].tolist() == [1.5, 0.0]
    assert batch["teacher_logz"][0, 0].isnan()
    assert batch["all_teacher_ids"].tolist() == [[[[0], [0]], [[1], [3]], [[2], [4]]]]  # [B, T, S, k]
    assert batch["all_teacher_mask"].tolist() == [[[False, False], [True, False], [True, True]]]
    assert batch["all_teacher_scores"][0, 0] == 0.5 and batch["all_teacher_scores"][0, 1].isnan()
