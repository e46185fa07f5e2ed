"""The GPU-only paths, on tiny random models of the paper's classes (Llama, Gemma-3), asserting
values: HF generation and lm-eval's hf backend on the GPU against the CPU, stage workers between
two model stages, a whole tiny run with ``isolate_stages: auto``, bf16 (+ gradient checkpointing,
+ fp32 master weights) and LoRA in bf16 against fp32, FSDP and ZeRO-3 (curves, gradient norms and
saved weights) against one process; with vLLM: its generation and data parallel, stage workers
between two vLLM engines, lm-eval's vLLM backend against its hf backend. ``gpu``-marked tests skip
without CUDA (conftest.py); ``benchmarks/gpu_check.sh`` runs those that need no vLLM, one line per
check (docs/scaling.md). The first tests here are the CPU-side logic of those paths.

The vLLM tests use the tiny models re-shaped to a head size vLLM's attention kernels take (64)
and with their matrices scaled up, so greedy answers differ between prompts and argmax ties,
where two kernels could disagree, are far apart.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_distributed import BIN, CONFIGS, TRAIN, free_port
from test_evaluation import heldout_parquet
from test_trainer import read_metrics, write_examples

from profuser.components import Prompt
from profuser.errors import ProfuserError
from profuser.evaluation import evaluate_model
from profuser.evaluation.harness import vllm_model_args
from profuser.pipeline import Runtime
from profuser.plugins import Engine
from profuser.recipe import EvaluateSpec, ModelSpec, TrainSpec
from profuser.training import train

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [Prompt(f"p{i}", "You are a helpful assistant." if i % 2 else "", text) for i, text in enumerate([
    "What is the capital of France?", "Write a short poem about the sea.", "Hello!", "What is 2 + 2?",
    "Name three colours.", "Summarise: language models predict the next token.", "Count to five.", "Why is the sky blue?",
])]
BF16_RTOL = 2e-2  # bf16 keeps 8 bits of mantissa: ~0.4% per op; measured on CPU bf16 vs fp32 of this model: < 1%
MULTI_RTOL = 1e-4  # fp32 on a GPU, same batches: only the order of reductions differs
needs_vllm = pytest.mark.skipif(not __import__("importlib").util.find_spec("vllm"), reason="needs vLLM")


# --- CPU: the logic of the GPU paths -----------------------------------------------------------------


def test_vllm_eval_model_args(tmp_path):
    args = vllm_model_args(tmp_path, max_length=512, dtype="bfloat16", tensor_parallel_size=2, devices=4,
                           data_parallel_size=1)
    assert args == {"pretrained": str(tmp_path), "tokenizer": str(tmp_path), "dtype": "bfloat16", "tensor_parallel_size": 2,
                    "data_parallel_size": 1, "gpu_memory_utilization": 0.9, "max_model_len": 512, "seed": 1234,
                    "batch_size": "auto"}
    assert vllm_model_args(tmp_path, devices=1)["data_parallel_size"] == 1
    with pytest.raises(ProfuserError, match="data_parallel_size 3 x tensor_parallel_size 2 needs 6 GPUs; 4 visible"):
        vllm_model_args(tmp_path, tensor_parallel_size=2, data_parallel_size=3, devices=4)
    with pytest.raises(ProfuserError, match="local model directory"):
        vllm_model_args(tmp_path / "missing", devices=1)
    if __import__("importlib").util.find_spec("ray") is None:
        with pytest.raises(ProfuserError, match="need Ray") as err:
            vllm_model_args(tmp_path, devices=8)  # 8 engines
        assert err.value.where == "evaluate.vllm"


def test_evaluate_backend_in_the_recipe():
    assert "backend" not in EvaluateSpec().model_dump()  # hf evaluations keep their cache keys
    spec = EvaluateSpec(backend="vllm", vllm={"tensor_parallel_size": 2})
    assert spec.model_dump()["backend"] == "vllm" and spec.model_dump()["vllm"]["tensor_parallel_size"] == 2
    with pytest.raises(ValueError, match="backend"):
        EvaluateSpec(backend="tgi")


def test_evaluation_outside_a_git_checkout_prints_no_git_error(tmp_path, tiny_llama_dir, monkeypatch, capfd):
    from profuser.models import load_model

    monkeypatch.chdir(tmp_path)  # lm-eval runs `git describe` in the working directory
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    model, tok = load_model(ModelSpec(ref=str(tiny_llama_dir), max_length=256))
    out = evaluate_model(model, tok, ["profuser_heldout"], heldout_path=heldout_parquet(tmp_path / "heldout.parquet"),
                         max_gen_toks=4)
    assert out["_config"]["profuser_heldout"]["samples"] == 2
    err = capfd.readouterr().err
    assert "not a git repository" not in err and "fatal" not in err


# --- GPU: fixtures ----------------------------------------------------------------------------------------


def vllm_sized(tiny_dir: Path, out: Path) -> Path:
    """``tiny_dir``'s model class and tokenizer with head size 64 (2 heads) and sharpened random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_dir)
    config.hidden_size, config.num_attention_heads, config.num_key_value_heads = 128, 2, 1
    config.intermediate_size, config.head_dim = 256, 64
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(8)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=["llama", "gemma"])
def vllm_model(request, tmp_path_factory):
    tiny = request.getfixturevalue(f"tiny_{request.param}_dir")
    return vllm_sized(tiny, tmp_path_factory.mktemp("vllm") / f"vllm-{request.param}")


