"""Two CPU processes: DDP over gloo (accelerate launch) and DeepSpeed ZeRO-2/3 (torchrun), each
checked against one process with the same global batch; the FSDP and ZeRO configs validated.

Each launched rank logs the ids it trained on per step (``--log-batches``): the test asserts two
ranks that saw different halves of every global batch, so a launch that silently starts one
process, or two unconnected ones, fails. Tolerance of the loss curves: 1e-5 relative — same
examples, same micro-batches, only the order of float32 gradient sums differs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_trainer import read_metrics, write_examples

from profuser.errors import ProfuserError
from profuser.plugins import Engine
from profuser.recipe import TrainSpec
from profuser.training import train
from profuser.training.parallel import fill_deepspeed_config, make_backend

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "recipes" / "configs"
BIN = Path(sys.executable).parent
TRAIN = {"batch_size": 4, "micro_batch_size": 1, "lr": 1e-2, "warmup_ratio": 0.1, "checkpoint_every": 4}
RTOL = 1e-5  # measured: ~1e-7


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    root = tmp_path_factory.mktemp("examples")
    return {"inference": write_examples(root / "inference.parquet", "inference", 8, seed=1),
            "training": write_examples(root / "training.parquet", "training", 8, seed=2)}


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_llama_dir, examples):
    """The reference: one process, accumulation 4 x micro-batch 1 = global batch 4."""
    out = tmp_path_factory.mktemp("single")
    registry = Engine(entrypoints=False).registry
    seen = {}
    train(str(tiny_llama_dir), examples, registry.build("losses", "fuse_kl"), registry.build("curricula", "progressive"),
          TrainSpec(**TRAIN), out, device="cpu", on_batch=lambda step, ids: seen.setdefault(step, ids))
    return read_metrics(out), seen


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher: list[str], out: Path, model: Path, examples: dict, *train_fields: str, env: dict | None = None):
    """``launcher`` + ``-m profuser.training`` with the reference's settings; returns the summary."""
    fields = [f"{k}={v}" for k, v in TRAIN.items()] + list(train_fields)
    cmd = [*launcher, "-m", "profuser.training", "--model", str(model), "--out", str(out), "--device", "cpu",
           "--log-batches", *[f"--examples={m}={p}" for m, p in examples.items()], *[a for f in fields for a in ("-t", f)]]
    full_env = {**os.environ, "PROFUSER_DISABLE_ENTRYPOINTS": "1", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
                **(env or {})}
    done = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


def assert_matches_single(out: Path, single, *, world_size: int = 2):
    metrics, seen = single
    got = read_metrics(out)
    assert [m["world_size"] for m in got] == [world_size] * len(metrics)
    ranks = []
    for rank in range(world_size):
        lines = [json.loads(line) for line in (out / "batches" / f"rank-{rank}.jsonl").read_text().splitlines()]
        ranks.append({line["step"]: line["ids"] for line in lines})
    for step, ids in seen.items():
        halves = [r[step] for r in ranks]
        assert halves[0] != halves[1] and [i for half in halves for i in half] == ids  # each rank its own half of the same global batch
    for a, b in zip(metrics, got):
        assert b["phase"] == a["phase"] and b["lr"] == pytest.approx(a["lr"], rel=1e-9)
        assert b["loss"] == pytest.approx(a["loss"], rel=RTOL), (a["step"], a["loss"], b["loss"])
    assert got[-1]["loss"] != pytest.approx(got[0]["loss"], rel=1e-2)  # it trained


def test_ddp_two_cpu_processes_match_one_process(tmp_path, tiny_llama_dir, examples, single):
    launcher = [str(BIN / "accelerate"), "launch", "--config_file", str(CONFIGS / "ddp-cpu.yaml"),
                "--main_process_port", str(free_port())]
    summary = launch(launcher, tmp_path, tiny_llama_dir, examples, env={"ACCELERATE_USE_CPU": "true"})
    assert summary["backend"] == "ddp" and summary["world_size"] == 2
    assert_matches_single(tmp_path, single)
    assert (tmp_path / "model" / "model.safetensors").is_file() and not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("config", ["zero2.json", "zero3.json"])
