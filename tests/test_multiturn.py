"""Whole conversations (issue 22 item 1): a multi-turn record keeps its earlier turns
(``meta.history``); generation continues the conversation at its last user turn; teacher forcing,
alignment, Min-CE, the trainer's labels and the held-out bits per byte cover every assistant turn
(``data.turns: all``, the default) or the last one only (``data.turns: last``), always in full
context; a single-turn record encodes exactly as before."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from profuser.chat import (
    TURN_SEPARATOR,
    conversation_history,
    encode_chat,
    format_prompt,
    labelled_text,
    prompt_ids,
    response_of,
)
from profuser.cli import app
from profuser.data import ColumnMap, RowFormatParams, row_to_record, rows_to_records
from profuser.testing import tiny_recipe, tiny_tokenizer

SAMPLE = Path(__file__).parent / "data" / "sharegpt-multiturn.jsonl"

TURNS = [("system", "Be brief."), ("user", "What is the capital of France?"), ("assistant", "The capital of France is Paris."),
         ("user", "And of Japan?"), ("assistant", "Tokyo is the capital of Japan."), ("user", "Thanks!"),
         ("assistant", "You are welcome.")]
HISTORY = [{"role": r, "content": t} for r, t in TURNS[1:5]]
SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}


def _check(record):
    assert record.system == "Be brief." and record.instruction == "Thanks!" and record.response == "You are welcome."
    assert conversation_history(record.meta) == HISTORY


def test_sharegpt_messages_and_columns_read_the_same_conversation():
    sharegpt = {"id": "a", "conversations": [{"from": SHAREGPT_ROLE[r], "value": t} for r, t in TURNS]}
    messages = {"id": "a", "messages": [{"role": r, "content": t} for r, t in TURNS]}
    _check(row_to_record(sharegpt, "sharegpt", "f:1"))
    _check(row_to_record(messages, "messages", "f:1"))
    # a hub dataset's own column names, through `columns:` (both turn layouts)
    for row, field in ((sharegpt, "conversations"), (messages, "messages")):
        renamed = {"uid": "a", "chat": row[field]}
        params = RowFormatParams(columns=ColumnMap(messages="chat", id="uid"))
        [record] = list(rows_to_records([("f:1", renamed)], params))
        _check(record)
        assert record.id == "a" and "chat" not in record.meta


def test_dedup_compares_a_conversations_earlier_turns():
    from profuser.data import dedup

    def conv(first_answer):
        turns = [("user", "Hi"), ("assistant", first_answer), ("user", "Thanks!"), ("assistant", "You are welcome.")]
        return row_to_record({"messages": [{"role": r, "content": t} for r, t in turns]}, "messages", "f:1")

    single = row_to_record({"messages": [{"role": "user", "content": "Thanks!"},
                                         {"role": "assistant", "content": "You are welcome."}]}, "messages", "f:2")
    kept, removed = dedup([conv("Hello."), conv("Hey there."), conv("hello. "), single])
    assert removed == 1 and [conversation_history(r.meta)[1]["content"] for r in kept[:2]] == ["Hello.", "Hey there."]
    assert kept[2] is single  # same last turn, no earlier turns: another example


def test_columns_messages_excludes_instruction_and_response():
    with pytest.raises(ValueError, match="drop instruction"):
        ColumnMap(messages="chat", instruction="q")
    with pytest.raises(ValueError, match="messages"):
        ColumnMap(id="x")


def _decoded(tok, ids):
    return tok.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("arch,eot", [("llama", "<|im_end|>\n"), ("gemma", "<eos>")])
def test_encode_chat_labels_every_assistant_turn_and_nothing_else(arch, eot):
    tok = tiny_tokenizer(arch)  # llama: its ChatML template; gemma: none, the fallback
    enc = encode_chat(tok, "Be brief.", "Thanks!", "You are welcome.", max_length=4096, history=HISTORY)
    labelled = _decoded(tok, enc.label_ids)
    assert labelled == f"The capital of France is Paris.{eot}Tokyo is the capital of Japan.{eot}You are welcome.{eot}"
    assert "What is the capital" in _decoded(tok, enc.input_ids)  # the first turn is in the context
    labels = np.asarray(enc.labels)
    assert (labels[enc.positions] == np.asarray(enc.input_ids)[enc.positions]).all()
    assert (labels != -100).sum() == len(enc.positions) == len(enc.response_offsets)
    # offsets index the labelled text: the turns' characters in order, each turn's end after it
    text = labelled_text("You are welcome.", HISTORY)
    assert text == TURN_SEPARATOR.join(["The capital of France is Paris.", "Tokyo is the capital of Japan.", "You are welcome."])
    assert response_of(text, HISTORY) == "You are welcome."
    covered = "".join(text[a:b] for a, b in enc.response_offsets)
    assert covered == text.replace(TURN_SEPARATOR, "")
    assert (np.diff(enc.response_offsets[:, 0]) >= 0).all()


def test_context_only_turns_and_single_turn_records():
    tok = tiny_tokenizer("llama")
    context_only = [{**m, "train": False} for m in HISTORY]  # data.turns: last
    enc = encode_chat(tok, "Be brief.", "Thanks!", "You are welcome.", max_length=4096, history=context_only)
    assert enc.positions is None and _decoded(tok, enc.label_ids) == "You are welcome.<|im_end|>\n"
    assert "Tokyo is the capital" in _decoded(tok, enc.input_ids[:enc.response_start])
    assert labelled_text("You are welcome.", context_only) == "You are welcome."
    # the generation prompt continues the conversation at its last user turn
    prompt = format_prompt(tok, "Be brief.", "Thanks!", history=HISTORY)
    assert prompt.startswith("<|im_start|>system\nBe brief.") and "Tokyo is the capital of Japan.<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>user\nThanks!<|im_end|>\n<|im_start|>assistant\n")
    assert prompt_ids(tok, "Be brief.", "Thanks!", history=HISTORY) == enc.input_ids[:enc.response_start]
    # no history: the single-turn encoding (what every existing artifact holds)
    one = encode_chat(tok, "Be brief.", "Thanks!", "You are welcome.", max_length=4096)
    same = encode_chat(tok, "Be brief.", "Thanks!", "You are welcome.", max_length=4096, history=[])
    assert one.positions is None and one.input_ids == same.input_ids and one.response_start == same.response_start
    assert np.array_equal(one.response_offsets, same.response_offsets)
    assert _decoded(tok, one.input_ids).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nThanks!")


def test_a_template_that_rewrites_earlier_answers_is_named_with_the_way_out():
    from profuser.errors import ModelError

    tok = tiny_tokenizer("llama")
    # like reasoning models' templates, which drop what earlier answers thought
    drops = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
             "{% if m['role'] == 'assistant' and not loop.last %}{{ m['content'][:4] }}{% else %}{{ m['content'] }}{% endif %}"
             "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    with pytest.raises(ModelError, match="earlier assistant.*data.turns: last"):
        encode_chat(tok, "", "Thanks!", "You are welcome.", max_length=4096, chat_template=drops, history=HISTORY)
    context_only = [{**m, "train": False} for m in HISTORY]
    enc = encode_chat(tok, "", "Thanks!", "You are welcome.", max_length=4096, chat_template=drops, history=context_only)
    assert _decoded(tok, enc.label_ids) == "You are welcome.<|im_end|>\n"


def test_truncation_keeps_the_labelled_positions_in_range():
    tok = tiny_tokenizer("llama")
    full = encode_chat(tok, "", "Thanks!", "You are welcome.", max_length=4096, history=HISTORY)
    cut = encode_chat(tok, "", "Thanks!", "You are welcome.", max_length=full.response_start + 2, history=HISTORY)
    assert len(cut.input_ids) == full.response_start + 2 and cut.truncated == len(full.input_ids) - len(cut.input_ids)
    assert cut.positions.max() < len(cut.input_ids) and len(cut.positions) == len(cut.response_offsets)
    assert list(cut.positions) == [p for p in full.positions if p < len(cut.input_ids)]


def test_min_ce_compares_every_labelled_turn():
    from profuser_plugins.evaluators.min_ce import MinCE

    from profuser.components import Candidates, SourceNLL

    text = labelled_text("You are welcome.", HISTORY)
    n = len(text.encode("utf-8"))
    whole = Candidates(id="c", reference="You are welcome.", meta={"history": HISTORY},
                       nll={"a": SourceNLL(30.0, 20, n), "b": SourceNLL(20.0, 25, n)})
    choice = MinCE().select([whole])[0]
    assert choice.chosen == "b" and "truncated" not in choice.detail  # both cover every turn: summed NLL
    # b's context cut the last turn short: both are compared per byte on the prefix both cover
    ends_a = [len(text) * (i + 1) // 20 for i in range(20)]
    ends_b = [e for e in ends_a if e <= len(text) - 8]
    cut = Candidates(id="c", reference="You are welcome.", meta={"history": HISTORY}, nll={
        "a": SourceNLL(30.0, 20, n, [1.5] * 20, ends_a),
        "b": SourceNLL(20.0, len(ends_b), len(text[:ends_b[-1]].encode()), [2.0] * len(ends_b), ends_b)})
    choice = MinCE().select([cut])[0]
    assert choice.detail["truncated"] == ["b"] and choice.detail["prefix_chars"] == ends_b[-1]
    assert choice.chosen == "a"  # 1.5 vs 2.0 nats per token over the same prefix


def test_heldout_bpb_scores_every_assistant_turn_in_context(tmp_path):
    from profuser.chat import template_for
    from profuser.evaluation.heldout import bpb_docs, heldout_ids
    from profuser.evaluation.tasks import HELDOUT_BPB_TASK

    tok = tiny_tokenizer("llama")
    path = tmp_path / "heldout.parquet"
    pq.write_table(pa.table({"id": ["c", "s"], "system": ["Be brief.", ""], "instruction": ["Thanks!", "Hi"],
                             "response": ["You are welcome.", "Hello."],
                             "meta": [json.dumps({"history": HISTORY}), "{}"]}), path)
    docs = pq.read_table(bpb_docs(path, tok, template_for(tok), tmp_path)).to_pylist()
    assert [d["id"] for d in docs] == heldout_ids(path, HELDOUT_BPB_TASK) == ["c/turn1", "c/turn2", "c", "s"]
    first, second, last, single = docs
    assert first["continuation"] == "The capital of France is Paris.<|im_end|>\n"
    assert "What is the capital of France?" in first["context"] and "Paris" not in first["context"]
    assert second["context"].endswith("And of Japan?<|im_end|>\n<|im_start|>assistant\n")
    assert last["continuation"] == "You are welcome.<|im_end|>\n" and "Tokyo" in last["context"]
    assert [d["n_bytes"] for d in docs] == [31, 30, 16, 6]
    assert single["context"] == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_win_rate_answers_continue_the_conversation(tmp_path):
    from profuser.evaluation.judged import heldout_prompts

    path = tmp_path / "heldout.parquet"
    pq.write_table(pa.table({"id": ["c", "s"], "system": ["", ""], "instruction": ["Thanks!", "Hi"],
                             "response": ["You are welcome.", "Hello."],
                             "meta": [json.dumps({"history": HISTORY}), "{}"]}), path)
    conversation, single = heldout_prompts(path)
    assert conversation.history == HISTORY and single.history == []


# --- the pipeline on a ShareGPT file --------------------------------------------------------------


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def multiturn_run(tiny_root):
    """The tiny recipe on the ShareGPT sample to its build stages (both modes)."""
    recipe = tiny_recipe(tiny_root, {"data.source": {"name": "file", "params": {"path": str(SAMPLE)}},
                                     "data.heldout": 3, "evaluate.tasks": ["profuser_heldout_bpb"]})
    runs = tiny_root / "runs-multiturn"
    result = cli("run", recipe, "--runs-dir", runs, "--device", "cpu", "--until", "build")
    assert result.exit_code == 0, result.output
    return recipe, runs


def _data(runs):
    store = runs / "store" / "data"
    [data] = [d for d in store.iterdir() if (d / "manifest.json").exists()]
    return data


def test_until_build_trains_every_assistant_turn_in_full_context(multiturn_run, tiny_root):
    _, runs = multiturn_run
    from transformers import AutoTokenizer

    data = _data(runs)
    stats = json.loads((data / "stats.json").read_text())
    assert stats["conversations"]["multi_turn"] >= 8
    assert stats["conversations"]["labelled_assistant_turns"] == stats["conversations"]["assistant_turns"]
    records = {r["id"]: r for r in pq.read_table(data / "train.parquet").to_pylist()}
    tok = AutoTokenizer.from_pretrained(tiny_root / "models" / "tiny-llama")  # the target
    seen = {"training": 0, "inference": 0}
    multi = 0
    for build in (runs / "store" / "build").iterdir():
        if not (build / "manifest.json").exists():
            continue
        for ex in pa.ipc.open_file(build / "examples.arrow").read_all().to_pylist():
            record = records[ex["id"]]
            history = conversation_history(record["meta"])
            text = tok.decode(ex["input_ids"])
            first_user = (history[0]["content"] if history else record["instruction"])
            assert first_user in text  # the first turn's text is in the trained context
            labelled = [t for t in ex["labels"] if t != -100]
            assert len(labelled) == len(ex["teacher_mask"]) == ex["response_length"]
            # the labelled tokens are exactly the assistant turns (each with its end of turn), in order
            turns = [m["content"] for m in history if m["role"] == "assistant"]
            response = record["response"] if ex["mode"] == "training" else None
            decoded = tok.decode(labelled)
            pieces = decoded.split("<|im_end|>\n")
            assert pieces[-1] == "" and pieces[:len(turns)] == turns, decoded
            if response is not None:
                assert pieces[len(turns)] == response
            assert len(pieces) == len(turns) + 2
            # nothing else: every unlabelled token is outside the assistant turns
            unlabelled = tok.decode([t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab == -100])
            assert all(turn not in unlabelled for turn in turns)
            seen[ex["mode"]] += 1
            multi += bool(turns)
    assert seen["training"] == seen["inference"] == len(records) and multi >= 2 * 7


def test_turns_last_keeps_earlier_turns_as_context_and_changes_only_the_data_key(multiturn_run, tiny_root):
    recipe, runs = multiturn_run
    dry = cli("run", recipe, "--runs-dir", runs, "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    last = cli("run", recipe, "--runs-dir", runs, "--dry-run", "--json", "-o", "data.turns=last")
    assert last.exit_code == 0, last.output
    keys = {s["id"]: s["key"] for s in json.loads(dry.output)["stages"]}
    keys_last = {s["id"]: s["key"] for s in json.loads(last.output)["stages"]}
    assert keys["data"] != keys_last["data"]  # and so every stage after it
    assert all(keys[i] != keys_last[i] for i in keys)
    result = cli("run", recipe, "--runs-dir", tiny_root / "runs-last", "--device", "cpu", "--until", "data",
                 "-o", "data.turns=last")
    assert result.exit_code == 0, result.output
    data = _data(tiny_root / "runs-last")
    stats = json.loads((data / "stats.json").read_text())["conversations"]
    rows = pq.read_table(data / "train.parquet").to_pylist() + pq.read_table(data / "heldout.parquet").to_pylist()
    assert stats["labelled_assistant_turns"] == len(rows) < stats["assistant_turns"]  # the last turn of each
    for row in rows:
        for turn in conversation_history(row["meta"]):
            assert turn.get("train", True) is (turn["role"] != "assistant")


def test_tiny_full_run_scores_every_heldout_assistant_turn(multiturn_run):
    recipe, runs = multiturn_run
    result = cli("run", recipe, "--runs-dir", runs, "--device", "cpu")
    assert result.exit_code == 0, result.output
    summary = json.loads((runs / "runs" / "tiny" / "run.json").read_text())
    [evaluate] = [s for s in summary["stages"] if s["id"] == "evaluate/fused"]
    per_example = pq.read_table(runs / "store" / "evaluate" / evaluate["key"] / "per_example.parquet").to_pylist()
    heldout = pq.read_table(_data(runs) / "heldout.parquet").to_pylist()
    expected = []
    for row in heldout:
        n = sum(m["role"] == "assistant" for m in conversation_history(row["meta"]))
        expected += [f"{row['id']}/turn{j}" for j in range(1, n + 1)] + [row["id"]]
    assert sorted(r["id"] for r in per_example) == sorted(expected) and len(expected) > len(heldout)
    assert all(np.isfinite(r["value"]) and r["value"] > 0 for r in per_example)


def test_export_gives_the_whole_conversation_as_messages(multiturn_run, tmp_path):
    from datasets import load_from_disk

    _, runs = multiturn_run
    out = tmp_path / "select-ds"
    result = cli("export", "tiny", "--stage", "select", "--to", out, "--mode", "training", "--runs-dir", runs)
    assert result.exit_code == 0, result.output
    records = {r["id"]: r for r in pq.read_table(_data(runs) / "train.parquet").to_pylist()}
    multi = 0
    for row in load_from_disk(str(out)):
        record = records[row["id"]]
        history = [{"role": m["role"], "content": m["content"]} for m in conversation_history(record["meta"])]
        system = [{"role": "system", "content": record["system"]}] if record["system"] else []
        assert row["messages"] == system + history + [{"role": "user", "content": record["instruction"]},
                                                      {"role": "assistant", "content": record["response"]}]
        multi += bool(history)
    assert multi >= 7
