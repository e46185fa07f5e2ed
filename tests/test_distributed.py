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
from test_trainer import eval_loss, read_metrics, write_examples

from profuser.errors import ProfuserError
from profuser.plugins import Engine
from profuser.recipe import TrainSpec
from profuser.training import train
from profuser.training.parallel import _autos, fill_deepspeed_config, fill_schedule, make_backend

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
    full_env = {**os.environ, "PROFUSER_DISABLE_ENTRYPOINTS": "1", "OMP_NUM_THREADS": "1", **(env or {})}
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
def test_deepspeed_two_cpu_processes_match_one_process(tmp_path, tiny_llama_dir, examples, single, config, deepspeed_env):
    launcher = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())]
    summary = launch(launcher, tmp_path, tiny_llama_dir, examples, "distributed=deepspeed",
                     f"deepspeed_config={CONFIGS / config}", env=deepspeed_env)
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
    with pytest.raises(ProfuserError, match="optimizer.type is 'SGD'"):
        fill_deepspeed_config({**filled, "optimizer": {"type": "SGD"}}, spec, world_size=1)


# --- HF's stock configs ----------------------------------------------------------------------------
# as the transformers DeepSpeed docs give them (ZeRO-2 and ZeRO-3 examples: "auto" wherever the
# Trainer fills in its arguments; DeepSpeed's own AdamW and WarmupLR; optimizer and params offloaded)

HF_COMMON = {
    "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
             "hysteresis": 2, "min_loss_scale": 1},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                 "warmup_num_steps": "auto"}},
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "steps_per_print": 2000,
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "wall_clock_breakdown": False,
}
HF_ZERO2 = {**HF_COMMON, "zero_optimization": {
    "stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True}, "allgather_partitions": True,
    "allgather_bucket_size": 2e8, "overlap_comm": True, "reduce_scatter": True, "reduce_bucket_size": 2e8,
    "contiguous_gradients": True}}
HF_ZERO3 = {**HF_COMMON, "zero_optimization": {
    "stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
    "offload_param": {"device": "cpu", "pin_memory": True}, "overlap_comm": True, "contiguous_gradients": True,
    "sub_group_size": 1e9, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
    "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 1e9, "stage3_max_reuse_distance": 1e9,
    "stage3_gather_16bit_weights_on_model_save": True}}
HF_CONFIGS = {"zero2": HF_ZERO2, "zero3": HF_ZERO3}


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_hf_stock_configs_are_filled_from_the_recipe(name):
    from deepspeed.runtime.config import DeepSpeedConfig

    spec = TrainSpec(batch_size=8, micro_batch_size=2, lr=3e-4, weight_decay=0.01, scheduler="constant",
                     max_grad_norm=0.5, precision="bf16")
    filled = fill_schedule(fill_deepspeed_config(HF_CONFIGS[name], spec, world_size=1), spec, 3, 40, where=name)
    assert _autos(filled) == []  # every "auto" has a value
    ds = DeepSpeedConfig(filled)
    assert (ds.train_batch_size, ds.train_micro_batch_size_per_gpu, ds.gradient_accumulation_steps) == (8, 2, 4)
    assert ds.gradient_clipping == 0.5 and filled["bf16"]["enabled"] is True and filled["fp16"]["enabled"] is False
    assert filled["optimizer"]["params"] == {"lr": 3e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01}
    assert filled["scheduler"]["params"] == {"warmup_min_lr": 0.0, "warmup_max_lr": 3e-4, "warmup_num_steps": 3}
    # a scheduler of another shape than train.scheduler, or a value the recipe contradicts: named
    with pytest.raises(ProfuserError, match="WarmupLR decays 'constant' but train.scheduler is 'cosine'") as info:
        fill_deepspeed_config(HF_CONFIGS[name], spec.model_copy(update={"scheduler": "cosine"}), world_size=2, where=name)
    assert info.value.where == f"{name}: scheduler.type"
    stated = {**HF_CONFIGS[name], "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    with pytest.raises(ProfuserError, match="lr is 0.001 but the recipe's train section gives 0.0003") as info:
        fill_deepspeed_config(stated, spec, world_size=2, where=name)
    assert info.value.where == f"{name}: optimizer.params.lr"


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_hf_stock_configs_train_on_two_cpu_processes(tmp_path, tiny_llama_dir, examples, name, deepspeed_env):
    config = tmp_path / f"{name}.json"
    config.write_text(json.dumps(HF_CONFIGS[name]))
    launcher = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())]
    summary = launch(launcher, tmp_path / "out", tiny_llama_dir, examples, "distributed=deepspeed",
                     f"deepspeed_config={config}", "scheduler=constant", "report_to=[]", env=deepspeed_env)
    assert summary["backend"] == f"deepspeed-{name}" and summary["world_size"] == 2
    metrics = read_metrics(tmp_path / "out")
    # DeepSpeed's WarmupLR: from 0 up to train.lr over the warm-up steps (ceil(0.1 x 10) = 1, which
    # DeepSpeed raises to its minimum of 2), then flat; train.scheduler's cosine would decay
    lrs = [m["lr"] for m in metrics]
    assert lrs[:2] == [0.0, 0.0] and lrs[2:] == pytest.approx([TRAIN["lr"]] * (len(lrs) - 2)), lrs
    # it learned: the saved model (gathered from the shards under ZeRO-3) fits the examples better
    registry = Engine(entrypoints=False).registry
    before, after = eval_loss(tiny_llama_dir, examples, registry), eval_loss(tmp_path / "out" / "model", examples, registry)
    assert after < before - 0.5, (before, after)


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


def test_lora_under_zero3_on_two_cpu_processes_saves_adapter_and_merged_model(tmp_path, tiny_llama_dir, examples,
                                                                             deepspeed_env):
    from peft import PeftModel
    from safetensors.torch import load_file

    from profuser.models import load_model

    launcher = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())]
    summary = launch(launcher, tmp_path, tiny_llama_dir, examples, "distributed=deepspeed",
                     f"deepspeed_config={CONFIGS / 'zero3.json'}", "report_to=[]",
                     "peft={r: 4, alpha: 8, target_modules: [q_proj, v_proj], merge: true}", env=deepspeed_env)
    assert summary["backend"] == "deepspeed-zero3" and summary["world_size"] == 2
    adapter = load_file(tmp_path / "model" / "adapter" / "adapter_model.safetensors")  # gathered from the shards
    assert adapter and all("lora_" in k for k in adapter)
    assert any(k.endswith("lora_B.weight") and t.abs().sum() > 0 for k, t in adapter.items())  # B starts at 0: it trained
    # the merged model (rank 0 loaded the base plainly after training) equals base + adapter
    merged, _ = load_model(str(tmp_path / "model"))
    base, _ = load_model(str(tiny_llama_dir))
    unmerged = PeftModel.from_pretrained(base, str(tmp_path / "model" / "adapter")).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, unmerged(ids).logits, atol=1e-4)  # [1, 6, V]
