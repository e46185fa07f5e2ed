"""The logits stage on tiny random models: stored NLL equals a direct HF loss, both modes, resume."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from profuser.chat import encode_chat
from profuser.components import Record
from profuser.data import write_records
from profuser.errors import DataError
from profuser.logits_store import LogitsReader
from profuser.models import load_model
from profuser.pipeline import Runtime, Stage, StageContext
from profuser.plugins import get_engine
from profuser.recipe import DistillSpec, ModelSpec
from profuser.stages import logits as logits_stage

RECORDS = [
    Record("a", "", "Say hello.", "Hello! How can I help you today?"),
    Record("b", "You are a helpful assistant.", "What is the capital of France?",
           "The capital of France is Paris. It is also its largest city, on the Seine."),
    Record("c", "", "Add two numbers in Python.", "def add(a, b):\n    return a + b"),
    Record("d", "", "Name a pet.", "Cats."),
    Record("e", "", "Translate: good morning", "Bonjour — café au lait, naïve résumé 🙂"),
]


def make_ctx(tmp_path, model_dir, *, mode="training", source="src", records=RECORDS, inputs=None, write=True,
             **distill) -> StageContext:
    data = tmp_path / "data"
    if write:
        data.mkdir(parents=True, exist_ok=True)
        write_records(data / "train.parquet", records)
    config = {"mode": mode, "model": ModelSpec(ref=str(model_dir)).identity(), "source": source,
              "distill": DistillSpec(**{"top_k": 10, "batch_size": 3, "max_length": 256, **distill}).model_dump()}
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return StageContext(stage=Stage(f"logits/{mode}/{source}", "logits", config, {"data": "data"}),
                        inputs={"data": data, **(inputs or {})}, out=out,
                        runtime=Runtime(progress=False, device="cpu", cache_dir=tmp_path / "cache"),
                        engine=get_engine())


def direct(model, tokenizer, record_or_pair, max_length=256):
    """The reference: one unpadded forward with HF's own loss on the response tokens."""
    system, instruction, response = record_or_pair
    enc = encode_chat(tokenizer, system, instruction, response, max_length=max_length)
    ids = torch.tensor([enc.input_ids])
    labels = torch.tensor([enc.labels])
    with torch.inference_mode():
        out = model(input_ids=ids, labels=labels)
    logits = out.logits[0, enc.response_start - 1 : -1].float()  # [n, V], position t-1 predicts token t
    return enc, out.loss.item(), logits


@pytest.fixture(params=["llama", "gemma"])
def model_dir(request, tiny_llama_dir, tiny_gemma_dir):
    return {"llama": tiny_llama_dir, "gemma": tiny_gemma_dir}[request.param]


def test_training_mode_matches_hf_loss(tmp_path, model_dir):
    ctx = make_ctx(tmp_path, model_dir)
    metrics = logits_stage.run(ctx)
    model, tokenizer = load_model(ModelSpec(ref=str(model_dir)))
    reader = LogitsReader(ctx.out)
    nll = reader.nll_table()
    assert sorted(reader.ids) == sorted(r.id for r in RECORDS) and reader.top_k == 10
    total_tokens = 0
    for record in RECORDS:
        enc, loss, logits = direct(model, tokenizer, (record.system, record.instruction, record.response))
        n = len(enc.input_ids) - enc.response_start
        ex = reader.get(record.id)
        total_tokens += n
        assert ex.response == record.response
        np.testing.assert_array_equal(ex.token_ids, enc.input_ids[enc.response_start:])
        np.testing.assert_array_equal(ex.offsets, enc.response_offsets)
        # HF's loss is the mean NLL over the response tokens: the store must hold the same numbers
        assert nll[record.id].n_tokens == n
        assert nll[record.id].nll_sum / n == pytest.approx(loss, rel=1e-4)
        assert nll[record.id].n_bytes == len(record.response.encode())
        np.testing.assert_allclose(ex.logz, torch.logsumexp(logits, -1).numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ex.nll, torch.nn.functional.cross_entropy(logits, torch.tensor(ex.token_ids, dtype=torch.long),
                                                                             reduction="none").numpy(), rtol=1e-4, atol=1e-5)
        top = logits.topk(10)
        np.testing.assert_allclose(ex.topk_logits.astype(np.float32), top.values.numpy(), rtol=1e-3, atol=1e-3)
        # the stored ids carry exactly the stored logits (ranks of near-ties may differ from this run's topk)
        at_ids = logits.gather(-1, torch.from_numpy(ex.topk_ids.astype(np.int64))).numpy()
        np.testing.assert_allclose(ex.topk_logits.astype(np.float32), at_ids, rtol=1e-3, atol=1e-3)
    assert metrics["examples"] == len(RECORDS) and metrics["tokens"] == total_tokens
    assert metrics["computed_examples"] == len(RECORDS) and metrics["resumed_examples"] == 0
    assert metrics["bytes_per_token"] > 0 and metrics["tokens_per_s"] > 0


