"""The two ways the trainer runs a model: accelerate (one process, DDP, FSDP) or DeepSpeed ZeRO.

Both present the same few verbs to the loop in ``trainer.py`` — prepare, micro-step, step, save,
load, full state dict — and leave the work to the library. DeepSpeed runs go through
``deepspeed.initialize`` directly rather than accelerate's DeepSpeed integration, because the latter
needs an accelerator device: on a CPU-only machine accelerate silently drops DeepSpeed (and with
``--cpu`` starts a single process), while DeepSpeed itself runs ZeRO on CPU over gloo.

Which backend: ``train.distributed: deepspeed`` in the recipe, or a launch by
``accelerate launch --use_deepspeed`` (env ``ACCELERATE_USE_DEEPSPEED=true``); otherwise accelerate,
which picks DDP/FSDP from its own launch configuration (``recipes/configs/*.yaml``).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ProfuserError
from ..recipe import TrainSpec

MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def make_backend(spec: TrainSpec, *, cpu: bool) -> AccelerateBackend | DeepSpeedBackend:
    """The backend for this process; ``cpu`` forces CPU even where a GPU is visible."""
    use_ds = spec.distributed == "deepspeed" or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    if use_ds:
        config = spec.deepspeed_config or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if not config:
            raise ProfuserError("train.deepspeed_config is required with distributed: deepspeed "
                                "(e.g. recipes/configs/zero2.json)", where="train.deepspeed_config")
        return DeepSpeedBackend(spec, config, cpu=cpu)
    return AccelerateBackend(spec, cpu=cpu)


def accumulation_steps(spec: TrainSpec, world_size: int) -> int:
    """Micro-batches per rank per optimizer step: global batch = micro batch * steps * world size."""
    per_step = spec.micro_batch_size * world_size
    if spec.batch_size % per_step:
        raise ProfuserError(f"train.batch_size ({spec.batch_size}) must be a multiple of micro_batch_size "
                            f"({spec.micro_batch_size}) x processes ({world_size})", where="train.batch_size")
    return spec.batch_size // per_step


class AccelerateBackend:
    def __init__(self, spec: TrainSpec, *, cpu: bool):
        from accelerate import Accelerator, FullyShardedDataParallelPlugin

        if spec.distributed == "fsdp" and cpu:  # refuse before accelerate exports ACCELERATE_USE_FSDP into os.environ
            raise ProfuserError("FSDP needs GPUs; on CPU use DDP or DeepSpeed", where="train.distributed")
        kwargs: dict[str, Any] = {}
        if spec.distributed == "fsdp" and os.environ.get("ACCELERATE_USE_FSDP", "").lower() != "true":
            kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin()  # defaults; a launch config overrides
        # the world size is known only once the process group is up, so accumulation is set after
        self.accelerator = Accelerator(cpu=cpu, mixed_precision=MIXED_PRECISION[spec.precision], **kwargs)
        # accelerate falls back without a word: FSDP needs GPUs (on CPU it runs plain DDP), and a
        # launch whose ranks did not join one process group trains N independent copies
        kind = str(self.accelerator.distributed_type).split(".")[-1].lower()  # no, multi_cpu, multi_gpu, fsdp
        wants_fsdp = spec.distributed == "fsdp" or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
        if wants_fsdp and kind != "fsdp":
            raise ProfuserError(f"FSDP was asked for but accelerate set up {kind!r} (FSDP needs GPUs; on CPU use "
                                "DDP or DeepSpeed)", where="train.distributed")
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched != self.accelerator.num_processes:
            raise ProfuserError(f"launched with WORLD_SIZE={launched} but accelerate joined {self.accelerator.num_processes} "
                                "process(es)", where="train.distributed")
        self.accum = accumulation_steps(spec, self.accelerator.num_processes)
        self.accelerator.gradient_accumulation_steps = self.accum
        self.max_grad_norm = spec.max_grad_norm
        self.rank = self.accelerator.process_index
        self.world_size = self.accelerator.num_processes
        self.device = self.accelerator.device
        self.is_main = self.accelerator.is_main_process
        self.name = {"no": "single", "multi_cpu": "ddp", "multi_gpu": "ddp"}.get(kind, kind)

    def prepare(self, model, optimizer, scheduler):
        # the scheduler stays ours: a prepared one steps num_processes times per optimizer step
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.scheduler = scheduler
        self.accelerator.register_for_checkpointing(scheduler)
        return self.model

    def micro_step(self, loss_fn, share: float):
        """Forward + backward of one micro-batch; ``loss_fn(model)`` returns (loss, parts), the loss
        a mean over the micro-batch's labelled tokens, ``share`` = its tokens / the global batch's.
        DDP all-reduces gradients only on the last micro-batch of a step (``accumulate``)."""
        with self.accelerator.accumulate(self.model):
            loss, parts = loss_fn(self.model)
            # backward divides by the accumulation steps and DDP averages over ranks: undo both
            self.accelerator.backward(loss * (share * self.accum * self.world_size))
        return loss, parts

    def step(self) -> float | None:
        """Clip, update, schedule, zero the gradients; returns the pre-clip gradient norm."""
        assert self.accelerator.sync_gradients, "step() must follow the last micro-batch of a step"
        if self.max_grad_norm is None:
            norm = None
        else:
            norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return None if norm is None else float(norm)

    def save(self, path: Path) -> None:
        self.accelerator.save_state(str(path))  # model, optimizer, scheduler, every rank's RNG

    def load(self, path: Path) -> None:
        self.accelerator.load_state(str(path))

    def full_state_dict(self) -> dict | None:
        return self.accelerator.get_state_dict(self.model)  # gathers FSDP shards

    def unwrap(self):
        return self.accelerator.unwrap_model(self.model)

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()


class DeepSpeedBackend:
    def __init__(self, spec: TrainSpec, config_path: str, *, cpu: bool):
        import deepspeed

        try:
            config = json.loads(Path(config_path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ProfuserError(f"cannot read the DeepSpeed config: {exc}", where=config_path) from None
        if not torch.distributed.is_initialized():
            deepspeed.init_distributed(dist_backend="gloo" if cpu or not torch.cuda.is_available() else "nccl")
        self.world_size = torch.distributed.get_world_size()
        self.rank = torch.distributed.get_rank()
        self.is_main = self.rank == 0
        self.accum = accumulation_steps(spec, self.world_size)
        self.config = fill_deepspeed_config(config, spec, self.world_size, where=config_path)
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        accel = deepspeed.get_accelerator()
        if accel.device_name() != "cpu":
            accel.set_device(local_rank)
        self.device = torch.device(accel.device_name(local_rank))
        self.zero_stage = self.config.get("zero_optimization", {}).get("stage", 0)
        self.name = f"deepspeed-zero{self.zero_stage}"
        if self.zero_stage == 3:
            # kept alive so that from_pretrained builds the model partitioned (zero.Init)
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds_config = HfDeepSpeedConfig(self.config)

    def prepare(self, model, optimizer, scheduler):
        import deepspeed

        # DeepSpeed owns accumulation, clipping, mixed precision and steps the scheduler
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.config)
        return self.model

    def micro_step(self, loss_fn, share: float):
        loss, parts = loss_fn(self.model)
        # backward scales by 1/accumulation and ZeRO averages gradients over ranks: undo both
        self.model.backward(loss * (share * self.accum * self.world_size))
        self.model.step()  # updates only at the accumulation boundary
        return loss, parts

    def step(self) -> float | None:
        norm = self.model.get_global_grad_norm()
        return None if norm is None else float(norm)

    def save(self, path: Path) -> None:
        self.model.save_checkpoint(str(path), tag="deepspeed")  # module, optimizer, scheduler
        torch.save(_rng_state(), Path(path) / f"rng_state_{self.rank}.pt")

    def load(self, path: Path) -> None:
        loaded, _ = self.model.load_checkpoint(str(path), tag="deepspeed")
        if loaded is None:
            raise ProfuserError("DeepSpeed could not load the checkpoint", where=str(path))
        _set_rng_state(torch.load(Path(path) / f"rng_state_{self.rank}.pt", weights_only=False))

    def full_state_dict(self) -> dict | None:
        if self.zero_stage == 3:  # gathered on rank 0 (needs stage3_gather_16bit_weights_on_model_save)
            return self.model._zero3_consolidated_16bit_state_dict()
        return self.model.module.state_dict()

    def unwrap(self):
        return self.model.module

    def barrier(self) -> None:
        torch.distributed.barrier()


def fill_deepspeed_config(config: dict, spec: TrainSpec, world_size: int, *, where: str = "deepspeed config") -> dict:
    """The recipe's batch sizes, precision and clipping in place of "auto" (and checked where set)."""
    config = json.loads(json.dumps(config))
    if "optimizer" in config or "scheduler" in config:
        raise ProfuserError("leave optimizer and scheduler out of the DeepSpeed config: the trainer builds them "
                            "from the recipe's train section", where=where)
    accum = accumulation_steps(spec, world_size)
    wanted = {
        "train_batch_size": spec.batch_size,
        "train_micro_batch_size_per_gpu": spec.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": spec.max_grad_norm or 0.0,  # 0: DeepSpeed does not clip
    }
    for key, value in wanted.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
        elif key != "gradient_clipping" and config[key] != value:
            raise ProfuserError(f"{key} is {config[key]} but the recipe's train section gives {value}; set it to \"auto\"",
                                where=where)
    for precision in ("bf16", "fp16"):
        section = config.setdefault(precision, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = spec.precision == precision
    return config


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
