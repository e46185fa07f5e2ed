"""The built-in verifiable tasks: seeded, varied, and every answer checkable."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
from profuser_plugins.datasets.builtin_tasks import (
    CONVERSIONS,
    COUNTRIES,
    ELEMENTS,
    FAMILIES,
    SYSTEM_MESSAGES,
    generate,
)
from pydantic import ValidationError

from profuser.data import dedup, extract_answer
from profuser.errors import DataError
from profuser.plugins import Engine


@pytest.fixture(scope="module")
def engine():
    return Engine(entrypoints=False)


@pytest.fixture(scope="module")
def default_records(engine):
    return list(engine.registry.build("datasets", "builtin_tasks", {}).records())


def as_json(records) -> str:
    return json.dumps([vars(r) for r in records], ensure_ascii=False, sort_keys=True)


def test_same_params_same_records_byte_for_byte(default_records):
    assert len(default_records) == 240
    assert as_json(default_records) == as_json(generate(240, 0))
    assert as_json(generate(240, 1)) != as_json(default_records)
    # a prefix does not depend on n
    assert as_json(generate(30, 0)) == as_json(default_records[:30])


def test_every_response_ends_with_its_answer(default_records):
    for record in default_records:
        last = record.response.rstrip().splitlines()[-1]
        assert last == f"Answer: {record.meta['answer']}", record.id
        assert extract_answer(record.response) == record.meta["answer"]
        assert isinstance(record.meta["answer"], str) and record.meta["answer"]
        assert record.meta["task"] in FAMILIES
        assert len(record.response) > 3 * len(record.meta["answer"]) + 60  # explained, not just answered


def test_variety(default_records):
    assert Counter(r.meta["task"] for r in default_records) == {f: 48 for f in FAMILIES}
    assert dedup(default_records)[1] == 0 and len({r.id for r in default_records}) == 240
    systems = Counter(r.system for r in default_records)
    assert "" in systems and len(systems) >= 8 and set(systems) <= set(SYSTEM_MESSAGES)
    assert len({r.instruction.split()[0] for r in default_records}) > 20


def test_families_param(engine):
    records = list(engine.registry.build("datasets", "builtin_tasks", {"n": 20, "families": ["units", "strings"]}).records())
    assert {r.meta["task"] for r in records} == {"units", "strings"}
    with pytest.raises(ValidationError):
        engine.registry.build("datasets", "builtin_tasks", {"families": ["poetry"]})
    with pytest.raises(ValidationError):
        engine.registry.build("datasets", "builtin_tasks", {"n": 0})


def test_exhausted_families_fail_clearly():
    facts = generate(120, 0, ["facts"])
    assert len({r.instruction for r in facts}) == 120
    with pytest.raises(DataError, match="ran out of distinct tasks"):
        generate(1000, 0, ["facts"])


def _numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?", text.replace("$", ""))]


def test_answers_are_right():
    """Re-derive answers from the instructions of the task kinds that can be recomputed."""
    capitals = {c: cap for c, cap, _ in COUNTRIES}
    symbols = {name.lower(): sym for name, sym, _, _ in ELEMENTS}
    checked = Counter()
    for r in generate(600, 7):
        q, a = r.instruction, r.meta["answer"]
        if m := re.fullmatch(r"(?:Sort these numbers in|Arrange the following numbers from) (\w+).*: ([\d, ]+)\.", q):
            numbers = sorted(map(int, m.group(2).split(", ")), reverse=m.group(1) in ("descending", "largest"))
            assert a == ", ".join(map(str, numbers)), q
        elif q.startswith("What is the sum of the numbers"):
            assert float(a) == sum(_numbers(q)), q
        elif m := re.fullmatch(r"Reverse the word \"(\w+)\"\.", q):
            assert a == m.group(1)[::-1]
        elif m := re.fullmatch(r"How many words are in the sentence \"(.+)\"\?", q):
            assert int(a) == len(m.group(1).split())
        elif m := re.fullmatch(r"How many times does the letter \"(\w)\" appear in \"(.+)\"\?.*", q):
            assert int(a) == m.group(2).lower().count(m.group(1))
        elif m := re.fullmatch(r"What is the capital of (.+)\?", q):
            assert a == capitals[m.group(1)]
        elif m := re.fullmatch(r"What is the chemical symbol for (.+)\?", q):
            assert a == symbols[m.group(1)]
        elif m := re.fullmatch(r"Convert (-?\d+) degrees Celsius to degrees Fahrenheit\.", q):
            assert float(a) == int(m.group(1)) * 9 / 5 + 32
        elif m := re.fullmatch(r"A (.+) costs \$(\d+)\. It is on sale for (\d+)% off\..*", q):
            assert float(a) == int(m.group(2)) * (100 - int(m.group(3))) / 100
        elif m := re.fullmatch(r".*?(\d+) \w+ (?:that )?cost \$(\d+) each.* with a \$(\d+) bill\..*", q):
            assert float(a) == int(m.group(3)) - int(m.group(1)) * int(m.group(2)), q
        elif m := re.fullmatch(r"(?:Convert ([\d.]+) (\w+) to (\w+)|How many (\w+) are in ([\d.]+) (\w+))\?*\.?", q):
            value, src, dst = (m.group(1), m.group(2), m.group(3)) if m.group(1) else (m.group(5), m.group(6), m.group(4))
            factor = {(big, small): f for big, _, small, f in CONVERSIONS}
            expected = float(value) * factor[src, dst] if (src, dst) in factor else float(value) / factor[dst, src]
            assert float(a) == pytest.approx(expected), q
        else:
            continue
        checked[q.split()[0]] += 1
    assert sum(checked.values()) > 200 and {"Convert", "How", "What", "Sort", "A"} <= set(checked), checked