def vllm_gen(**params):
    from profuser_plugins.generators.vllm import VLLMGenerator

    g = VLLMGenerator({"max_new_tokens": 16, "gpu_memory_utilization": 0.25, "enforce_eager": True, **params})
    g.runtime = Runtime(device="cuda", progress=False)
    return g


def gpu_free() -> int:
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info()[0]


# --- GPU: vLLM ----------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_vllm
def test_vllm_generates_repeatably_and_as_hf_greedy(vllm_model):
    from profuser_plugins.generators.hf import HFGenerator

    spec = ModelSpec(ref=str(vllm_model), max_length=256, dtype="float32")
    free = gpu_free()
    g = vllm_gen(temperature=1.0)
    first = g.generate(spec, PROMPTS, seed=1)
    assert len(first) == len(PROMPTS) and len(set(first)) > 1
    assert g.generate(spec, PROMPTS, seed=1) == first
    assert g.generate(spec, PROMPTS[2:], seed=1) == first[2:]  # per-prompt seeds: neighbours do not matter
    assert g.generate(spec, PROMPTS, seed=2) != first
    g.close()
    assert gpu_free() > free - (1 << 30)  # the engine's memory came back (its weights are a few MB)
    greedy = vllm_gen(do_sample=False)
    hf = HFGenerator({"max_new_tokens": 16, "do_sample": False, "batch_size": 8})
    hf.runtime = Runtime(device="cuda", progress=False)
    ours, theirs = greedy.generate(spec, PROMPTS, seed=0), hf.generate(spec, PROMPTS, seed=0)
    greedy.close()
    same = sum(a == b for a, b in zip(ours, theirs))
    assert same >= len(PROMPTS) - 1, list(zip(ours, theirs))  # one near-tie may flip between the two kernels


@pytest.mark.gpu
@needs_vllm
def test_vllm_data_parallel_generates_what_one_engine_does(vllm_model, monkeypatch):
    spec = ModelSpec(ref=str(vllm_model), max_length=256, dtype="float32")
    one = vllm_gen(temperature=1.0, data_parallel_size=1)
    single = one.generate(spec, PROMPTS, seed=3)
    halves = one.generate(spec, PROMPTS[:3], seed=3) + one.generate(spec, PROMPTS[3:], seed=3)  # split shards
    one.close()
    assert halves == single
    if torch.cuda.device_count() >= 2:  # two engines in spawned workers, one per GPU
        two = vllm_gen(temperature=1.0, data_parallel_size=2)
    else:  # one GPU: a launch of one rank per node drives its engine in a spawned worker
        for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}.items():
            monkeypatch.setenv(name, value)
        two = vllm_gen(temperature=1.0)
        assert two.data_parallel
    free = gpu_free()
    assert two.generate(spec, PROMPTS, seed=3) == single
    workers = [w.process for w in two._engines["workers"]]
    two.close()
    assert all(p.exitcode == 0 for p in workers)
    assert gpu_free() >= free - (256 << 20)  # the workers' memory went with them


