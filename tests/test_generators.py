"""Generators (hf; vllm on a GPU) and the generate stage on tiny random models."""

from __future__ import annotations

import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from profuser_plugins.generators.hf import HFGenerator
from profuser_plugins.generators.vllm import VLLMGenerator

from profuser.components import Prompt, Record
from profuser.data import write_records
from profuser.errors import ModelError
from profuser.pipeline import Runtime, Stage, StageContext
from profuser.plugins import get_engine
from profuser.recipe import ModelSpec
from profuser.stages import generate as generate_stage

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = [
    Prompt(f"p{i}", "You are a helpful assistant." if i % 2 else "", text)
    for i, text in enumerate([
        "What is the capital of France?",
        "Write a short poem about the sea, the wind and the stars at night.",
        "Hello!",
        "Summarise the following paragraph in one sentence: large language models predict the next token.",
        "What is 2 + 2?",
    ])
]


def gen(cls=HFGenerator, **params):
    g = cls(params)
    g.runtime = Runtime(device="cpu", progress=False)
    return g


@pytest.fixture(scope="module")
def sharp_llama_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny llama with its matrices scaled up: a random model at init std answers every prompt
    alike; sharper logits make greedy outputs depend on the prompt, so order bugs show."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(20)
    out = tmp_path_factory.mktemp("models") / "sharp-llama"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(out)
    return out


def test_seeded_sampling_is_repeatable(tiny_llama_dir):
    spec = ModelSpec(ref=str(tiny_llama_dir))
    prompts = PROMPTS[:3]
    g = gen(max_new_tokens=6, temperature=1.0, batch_size=2)
    first = g.generate(spec, prompts, seed=7)
    assert g.generate(spec.identity(), prompts, seed=7) == first  # a spec or its identity dict
    assert g.last_stats["prompts"] == 3 and 0 < g.last_stats["new_tokens"] <= 18
    assert g.generate(spec, prompts, seed=8) != first
    assert gen(max_new_tokens=6, temperature=1.0, batch_size=2).generate(spec, prompts, seed=7) == first
    # the caller's RNG is left alone
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    g.generate(spec, PROMPTS[:1], seed=3)
    assert torch.equal(torch.rand(1), expected)


def test_batches_are_length_sorted_and_restored_to_input_order(sharp_llama_dir):
    spec = ModelSpec(ref=str(sharp_llama_dir))
    batched = gen(max_new_tokens=8, do_sample=False, batch_size=3).generate(spec, PROMPTS, seed=0)
    single = gen(max_new_tokens=8, do_sample=False, batch_size=1).generate(spec, PROMPTS, seed=0)  # one at a time
    assert batched == single
    assert len(set(batched)) == len(PROMPTS)  # the check above can tell prompts apart


def test_stop_strings_are_cut(sharp_llama_dir):
    spec = ModelSpec(ref=str(sharp_llama_dir))
    full = gen(max_new_tokens=12, do_sample=False).generate(spec, PROMPTS[:1], seed=0)[0]
    assert len(full) > 4
    stop = full[2:4]
    cut = gen(max_new_tokens=12, do_sample=False, stop=[stop]).generate(spec, PROMPTS[:1], seed=0)[0]
    assert cut == full[: full.find(stop)]