def test_deepspeed_two_cpu_processes_match_one_process(tmp_path, tiny_llama_dir, examples, single, config):
    # the first DeepSpeed run on a machine compiles its CPU comm op (~40 s), cached in TORCH_EXTENSIONS_DIR
    launcher = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())]
    summary = launch(launcher, tmp_path, tiny_llama_dir, examples, "distributed=deepspeed",
                     f"deepspeed_config={CONFIGS / config}")
    assert summary["backend"] == f"deepspeed-zero{config[4]}" and summary["world_size"] == 2
    assert_matches_single(tmp_path, single)
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "model" / "model.safetensors")  # gathered from the shards under ZeRO-3
    assert weights and all(t.numel() > 0 for t in weights.values())


# --- configs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("config, stage", [("zero2.json", 2), ("zero3.json", 3)])
def test_deepspeed_configs_validate_with_the_recipe_batch(config, stage):
    from deepspeed.runtime.config import DeepSpeedConfig

    spec = TrainSpec(batch_size=8, micro_batch_size=2, precision="bf16")
    filled = fill_deepspeed_config(json.loads((CONFIGS / config).read_text()), spec, world_size=1)
    ds = DeepSpeedConfig(filled)  # DeepSpeed's own checks (batch arithmetic, zero section)
    assert (ds.zero_optimization_stage, ds.train_batch_size, ds.gradient_accumulation_steps) == (stage, 8, 4)
    assert filled["bf16"]["enabled"] is True and filled["fp16"]["enabled"] is False and ds.gradient_clipping == 1.0
    if stage == 3:
        assert ds.zero_config.gather_16bit_weights_on_model_save  # save_pretrained needs the gathered weights
    with pytest.raises(ProfuserError, match="train_batch_size is 16"):
        fill_deepspeed_config({**filled, "train_batch_size": 16}, spec, world_size=1)
    with pytest.raises(ProfuserError, match="leave optimizer"):
        fill_deepspeed_config({**filled, "optimizer": {"type": "AdamW"}}, spec, world_size=1)


def test_accelerate_configs_parse_into_the_launch_environment(monkeypatch):
    # accelerate's launch helpers write into os.environ: give them a copy that is dropped afterwards,
    # or later tests in this process would find ACCELERATE_USE_FSDP=true
    monkeypatch.setattr(os, "environ", os.environ.copy())
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    def environment(name):
        args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / name), "train.py"])
        args, _, _ = _validate_launch_command(args)
        return args, prepare_multi_gpu_env(args)

    args, env = environment("ddp-cpu.yaml")
    assert args.multi_gpu and not args.cpu and args.num_processes == 2  # the launcher that starts 2 processes
    args, env = environment("fsdp.yaml")
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()  # accelerate's own validation of every FSDP_* value
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert "SHARDED_STATE_DICT" in str(plugin.state_dict_type)


def test_fsdp_on_cpu_is_refused_not_silently_replaced_by_ddp():
    with pytest.raises(ProfuserError, match="FSDP needs GPUs"):
        make_backend(TrainSpec(distributed="fsdp", batch_size=4, micro_batch_size=1), cpu=True)


@pytest.mark.gpu
def test_fsdp_on_gpus(tmp_path, tiny_llama_dir, examples, single):
    n = torch.cuda.device_count()
    launcher = [str(BIN / "accelerate"), "launch", "--config_file", str(CONFIGS / "fsdp.yaml"), "--num_processes", str(n),
                "--mixed_precision", "no", "--main_process_port", str(free_port())]
    summary = launch(launcher, tmp_path, tiny_llama_dir, examples, "distributed=fsdp")
    assert summary["backend"] == "fsdp" and summary["world_size"] == n
    if n == 2:
        assert_matches_single(tmp_path, single)


@pytest.mark.gpu
def test_bf16_on_a_gpu(tmp_path, tiny_llama_dir, examples):
    registry = Engine(entrypoints=False).registry
    summary = train(str(tiny_llama_dir), examples, registry.build("losses", "fuse_kl"), registry.build("curricula", "progressive"),
                    TrainSpec(**{**TRAIN, "precision": "bf16", "gradient_checkpointing": True}), tmp_path, device="cuda")
    assert summary["backend"] == "single" and all(torch.isfinite(torch.tensor(m["loss"])) for m in read_metrics(tmp_path))