@pytest.mark.gpu
@needs_vllm
def test_stage_workers_free_the_gpu_between_two_vllm_engines(tmp_path, tiny_llama_dir, tiny_gemma_dir):
    llama = vllm_sized(tiny_llama_dir, tmp_path / "llama")
    gemma = vllm_sized(tiny_gemma_dir, tmp_path / "gemma")
    recipe = tmp_path / "vllm.yaml"
    # each engine takes 60% of the GPU: the second starts only if the first gave its memory back
    recipe.write_text(textwrap.dedent(f"""
        name: tiny-vllm
        target: {{ref: {llama}, label: llama, max_length: 256}}
        sources:
          - {{ref: {llama}, label: llama, max_length: 256}}
          - {{ref: {gemma}, label: gemma, max_length: 256}}
        data:
          source: {{name: builtin_tasks, params: {{n: 12, seed: 0}}}}
          heldout: 2
        inference_mode:
          generator: {{name: vllm, params: {{max_new_tokens: 12, gpu_memory_utilization: 0.6, enforce_eager: true}}}}
          reward_models:
            - {{name: judge, params: {{model: {llama}, rubric: "Q: {{instruction}} A: {{response}} Good?"}}}}
    """))
    env = {**os.environ, "PROFUSER_DISABLE_ENTRYPOINTS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([str(BIN / "profuser"), "run", str(recipe), "--runs-dir", str(tmp_path / "runs"),
                           "--until", "generate", "-o", "runtime.isolate_stages=true"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=480, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("(worker process)") >= 2
    import pyarrow.parquet as pq

    tables = sorted((tmp_path / "runs" / "store" / "generate").glob("*/generations.parquet"))
    assert len(tables) == 2 and all(pq.read_table(t).num_rows == 10 for t in tables)


# --- GPU: HF generation, stage workers, a whole run ------------------------------------------------


@pytest.fixture(scope="module")
def sharp_llama(tmp_path_factory, tiny_llama_dir):
    """The tiny llama with sharpened weights (greedy answers differ between prompts), fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(20)
    out = tmp_path_factory.mktemp("sharp") / "sharp-llama"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(out)
    return out


@pytest.mark.gpu
def test_hf_generation_on_the_gpu_answers_as_on_the_cpu(sharp_llama):
    from profuser_plugins.generators.hf import HFGenerator

    spec = ModelSpec(ref=str(sharp_llama), max_length=256, dtype="float32")
    answers = {}
    for device in ("cpu", "cuda"):
        g = HFGenerator({"max_new_tokens": 12, "do_sample": False, "batch_size": 4})
        g.runtime = Runtime(device=device, progress=False)
        answers[device] = g.generate(spec, PROMPTS, seed=0)
        sampled = HFGenerator({"max_new_tokens": 12, "temperature": 1.0})
        sampled.runtime = g.runtime
        assert sampled.generate(spec, PROMPTS, seed=1) == sampled.generate(spec, PROMPTS, seed=1)  # seeded on the GPU too
    assert len(set(answers["cpu"])) > 1
    same = sum(a == b for a, b in zip(answers["cpu"], answers["cuda"]))
    assert same >= len(PROMPTS) - 1, list(zip(answers["cpu"], answers["cuda"]))  # one near-tie may flip between kernels


def run_tiny(tmp_path: Path, *overrides: str, until: str | None = None) -> subprocess.CompletedProcess:
    from profuser.testing import tiny_recipe

    recipe = tiny_recipe(tmp_path)
    env = {**os.environ, "PROFUSER_DISABLE_ENTRYPOINTS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [str(BIN / "profuser"), "run", str(recipe), "--runs-dir", str(tmp_path / "runs"),
           *(["--until", until] if until else []), *[a for o in overrides for a in ("-o", o)]]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=420, check=False)


@pytest.mark.gpu
def test_stage_workers_give_the_gpu_back_between_two_model_stages(tmp_path):
    """Two generate stages (two source models) in worker processes: each worker's CUDA memory goes
    with it, and this process never opens a CUDA context for them."""
    done = run_tiny(tmp_path, "runtime.isolate_stages=true", until="generate")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("(worker process)") >= 2
    import pyarrow.parquet as pq

    tables = sorted((tmp_path / "runs" / "store" / "generate").glob("*/generations.parquet"))
    assert len(tables) == 2 and all(pq.read_table(t).num_rows > 0 for t in tables)


@pytest.mark.gpu
def test_a_tiny_run_end_to_end_on_the_gpu_with_isolate_auto(tmp_path):
    done = run_tiny(tmp_path, "runtime.isolate_stages=auto")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "(worker process)" in done.stdout  # auto isolates where CUDA is visible
    results = list((tmp_path / "runs" / "store" / "evaluate").glob("*/results.json"))
    assert results and all(json.loads(r.read_text()) for r in results)
    model = next((tmp_path / "runs" / "store" / "train").glob("*/model/model.safetensors"))
    assert model.stat().st_size > 0


# --- GPU: training ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    root = tmp_path_factory.mktemp("examples")
    return {"inference": write_examples(root / "inference.parquet", "inference", 8, seed=1),
            "training": write_examples(root / "training.parquet", "training", 8, seed=2)}


def train_on_gpu(model, examples, out, **fields):
    registry = Engine(entrypoints=False).registry
    train(model if isinstance(model, dict) else str(model), examples, registry.build("losses", "fuse_kl"),
          registry.build("curricula", "progressive"), TrainSpec(**{**TRAIN, **fields}), out, device="cuda")
    return read_metrics(out)


@pytest.fixture(scope="module")
def single_gpu(tmp_path_factory, tiny_llama_dir, examples):
    """The reference: one process on one GPU, fp32 (its metrics and its saved model)."""
    out = tmp_path_factory.mktemp("single-gpu")
    return train_on_gpu(tiny_llama_dir, examples, out), out


def saved_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(out / "model" / "model.safetensors").items()}


def assert_same_weights(out: Path, reference: Path, rtol: float):
    got, want = saved_weights(out), saved_weights(reference)
    assert got.keys() == want.keys()
    for name in want:
        scale = want[name].abs().max().item() or 1.0
        assert (got[name] - want[name]).abs().max().item() <= rtol * scale, name


@pytest.mark.gpu
def test_bf16_with_gradient_checkpointing_tracks_fp32(tmp_path, tiny_llama_dir, examples, single_gpu):
    """In the same process as the fp32 reference (accelerate's state is reset between trainings)."""
    reference, _ = single_gpu
    bf16 = train_on_gpu(tiny_llama_dir, examples, tmp_path, precision="bf16", gradient_checkpointing=True)
    assert len(bf16) == len(reference)
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in bf16)
    assert bf16[0]["loss"] == pytest.approx(reference[0]["loss"], rel=BF16_RTOL)  # same weights, same batch
    assert bf16[-1]["loss"] < bf16[0]["loss"]  # it trains


@pytest.mark.gpu
def test_bf16_weights_train_over_fp32_master_weights_on_the_gpu(tmp_path, tiny_llama_dir, examples, single_gpu):
    """dtype bfloat16: AdamW updates an fp32 copy (docs/training.md), so the curve follows fp32's."""
    reference, _ = single_gpu
    got = train_on_gpu({"ref": str(tiny_llama_dir), "dtype": "bfloat16"}, examples, tmp_path, precision="bf16")
    for a, b in zip(reference, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=5 * BF16_RTOL), (a["step"], a["loss"], b["loss"])
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"


@pytest.mark.gpu
def test_lora_in_bf16_trains_on_the_gpu(tmp_path, tiny_llama_dir, examples):
    pytest.importorskip("peft")
    got = train_on_gpu({"ref": str(tiny_llama_dir), "dtype": "bfloat16"}, examples, tmp_path, precision="bf16",
                       peft={"r": 4, "alpha": 8, "target_modules": "all-linear"}, lr=5e-3)
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in got)
    assert got[-1]["loss"] < got[0]["loss"]
    assert (tmp_path / "model" / "adapter_model.safetensors").is_file()