def test_padding_and_position_masking_do_not_change_results(tiny_llama_dir, monkeypatch):
    monkeypatch.setattr(logits_stage, "CHUNK", 7)  # reductions cross chunk and example boundaries
    model, tokenizer = load_model(ModelSpec(ref=str(tiny_llama_dir)))
    encoded = [logits_stage.encode(tokenizer, logits_stage.Item(r.id, r.system, r.instruction, r.response),
                                   max_length=256, source="src") for r in RECORDS]
    pad = tokenizer.pad_token_id
    with torch.inference_mode():
        batched = logits_stage.score_batch(model, encoded, top_k=5, pad_id=pad, device="cpu", masked=True)
        full = logits_stage.score_batch(model, encoded, top_k=5, pad_id=pad, device="cpu", masked=False)
        single = [logits_stage.score_batch(model, [e], top_k=5, pad_id=pad, device="cpu", masked=True)[0] for e in encoded]
    for a, b, c in zip(batched, full, single):
        for key in ("nll", "logz", "topk_logits"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(a[key], c[key], rtol=1e-5, atol=1e-5)


def test_inference_mode_stores_only_won_generations(tmp_path, tiny_llama_dir):
    generate, select = tmp_path / "generate", tmp_path / "select"
    generate.mkdir()
    select.mkdir()
    generations = {r.id: f"My own answer to {r.id}: {r.instruction.lower()}" for r in RECORDS}
    pq.write_table(pa.table({"id": list(generations), "response": list(generations.values())}), generate / "generations.parquet")
    chosen = {"a": "src", "b": "other", "c": "src", "d": "other", "e": "src"}
    pq.write_table(pa.table({"id": list(chosen), "chosen": list(chosen.values()), "scores": ["{}"] * 5, "detail": ["{}"] * 5}),
                   select / "selection.parquet")
    ctx = make_ctx(tmp_path, tiny_llama_dir, mode="inference", inputs={"generate": generate, "select": select})
    metrics = logits_stage.run(ctx)
    reader = LogitsReader(ctx.out)
    assert sorted(reader.ids) == ["a", "c", "e"] and metrics["examples"] == 3
    model, tokenizer = load_model(ModelSpec(ref=str(tiny_llama_dir)))
    by_id = {r.id: r for r in RECORDS}
    for example_id in reader.ids:
        record = by_id[example_id]
        assert reader.get(example_id).response == generations[example_id]
        _, loss, _ = direct(model, tokenizer, (record.system, record.instruction, generations[example_id]))
        table = reader.nll_table()[example_id]
        assert table.nll_sum / table.n_tokens == pytest.approx(loss, rel=1e-4)

    # a source that won nothing still writes a readable, empty store
    ctx = make_ctx(tmp_path / "none", tiny_llama_dir, mode="inference", source="nobody",
                   inputs={"generate": generate, "select": select})
    assert logits_stage.run(ctx)["examples"] == 0 and LogitsReader(ctx.out).ids == []


def test_inference_mode_missing_generation_names_the_example(tmp_path, tiny_llama_dir):
    generate, select = tmp_path / "generate", tmp_path / "select"
    generate.mkdir()
    select.mkdir()
    pq.write_table(pa.table({"id": ["a"], "response": ["hi"]}), generate / "generations.parquet")
    pq.write_table(pa.table({"id": ["a", "b"], "chosen": ["src", "src"]}), select / "selection.parquet")
    ctx = make_ctx(tmp_path, tiny_llama_dir, mode="inference", inputs={"generate": generate, "select": select})
    with pytest.raises(DataError, match="'b'"):
        logits_stage.run(ctx)


def test_resume_computes_only_missing_examples(tmp_path, tiny_llama_dir):
    # a first attempt finished a shard with the first two examples, then was killed
    first = make_ctx(tmp_path, tiny_llama_dir, records=RECORDS[:2])
    logits_stage.run(first)
    (first.out / "nll.parquet").unlink()
    (first.out / "store.json").unlink()
    before = {i: LogitsReader(first.out).get(i).nll.copy() for i in ("a", "b")}

    metrics = logits_stage.run(make_ctx(tmp_path, tiny_llama_dir))
    assert metrics["resumed_examples"] == 2 and metrics["computed_examples"] == 3 and metrics["examples"] == 5
    reader = LogitsReader(first.out)
    assert sorted(reader.ids) == ["a", "b", "c", "d", "e"]
    for i in ("a", "b"):
        np.testing.assert_array_equal(reader.get(i).nll, before[i])
    # nothing left to do: the model is not even loaded
    again = logits_stage.run(make_ctx(tmp_path, tiny_llama_dir))
    assert again["computed_examples"] == 0 and again["load_seconds"] == 0.0 and again["examples"] == 5


def test_truncation_and_too_long_prompts(tmp_path, tiny_llama_dir):
    long_prompt = Record("long", "", "word " * 300, "short answer")
    with pytest.raises(DataError, match="'long'.*distill.max_length"):
        logits_stage.run(make_ctx(tmp_path / "x", tiny_llama_dir, records=[long_prompt]))

    _, tokenizer = load_model(ModelSpec(ref=str(tiny_llama_dir)))
    record = RECORDS[1]
    full = encode_chat(tokenizer, record.system, record.instruction, record.response, max_length=256)
    cut = full.response_start + 4  # room for four response tokens
    metrics = logits_stage.run(make_ctx(tmp_path, tiny_llama_dir, records=[record], max_length=cut))
    nll = LogitsReader(tmp_path / "out").nll_table()["b"]
    assert metrics["truncated_examples"] == 1 and nll.n_tokens == 4
    assert nll.n_bytes == len(record.response[: full.response_offsets[3, 1]].encode())


RANK_SCRIPT = """
import json, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_logits_stage import make_ctx
from profuser.stages import logits as logits_stage
print(json.dumps(logits_stage.run(make_ctx(Path({tmp!r}), {model!r}, write=False))))
"""


def test_a_multi_process_launch_splits_the_examples_and_stores_one_artifact(tmp_path, tiny_llama_dir, launch_ranks):
    import json
    import sys
    from pathlib import Path

    single = make_ctx(tmp_path / "single", tiny_llama_dir)
    logits_stage.run(single)
    ranked = tmp_path / "ranked"
    make_ctx(ranked, tiny_llama_dir)  # writes the data both ranks read
    script = RANK_SCRIPT.format(tests=str(Path(__file__).parent), tmp=str(ranked), model=str(tiny_llama_dir))
    rank0 = json.loads(launch_ranks([sys.executable, "-c", script])[0].strip().splitlines()[-1])
    assert rank0["world_size"] == 2 and rank0["computed_examples"] == 3 and rank0["examples"] == 5
    # rank r took examples r, r + 2, ... into its own shards; rank 0 indexed all of them
    out = ranked / "out"
    by_rank = {}
    for shard in out.glob("shard-*.arrow"):
        by_rank.setdefault(shard.stem.split("-")[-1], []).extend(pa.ipc.open_file(shard).read_all()["id"].to_pylist())
    assert {r: sorted(ids) for r, ids in by_rank.items()} == {"r0": ["a", "c", "e"], "r1": ["b", "d"]}
    # the same store as one process computes
    one, two = LogitsReader(single.out), LogitsReader(out)
    assert sorted(one.ids) == sorted(two.ids) and one.nll_table().keys() == two.nll_table().keys()
    for example_id in one.ids:
        a, b = one.get(example_id), two.get(example_id)
        np.testing.assert_array_equal(a.token_ids, b.token_ids)
        np.testing.assert_allclose(a.nll, b.nll, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(a.topk_logits.astype(np.float32), b.topk_logits.astype(np.float32), rtol=1e-3, atol=1e-3)


def test_prompts_stream_in_chunks_sorted_by_length_within_each(tmp_path, tiny_llama_dir, monkeypatch):
    whole = make_ctx(tmp_path / "whole", tiny_llama_dir)
    logits_stage.run(whole)
    monkeypatch.setattr(logits_stage, "PROMPT_CHUNK", 2)  # chunks a+b, c+d, e
    chunked = make_ctx(tmp_path / "chunked", tiny_llama_dir)
    metrics = logits_stage.run(chunked)
    assert metrics["examples"] == 5 and metrics["computed_examples"] == 5
    reader, reference = LogitsReader(chunked.out), LogitsReader(whole.out)
    # storage order: each chunk longest first, chunks in data order
    _, tokenizer = load_model(ModelSpec(ref=str(tiny_llama_dir)))
    n = {r.id: len(logits_stage.encode(tokenizer, logits_stage.Item(r.id, r.system, r.instruction, r.response),
                                       max_length=256, source="src").input_ids) for r in RECORDS}
    assert reader.ids == [*sorted("ab", key=lambda i: -n[i]), *sorted("cd", key=lambda i: -n[i]), "e"]
    assert reference.ids != reader.ids  # one chunk: sorted across all five
    for i in reader.ids:
        np.testing.assert_allclose(reader.get(i).nll, reference.get(i).nll, rtol=1e-5, atol=1e-5)
