"""What the first GPU run would have met (issue 21), checked on the CPU wherever the mechanism
exists there: accelerate's one-per-process state, fp32 master weights, the collective non-finite
guard (2 gloo ranks), no ``.to()`` of a ZeRO-3-partitioned model, pickled ``.bin`` checkpoints,
single-token stop strings. The GPU halves are in tests/test_gpu.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_distributed import TRAIN
from test_trainer import read_metrics, write_examples

from profuser.plugins import Engine
from profuser.recipe import TrainSpec
from profuser.training import train


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    root = tmp_path_factory.mktemp("examples")
    return {"inference": write_examples(root / "inference.parquet", "inference", 4, seed=1),
            "training": write_examples(root / "training.parquet", "training", 4, seed=2)}


def train_cpu(model, examples, out, **fields):
    registry = Engine(entrypoints=False).registry
    return train(model, examples, registry.build("losses", "fuse_kl"), registry.build("curricula", "progressive"),
                 TrainSpec(**{**TRAIN, **fields}), out, device="cpu", keep_checkpoints=True)


# --- accelerate's state: one per process --------------------------------------------------------------


def test_trainings_with_other_precisions_follow_each_other_in_one_process(tmp_path, tiny_llama_dir, examples):
    """accelerate refused a second Accelerator with another mixed_precision ("AcceleratorState has
    already been initialized"): `profuser compare` of an fp32 and a bf16 recipe died after the first."""
    fp32 = train_cpu(str(tiny_llama_dir), examples, tmp_path / "fp32")
    bf16 = train_cpu(str(tiny_llama_dir), examples, tmp_path / "bf16", precision="bf16")
    again = train_cpu(str(tiny_llama_dir), examples, tmp_path / "again")
    assert fp32["steps"] == bf16["steps"] == again["steps"] > 0
    first, low, last = (read_metrics(tmp_path / name) for name in ("fp32", "bf16", "again"))
    assert low[0]["loss"] == pytest.approx(first[0]["loss"], rel=2e-2)  # same weights and batch, bf16 autocast
    assert low[0]["loss"] != first[0]["loss"]  # bf16 did run in bf16
    assert [m["loss"] for m in last] == pytest.approx([m["loss"] for m in first], rel=1e-6)  # and fp32 in fp32 again


# --- fp32 master weights ----------------------------------------------------------------------------


def test_bf16_weights_train_over_an_fp32_master_copy_and_save_in_bf16(tmp_path, tiny_llama_dir, examples):
    """docs/training.md: bf16 autocast over fp32 weights. A spec with dtype bfloat16 used to train
    the bf16 weights themselves (AdamW state in bf16, updates below 2^-8 of a weight lost)."""
    from safetensors import safe_open

    spec = {"ref": str(tiny_llama_dir), "dtype": "bfloat16"}
    train_cpu(spec, examples, tmp_path, precision="bf16")
    ckpt = max((tmp_path / "checkpoints").glob("step-*"))
    optimizer = torch.load(ckpt / "optimizer.pt", weights_only=True)
    moments = [t for state in optimizer["state"].values() for t in state.values() if torch.is_tensor(t) and t.dim()]
    assert moments and {t.dtype for t in moments} == {torch.float32}
    def dtypes(path):
        with safe_open(str(path), "pt") as f:
            return {f.get_slice(name).get_dtype() for name in f.keys()}  # noqa: SIM118 (no __iter__)

    assert dtypes(ckpt / "model.safetensors") == {"F32"}  # the master copy is what resumes
    assert dtypes(tmp_path / "model" / "model.safetensors") == {"BF16"}  # the model keeps its dtype
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"


# --- FSDP2's gradient norm and the guard, across 2 gloo ranks ----------------------------------------


def _two_ranks(rank: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from profuser.training.parallel import full_norm
    from profuser.training.trainer import agreed_problem

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        grad = distribute_tensor(torch.arange(8.0).reshape(4, 2), mesh, [Shard(0)])  # FSDP2 shards dim 0
        norm = torch.linalg.vector_norm(grad)  # a DTensor pending its reduction over the ranks
        # rank 1 alone sees a non-finite gradient norm (a shard that overflowed)
        problem = agreed_problem("the gradient norm is nan" if rank else None, torch.device("cpu"))
        Path(out, f"rank{rank}.json").write_text(json.dumps({"norm": full_norm(norm), "problem": problem}))
    finally:
        dist.destroy_process_group()


def test_fsdp2_gradient_norm_is_global_and_the_guard_is_decided_by_all_ranks(tmp_path):
    from test_distributed import free_port

    torch.multiprocessing.spawn(_two_ranks, args=(free_port(), str(tmp_path)), nprocs=2)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    want = float(torch.arange(8.0).norm())
    assert [g["norm"] for g in got] == pytest.approx([want, want])  # not each rank's shard's norm
    assert got[0]["problem"] == "the loss or gradient norm is not finite on another rank"
    assert got[1]["problem"] == "the gradient norm is nan"  # both skip (or stop): none waits alone


# --- lm-eval's vLLM backend without Ray ------------------------------------------------------------------


def test_lm_eval_vllm_backend_that_cannot_start_is_one_line(tmp_path, monkeypatch):
    """lm-eval before 0.4.13 imported vLLM's LLM inside a try that also imported ray: without ray
    its VLLM died with `NameError: name 'LLM' is not defined`, a traceback."""
    import importlib.util
    import sys
    import types

    from profuser.errors import ProfuserError
    from profuser.evaluation import harness

    class VLLM:  # lm-eval's class as such a version ships it
        def __init__(self, **_):
            raise NameError("name 'LLM' is not defined")

    fake = types.ModuleType("lm_eval.models.vllm_causallms")
    fake.VLLM = VLLM
    monkeypatch.setitem(sys.modules, "lm_eval.models.vllm_causallms", fake)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real_find_spec(name, *a))
    args = harness.vllm_model_args(tmp_path, devices=1)  # one engine: no Ray needed
    with pytest.raises(ProfuserError) as err:
        harness._vllm_lm(tmp_path, "", args)
    assert err.value.where == "evaluate.backend" and len(err.value.lines()) == 1
    assert "NameError: name 'LLM' is not defined" in str(err.value) and "gpu-constraints.txt" in str(err.value)


# --- the dry run warns before a GPU runs out ----------------------------------------------------------


def test_the_dry_run_warns_when_a_stage_exceeds_the_declared_gpu_and_names_the_fix(tmp_path):
    from typer.testing import CliRunner

    from profuser.cli import app

    paper = Path(__file__).resolve().parents[1] / "recipes" / "paper" / "profuser-7b.yaml"
    args = ["run", str(paper), "--dry-run", "--runs-dir", str(tmp_path)]
    plain = CliRunner().invoke(app, [*args, "-o", "train.distributed=none"])  # one process holds all 16 bytes/param
    assert plain.exit_code == 0, plain.output
    [line] = [line for line in plain.output.splitlines() if line.startswith("warning train:")]
    assert "exceeds the 80 GB of one A100-80GB" in line and "train.distributed: deepspeed" in line
    sharded = CliRunner().invoke(app, [*args, "--json"])  # ZeRO-3 over 8 GPUs fits
    assert sharded.exit_code == 0 and json.loads(sharded.output)["warnings"] == []
    fp32 = CliRunner().invoke(app, [*args, "--json", "-o", "target.dtype=float32", "-o", "estimate.gpus=1",
                                    "-o", "train.gradient_checkpointing=false"])
    [warning] = [w for w in json.loads(fp32.output)["warnings"] if w.startswith("train:")]
    assert "more GPUs (estimate.gpus), train.gradient_checkpointing: true" in warning