def launch_gpu(launcher: list[str], out: Path, model: Path, examples: dict, *fields: str) -> dict:
    cmd = [*launcher, "-m", "profuser.training", "--model", str(model), "--out", str(out), "--device", "cuda",
           *[f"--examples={m}={p}" for m, p in examples.items()],
           *[a for f in [f"{k}={v}" for k, v in TRAIN.items()] + list(fields) for a in ("-t", f)]]
    env = {**os.environ, "PROFUSER_DISABLE_ENTRYPOINTS": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=420, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


def assert_curve_matches(out: Path, reference: list[dict], world: int):
    got = read_metrics(out)
    assert [m["world_size"] for m in got] == [world] * len(reference)
    for a, b in zip(reference, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=MULTI_RTOL), (a["step"], a["loss"], b["loss"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=MULTI_RTOL * 10), a["step"]  # the global norm


@pytest.mark.gpu
def test_fsdp_on_every_gpu_matches_one_process(tmp_path, tiny_llama_dir, examples, single_gpu):
    reference, reference_dir = single_gpu
    n = torch.cuda.device_count()
    launcher = [str(BIN / "accelerate"), "launch", "--config_file", str(CONFIGS / "fsdp.yaml"), "--num_processes", str(n),
                "--mixed_precision", "no", "--main_process_port", str(free_port())]
    summary = launch_gpu(launcher, tmp_path, tiny_llama_dir, examples, "distributed=fsdp")
    assert summary["backend"] == "fsdp" and summary["world_size"] == n
    assert_curve_matches(tmp_path, reference, n)
    assert_same_weights(tmp_path, reference_dir, rtol=1e-3)


@pytest.mark.gpu
def test_zero3_on_every_gpu_matches_one_process(tmp_path, tiny_llama_dir, examples, single_gpu):
    pytest.importorskip("deepspeed")
    reference, reference_dir = single_gpu
    n = torch.cuda.device_count()
    launcher = [str(BIN / "torchrun"), "--nproc_per_node", str(n), "--master_port", str(free_port())]
    summary = launch_gpu(launcher, tmp_path, tiny_llama_dir, examples, "distributed=deepspeed",
                         f"deepspeed_config={CONFIGS / 'zero3.json'}")
    assert summary["backend"] == "deepspeed-zero3" and summary["world_size"] == n
    assert_curve_matches(tmp_path, reference, n)
    assert_same_weights(tmp_path, reference_dir, rtol=1e-3)  # gathered from the shards, equal to one process's


# --- GPU: lm-eval ---------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_lm_eval_hf_backend_on_the_gpu_answers_as_on_the_cpu(tmp_path, sharp_llama):
    from profuser.models import load_model

    spec = ModelSpec(ref=str(sharp_llama), max_length=256)
    heldout = heldout_parquet(tmp_path / "heldout.parquet")
    outs = {}
    for device in ("cpu", "cuda"):
        model, tok = load_model(spec, device=device)
        outs[device] = evaluate_model(model, tok, ["profuser_heldout"], heldout_path=heldout, device=device,
                                      max_gen_toks=8, log_samples=True)
        del model
    key = lambda out: sorted((s["doc_id"], s["prompt"], s["response"]) for s in out["_samples"]["profuser_heldout"])
    assert outs["cuda"]["_config"]["profuser_heldout"]["samples"] == 2
    assert key(outs["cuda"]) == key(outs["cpu"]) and outs["cuda"]["_primary"] == outs["cpu"]["_primary"]


# --- GPU: lm-eval's vLLM backend ------------------------------------------------------------------------


@pytest.mark.gpu
@needs_vllm
def test_lm_eval_vllm_backend_answers_as_hf(tmp_path, tiny_llama_dir):
    from profuser.models import load_model, load_tokenizer

    path = vllm_sized(tiny_llama_dir, tmp_path / "model")
    spec = ModelSpec(ref=str(path), max_length=256)
    heldout = heldout_parquet(tmp_path / "heldout.parquet")
    model, tok = load_model(spec, device="cuda")
    hf = evaluate_model(model, tok, ["profuser_heldout"], heldout_path=heldout, device="cuda", max_gen_toks=8, log_samples=True)
    del model
    torch.cuda.empty_cache()
    ours = evaluate_model(path, load_tokenizer(spec), ["profuser_heldout"], heldout_path=heldout, max_gen_toks=8,
                          log_samples=True, backend="vllm",
                          vllm_args={"dtype": "float32", "data_parallel_size": 1, "gpu_memory_utilization": 0.3})
    assert ours["_config"]["profuser_heldout"]["samples"] == hf["_config"]["profuser_heldout"]["samples"] == 2
    key = lambda out: sorted((s["doc_id"], s["prompt"], s["response"]) for s in out["_samples"]["profuser_heldout"])
    assert key(ours) == key(hf)  # the same chat-formatted prompts, the same greedy answers
    assert ours["_primary"] == hf["_primary"]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-m", "gpu", "-v"]))