def test_eos_ends_a_response(sharp_llama_dir, tmp_path):
    import json
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from profuser.chat import format_prompt

    # make the third token the model answers with an end-of-turn token of its generation config
    tok = AutoTokenizer.from_pretrained(sharp_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(sharp_llama_dir)
    ids = tok(format_prompt(tok, "", PROMPTS[0].instruction), return_tensors="pt")["input_ids"]
    answer = model.generate(ids, do_sample=False, max_new_tokens=3)[0, ids.shape[1]:].tolist()
    assert answer[2] not in answer[:2]
    eos_dir = tmp_path / "eos"
    shutil.copytree(sharp_llama_dir, eos_dir)
    config = json.loads((eos_dir / "generation_config.json").read_text())
    config["eos_token_id"] = [tok.eos_token_id, answer[2]]
    (eos_dir / "generation_config.json").write_text(json.dumps(config))

    g = gen(max_new_tokens=8, do_sample=False)
    [out] = g.generate(ModelSpec(ref=str(eos_dir)), PROMPTS[:1], seed=0)
    assert out == tok.decode(answer[:2], skip_special_tokens=True)
    assert g.last_stats["new_tokens"] == 3  # two tokens and the end-of-turn


def test_long_prompts_keep_their_end(tiny_llama_dir):
    g = gen(max_new_tokens=8, do_sample=False)
    out = g.generate(ModelSpec(ref=str(tiny_llama_dir), max_length=40), PROMPTS, seed=0)
    assert len(out) == 5 and g.last_stats["truncated_prompts"] >= 1
    with pytest.raises(ModelError, match="leaves no room"):
        gen(max_new_tokens=50).generate(ModelSpec(ref=str(tiny_llama_dir), max_length=40), PROMPTS, seed=0)


def test_vllm_missing_is_a_clear_error(tiny_llama_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if not installed
    with pytest.raises(ModelError, match=r"pip install 'profuser\[vllm\]'") as err:
        gen(VLLMGenerator).generate(ModelSpec(ref=str(tiny_llama_dir), label="tiny"), PROMPTS, seed=0)
    assert "tiny" in err.value.where


@pytest.mark.gpu
def test_vllm_generates_repeatably(tiny_llama_dir):
    pytest.importorskip("vllm")
    spec = ModelSpec(ref=str(tiny_llama_dir), max_length=256)
    g = VLLMGenerator({"max_new_tokens": 16, "temperature": 1.0, "gpu_memory_utilization": 0.3, "enforce_eager": True})
    g.runtime = Runtime(device="cuda", progress=False)
    first = g.generate(spec, PROMPTS, seed=1)
    assert len(first) == 5 and all(isinstance(r, str) for r in first)
    assert g.generate(spec, PROMPTS, seed=1) == first
    # per-prompt seeds: an answer does not depend on the other prompts in the call
    assert g.generate(spec, PROMPTS[2:], seed=1) == first[2:]
    greedy = VLLMGenerator({"max_new_tokens": 16, "do_sample": False, "gpu_memory_utilization": 0.3, "enforce_eager": True})
    greedy.runtime = g.runtime
    hf = gen(max_new_tokens=16, do_sample=False).generate(spec, PROMPTS, seed=0)
    assert greedy.generate(spec, PROMPTS, seed=0) == hf


# --- the generate stage -----------------------------------------------------------------------------


def stage_ctx(tmp_path, model_dir, out_name="out"):
    data = tmp_path / "data"
    if not data.exists():
        data.mkdir(parents=True)
        write_records(data / "train.parquet",
                      [Record(q.id, q.system, q.instruction, "a reference answer") for q in PROMPTS])
    config = {"model": ModelSpec(ref=str(model_dir), label="tiny").identity(),
              "generator": {"name": "hf", "params": {"max_new_tokens": 6, "temperature": 1.0, "batch_size": 2}},
              "seed": 42}
    out = tmp_path / out_name
    out.mkdir(exist_ok=True)
    stage = Stage("generate/tiny", "generate", config, {"data": "data"})
    return StageContext(stage=stage, inputs={"data": data}, out=out, runtime=Runtime(device="cpu", progress=False),
                        engine=get_engine(), recipe=None)


def test_generate_stage_writes_generations_and_resumes_by_shard(tmp_path, tiny_llama_dir, monkeypatch):
    monkeypatch.setattr(generate_stage, "SHARD_SIZE", 2)
    ctx = stage_ctx(tmp_path, tiny_llama_dir)
    metrics = generate_stage.run(ctx)
    table = pq.read_table(ctx.out / "generations.parquet")
    assert table.column_names == ["id", "response"]
    assert table["id"].to_pylist() == [q.id for q in PROMPTS]
    assert not (ctx.out / "shards").exists()  # joined and removed
    assert metrics["examples"] == 5 and metrics["new_tokens"] > 0 and metrics["tokens_per_s"] > 0
    full = table["response"].to_pylist()

    # a killed attempt left shard 0 (marked, to see that it is reused) and a stale shard 1
    ctx2 = stage_ctx(tmp_path, tiny_llama_dir, "out2")
    (ctx2.out / "shards").mkdir()
    pq.write_table(pa.table({"id": ["p0", "p1"], "response": ["KEPT0", "KEPT1"]}), ctx2.out / "shards" / "00000.parquet")
    pq.write_table(pa.table({"id": ["zz", "p3"], "response": ["x", "y"]}), ctx2.out / "shards" / "00001.parquet")
    generate_stage.run(ctx2)
    resumed = pq.read_table(ctx2.out / "generations.parquet")["response"].to_pylist()
    assert resumed[:2] == ["KEPT0", "KEPT1"]
    assert resumed[2:] == full[2:]  # per-shard seeds: the same as an uninterrupted run

    # finished before the commit: the output is reused as it is
    again = generate_stage.run(ctx2)
    assert again["examples"] == 5
    assert pq.read_table(ctx2.out / "generations.parquet")["response"].to_pylist() == resumed


def test_generate_stage_rejects_a_generator_that_drops_prompts(tmp_path, tiny_llama_dir, monkeypatch):
    from profuser.errors import ProfuserError

    monkeypatch.setattr(HFGenerator, "generate", lambda self, model, prompts, *, seed: ["x"] * (len(prompts) - 1))
    with pytest.raises(ProfuserError, match="returned 4 responses for 5 prompts") as err:
        generate_stage.run(stage_ctx(tmp_path, tiny_llama_dir))
    assert "tiny" in err.value.where


RANK_SCRIPT = """
import json, os, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_generators import stage_ctx
from profuser.stages import generate as generate_stage
from profuser_plugins.generators.hf import HFGenerator

generate_stage.SHARD_SIZE = 2
original = HFGenerator.generate

def logged(self, model, prompts, *, seed):
    with open({log!r}, "a") as fh:
        fh.write(json.dumps([os.environ["RANK"], [p.id for p in prompts]]) + "\\n")
    return original(self, model, prompts, seed=seed)

HFGenerator.generate = logged
generate_stage.run(stage_ctx(Path({tmp!r}), {model!r}))
"""


def test_a_multi_process_launch_splits_the_shards_and_generates_the_same(tmp_path, tiny_llama_dir, monkeypatch, launch_ranks):
    import json
    import sys
    from pathlib import Path

    monkeypatch.setattr(generate_stage, "SHARD_SIZE", 2)
    single = stage_ctx(tmp_path / "single", tiny_llama_dir)
    generate_stage.run(single)
    ranked = tmp_path / "ranked"
    stage_ctx(ranked, tiny_llama_dir)  # writes the data both ranks read
    log = tmp_path / "calls.jsonl"
    script = RANK_SCRIPT.format(tests=str(Path(__file__).parent), tmp=str(ranked), model=str(tiny_llama_dir), log=str(log))
    launch_ranks([sys.executable, "-c", script])
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    by_rank = {rank: sorted(i for r, ids in calls if r == rank for i in ids) for rank in ("0", "1")}
    assert by_rank == {"0": ["p0", "p1", "p4"], "1": ["p2", "p3"]}  # shards 0, 2 and shard 1
    # rank 0 joined every shard; per-shard seeds make it what one process generates
    joined = pq.read_table(ranked / "out" / "generations.parquet")
    assert joined.to_pylist() == pq.read_table(single.out / "generations.parquet").to_pylist()


def test_run_shards_splits_by_rank_and_rank0_joins(tmp_path, monkeypatch):
    keys = [f"k{i}" for i in range(7)]  # shards of 2: [k0 k1] [k2 k3] [k4 k5] [k6]
    computed = []

    def compute(index, rows):
        computed.append(index)
        return pa.table({"id": keys[rows], "response": [f"r{index}"] * (rows.stop - rows.start)}), {"shard": index}

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert generate_stage.run_shards(tmp_path, keys, 2, compute, split=False) is None and computed == []  # rank 0 does all
    assert generate_stage.run_shards(tmp_path, keys, 2, compute) is None and computed == [1, 3]
    monkeypatch.setenv("RANK", "0")
    results = generate_stage.run_shards(tmp_path, keys, 2, compute, poll=0.01)
    assert computed == [1, 3, 0, 2]
    assert [s["shard"] for _, s in results] == [0, 1, 2, 3] and sum((t["id"].to_pylist() for t, _ in results), []) == keys
