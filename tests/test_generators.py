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

from profuser.artifacts import run_shards
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


# --- vllm: the plumbing of its data parallel (a fake vllm module stands in for the engine) -----------

FAKE_VLLM = """
import json, os

class SamplingParams:
    def __init__(self, **kw):
        self.kw = kw

class _Out:
    def __init__(self, text, n):
        self.text, self.token_ids = text, list(range(n))

class _Request:
    def __init__(self, text, n):
        self.outputs = [_Out(text, n)]

class LLM:
    def __init__(self, **kw):
        self.kw = kw
        self._log({"event": "load", "model": kw["model"]})

    def _log(self, row):
        row.update(devices=os.environ.get("CUDA_VISIBLE_DEVICES"), rank=os.environ.get("RANK"), pid=os.getpid())
        with open(os.environ["FAKE_VLLM_LOG"], "a") as fh:
            fh.write(json.dumps(row) + "\\n")

    def generate(self, prompts, params, use_tqdm=False):
        self._log({"event": "generate", "n": len(prompts)})
        # the response depends only on the prompt's tokens and its own seed, as vLLM's per-request seed
        return [_Request(f"{len(p['prompt_token_ids'])}:{s.kw['seed']}:{s.kw['max_tokens']}", 3)
                for p, s in zip(prompts, params)]

    def shutdown(self):
        self._log({"event": "shutdown"})
"""


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch):
    """A ``vllm`` module on the path of this process and of spawned workers; returns its event log."""
    root = tmp_path / "fake"
    root.mkdir()
    (root / "vllm.py").write_text(FAKE_VLLM)
    log = tmp_path / "vllm-events.jsonl"
    log.touch()
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("FAKE_VLLM_LOG", str(log))
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)

    def events():
        import json

        return [json.loads(line) for line in log.read_text().splitlines()]

    return events


def test_vllm_engine_groups_and_prompt_split():
    from profuser_plugins.generators.vllm import (
        engine_groups,
        ranks_fit,
        split_evenly,
        visible_devices,
        worker_env,
    )

    gpus = [str(i) for i in range(8)]
    assert engine_groups(gpus, 1) == [[g] for g in gpus]  # one engine per GPU
    assert engine_groups(gpus, 2, 3) == [["0", "1"], ["2", "3"], ["4", "5"]]
    assert engine_groups(gpus[:3], 2) == [["0", "1"]]  # a GPU left over is left idle
    # under a launch: each of 4 ranks its block of 2 GPUs
    assert engine_groups(gpus, 1, local_rank=3, local_world=4) == [["6"], ["7"]]
    assert engine_groups(gpus, 2, local_rank=1, local_world=4) == [["2", "3"]]
    assert ranks_fit(gpus, 2, 4) and not ranks_fit(gpus, 2, 8) and not ranks_fit([], 1, 1)
    with pytest.raises(ModelError, match="needs 2 GPU"):
        engine_groups(["0"], 2)
    with pytest.raises(ModelError, match=r"data_parallel_size 5 x tensor_parallel_size 2 needs 10 GPUs; 8 visible"):
        engine_groups(gpus, 2, 5)
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "3, 5"}) == ["3", "5"]
    assert visible_devices({"CUDA_VISIBLE_DEVICES": ""}) == [] and visible_devices({}, count=2) == ["0", "1"]
    env = worker_env(["4", "5"], {"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "1", "PATH": "/bin"})
    assert env == {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "4,5"}
    assert [(s.start, s.stop) for s in split_evenly(7, 3)] == [(0, 3), (3, 5), (5, 7)]
    assert [(s.start, s.stop) for s in split_evenly(2, 4)] == [(0, 1), (1, 2)]


def test_vllm_seeds_are_per_prompt():
    from profuser_plugins.generators.vllm import prompt_seed

    g = VLLMGenerator({"max_new_tokens": 8, "top_k": 5, "stop": ["###"]})
    every = g.sampling_kwargs(["a", "b", "c"], seed=3)
    assert g.sampling_kwargs(["c"], seed=3) == every[2:]  # a prompt's settings do not depend on its neighbours
    assert [kw["seed"] for kw in every] == [prompt_seed(3, i) for i in "abc"] and len({kw["seed"] for kw in every}) == 3
    assert every[0] | {"seed": 0} == {"n": 1, "max_tokens": 8, "min_tokens": 0, "repetition_penalty": 1.0, "stop": ["###"],
                                      "seed": 0, "temperature": 0.7, "top_p": 1.0, "top_k": 5}
    assert VLLMGenerator({"do_sample": False}).sampling_kwargs(["a"], seed=3)[0]["temperature"] == 0.0


def test_stops_that_are_one_special_token_end_a_response_as_token_ids(tiny_llama_dir, tiny_gemma_dir):
    """vLLM matches stop strings against text decoded without special tokens, so `<|im_end|>`
    (mpt-7b-8k-chat's end of turn) never matched: it goes as stop_token_ids (vLLM) and as one more
    eos_token_id (transformers); other stops stay strings."""
    from profuser_plugins.generators._common import split_stops
    from transformers import AutoTokenizer

    from profuser.models import load_model

    llama, gemma = AutoTokenizer.from_pretrained(tiny_llama_dir), AutoTokenizer.from_pretrained(tiny_gemma_dir)
    start = llama.convert_tokens_to_ids("<|im_start|>")
    assert split_stops(llama, ["<|im_start|>", "###", "<|im_start|>x"]) == ([start], ["###", "<|im_start|>x"])
    turn = gemma.convert_tokens_to_ids("<end_of_turn>")
    assert split_stops(gemma, ["<end_of_turn>"]) == ([turn], [])

    vllm = VLLMGenerator({"max_new_tokens": 8, "stop": ["<|im_start|>", "###"]})
    [kwargs] = vllm.sampling_kwargs(["a"], seed=0, tokenizer=llama)
    assert kwargs["stop_token_ids"] == [start] and kwargs["stop"] == ["###"]
    assert "stop_token_ids" not in VLLMGenerator({"stop": ["###"]}).sampling_kwargs(["a"], seed=0, tokenizer=llama)[0]

    model, tok = load_model(str(tiny_llama_dir))
    config = gen(stop=["<|im_start|>", "###"])._generation_config(model, tok)
    assert set(config.eos_token_id) == {tok.eos_token_id, start} and config.stop_strings == ["###"]
    only = gen(stop=["<|im_start|>"])._generation_config(model, tok)
    assert only.stop_strings is None  # generate() then needs no tokenizer for stop strings


def test_vllm_data_parallel_is_per_rank_only_when_each_rank_has_gpus(monkeypatch):
    g = VLLMGenerator({"tensor_parallel_size": 2})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert g.data_parallel and g.groups() == [["2", "3"]]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")  # 2 ranks x 2 GPUs do not fit: rank 0 drives one engine
    assert not g.data_parallel and g.groups() == [["0", "1"]]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert not g.data_parallel
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # one rank per node, on several nodes
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert g.data_parallel and g.groups() == [["0", "1"]]
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not g.data_parallel  # no launch: nothing to split across ranks


def test_vllm_engines_split_prompts_and_match_one_engine(tiny_llama_dir, fake_vllm, monkeypatch):
    spec = ModelSpec(ref=str(tiny_llama_dir), max_length=256)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    one = gen(VLLMGenerator, max_new_tokens=8, tensor_parallel_size=2, data_parallel_size=1)
    single = one.generate(spec, PROMPTS, seed=5)
    assert one.last_stats["engines"] == 1 and [e["pid"] for e in fake_vllm()] == [os.getpid()] * 2  # in-process
    one.close()
    assert fake_vllm()[-1]["event"] == "shutdown"

    two = gen(VLLMGenerator, max_new_tokens=8, tensor_parallel_size=2)  # as many engines as fit: 2
    monkeypatch.setenv("RANK", "0")  # launch variables never reach a worker (a lone engine here, not a rank)
    split = two.generate(spec, PROMPTS, seed=5)
    assert split == single and two.last_stats["engines"] == 2 and two.last_stats["new_tokens"] == 15
    assert two.generate(spec, PROMPTS[:1], seed=5) == single[:1]  # engines stay loaded between calls
    workers = [w.process for w in two._engines["workers"]]
    two.close()
    assert all(not p.is_alive() and p.exitcode == 0 for p in workers)
    events = [e for e in fake_vllm() if e["pid"] != os.getpid()]
    by_devices = {}
    for e in events:
        by_devices.setdefault(e["devices"], []).append((e["event"], e.get("n")))
    # prompts 0-2 on GPUs 0,1; 3-4 on GPUs 2,3; the one-prompt call on the first engine only
    assert by_devices == {"0,1": [("load", None), ("generate", 3), ("generate", 1), ("shutdown", None)],
                          "2,3": [("load", None), ("generate", 2), ("shutdown", None)]}
    assert {e["rank"] for e in events} == {None} and len({e["pid"] for e in events}) == 2


def test_vllm_engine_failure_is_one_line(tiny_llama_dir, fake_vllm, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setenv("FAKE_VLLM_LOG", "/nonexistent/dir/log")  # the engines fail as they load
    g = gen(VLLMGenerator, max_new_tokens=8)
    with pytest.raises(ModelError, match=r"engine on GPU\(s\) 0 failed during loading: FileNotFoundError"):
        g.generate(ModelSpec(ref=str(tiny_llama_dir)), PROMPTS, seed=0)
    assert g._engines == {}


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
    stage = Stage("generate/tiny", "generate", generate_stage.Config.model_validate(config), {generate_stage.DATA: "data"})
    return StageContext(stage=stage, inputs={"data": data}, out=out, runtime=Runtime(device="cpu", progress=False),
                        engine=get_engine())


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


def test_generate_stage_closes_its_generator(tmp_path, tiny_llama_dir, monkeypatch):
    closed = []
    monkeypatch.setattr(HFGenerator, "close", lambda self: closed.append(self), raising=False)
    generate_stage.run(stage_ctx(tmp_path, tiny_llama_dir))
    assert len(closed) == 1  # the engine is shut down when the stage ends (vLLM keeps GPU memory otherwise)


def test_n_samples_per_prompt_each_seeded_sample_0_as_with_one(tiny_llama_dir):
    spec = ModelSpec(ref=str(tiny_llama_dir))
    one = gen(max_new_tokens=6, temperature=1.0, batch_size=2).generate(spec, PROMPTS[:3], seed=7)
    g = gen(max_new_tokens=6, temperature=1.0, batch_size=2, n=3)
    three = g.generate(spec, PROMPTS[:3], seed=7)
    assert [len(s) for s in three] == [3, 3, 3] and [s[0] for s in three] == one
    assert any(len(set(s)) > 1 for s in three)  # each sample has its own seed
    assert g.generate(spec, PROMPTS[:3], seed=7) == three and g.last_stats["samples"] == 3


def test_generate_stage_rejects_n_samples_of_the_wrong_shape(tmp_path, tiny_llama_dir, monkeypatch):
    from profuser.errors import ProfuserError

    monkeypatch.setattr(HFGenerator, "generate", lambda self, model, prompts, *, seed: [["x"]] * len(prompts))
    ctx = stage_ctx(tmp_path, tiny_llama_dir)
    generator = ctx.stage.config.generator
    ctx.stage.config = ctx.stage.config.model_copy(update={"generator": generator.model_copy(update={"params": {**generator.params, "n": 2}})})
    with pytest.raises(ProfuserError, match="n is 2: must return a list of 2 responses for each of the 5 prompts"):
        generate_stage.run(ctx)


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
    assert run_shards(tmp_path, keys, 2, compute, split=False) is None and computed == []  # rank 0 does all
    assert run_shards(tmp_path, keys, 2, compute) is None and computed == [1, 3]
    monkeypatch.setenv("RANK", "0")
    results = run_shards(tmp_path, keys, 2, compute, poll=0.01)
    assert computed == [1, 3, 0, 2]
    assert [s["shard"] for _, s in results] == [0, 1, 2, 3] and [i for t, _ in results for i in t["id"].to_pylist()] == keys
