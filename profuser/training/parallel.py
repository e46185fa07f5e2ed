"""The two ways the trainer runs a model: accelerate (one process, DDP, FSDP) or DeepSpeed ZeRO.

Both present the same few verbs to the loop in ``trainer.py`` — prepare, micro-step, step, save,
load, full state dict — and leave the work to the library. DeepSpeed runs go through
``deepspeed.initialize`` directly rather than accelerate's DeepSpeed integration, because the latter
needs an accelerator device: on a CPU-only machine accelerate silently drops DeepSpeed (and with
``--cpu`` starts a single process), while DeepSpeed itself runs ZeRO on CPU over gloo.

Which backend: ``train.distributed: deepspeed`` in the recipe, or a launch by
``accelerate launch --use_deepspeed`` (env ``ACCELERATE_USE_DEEPSPEED=true``); otherwise accelerate,
which picks DDP/FSDP from its own launch configuration (``recipes/configs/*.yaml``).

Resume never unpickles what the runs directory holds (whoever can write there could run code):
one process and DDP checkpoint the model as safetensors, the optimizer with ``torch.save`` read back
with ``weights_only=True``, the scheduler, grad scaler and Python/NumPy RNG as JSON and torch's RNG
as safetensors. FSDP's model and optimizer go through accelerate's FSDP utilities, which read with
``weights_only=True`` (accelerate's own pickled scheduler file is never written). DeepSpeed's
checkpoint files are pickles that it loads with ``weights_only=False``: each file is signed
(HMAC-SHA256, a per-user key outside the runs directory) when saved and verified before DeepSpeed
reads anything.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import random
import secrets
import warnings
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
        _fresh_accelerator_state()
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
        self.adapter_only = spec.peft is not None  # LoRA: checkpoints hold the trainable adapter, not the frozen base
        self.rank = self.accelerator.process_index
        self.world_size = self.accelerator.num_processes
        self.device = self.accelerator.device
        self.is_main = self.accelerator.is_main_process
        self.name = {"no": "single", "multi_cpu": "ddp", "multi_gpu": "ddp"}.get(kind, kind)

    def prepare(self, model, optimizer, make_scheduler, **_schedule):
        """``make_scheduler(optimizer)`` builds the schedule (``_schedule``: what a DeepSpeed config's
        "auto" values would need; unused here)."""
        # the scheduler stays ours: a prepared one steps num_processes times per optimizer step
        self.scheduler = make_scheduler(optimizer)  # checkpointed as JSON by save(), not registered (accelerate pickles it)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
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

    can_skip = True  # the update comes after grad_norm(), so a bad step can be left out

    def grad_norm(self) -> float:
        """The pre-clip global gradient norm, clipping to ``max_grad_norm`` when set (measured
        either way: the trainer's guard needs it)."""
        assert self.accelerator.sync_gradients, "grad_norm() must follow the last micro-batch of a step"
        limit = self.max_grad_norm if self.max_grad_norm is not None else math.inf  # inf: measure only
        return full_norm(self.accelerator.clip_grad_norm_(self.model.parameters(), limit))

    def step(self) -> None:
        """Update, schedule, zero the gradients."""
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def skip(self) -> None:
        """Leave out this step's update (the schedule still advances: the step is spent)."""
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": on purpose here
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def _fsdp(self) -> bool:
        return self.name == "fsdp"

    def save(self, path: Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self._fsdp:  # sharded model and optimizer: accelerate's FSDP utilities (read back weights_only)
            self.accelerator.save_state(str(path))
        elif self.is_main:  # DDP replicas are identical: one copy
            from safetensors.torch import save_file, save_model

            model = self.accelerator.unwrap_model(self.model)
            if self.adapter_only:
                save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad},
                          str(path / MODEL_FILE))
            else:
                save_model(model, str(path / MODEL_FILE))
            torch.save(self.optimizer.state_dict(), path / OPTIMIZER_FILE)
        if self.is_main:
            state = {"scheduler": self.scheduler.state_dict()}
            if self.accelerator.scaler is not None:
                state["scaler"] = self.accelerator.scaler.state_dict()
            _write_json(path / SCHEDULER_FILE, state)
        save_rng(path, self.rank)

    def load(self, path: Path) -> None:
        path = Path(path)
        _require(path, [SCHEDULER_FILE] + ([] if self._fsdp else [MODEL_FILE, OPTIMIZER_FILE]))
        if self._fsdp:
            self.accelerator.load_state(str(path))
        else:
            from safetensors.torch import load_file, load_model

            model = self.accelerator.unwrap_model(self.model)
            if self.adapter_only:
                _load_adapter_params(model, load_file(str(path / MODEL_FILE), device=str(self.device)), path / MODEL_FILE)
            else:
                load_model(model, str(path / MODEL_FILE), device=str(self.device))
            try:
                state = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - the restricted unpickler refused it, or it is damaged
                raise ProfuserError(f"the optimizer state is not plain tensors ({type(exc).__name__}); not loaded, "
                                    "delete the checkpoint to start over", where=str(path / OPTIMIZER_FILE)) from None
            self.optimizer.load_state_dict(state)
        state = _read_json(path / SCHEDULER_FILE)
        self.scheduler.load_state_dict(state["scheduler"])
        if self.accelerator.scaler is not None and "scaler" in state:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        load_rng(path, self.rank)

    def full_state_dict(self) -> dict | None:
        return self.accelerator.get_state_dict(self.model)  # gathers FSDP shards

    def unwrap(self):
        return self.accelerator.unwrap_model(self.model)

    def finish(self) -> None:
        """Training is over (nothing to release here)."""

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()


def full_norm(norm) -> float:
    """A gradient norm as one number. Under FSDP2 clip_grad_norm_ returns a DTensor, and ``float()``
    of it reads this rank's local part only: the full tensor is the global norm."""
    full = getattr(norm, "full_tensor", None)
    return float(full() if callable(full) else norm)


def _fresh_accelerator_state() -> None:
    """Forget the previous training's AcceleratorState and GradientState: accelerate keeps one per
    process and refuses another precision ("already been initialized"), so a second training in
    one process (``profuser compare``, a study) could not change ``train.precision``. The process
    group (PartialState) stays: it is the launch's, shared by every training."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def _load_adapter_params(model, tensors: dict, where: Path) -> None:
    """A LoRA checkpoint's tensors into exactly the model's trainable parameters."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != trainable:
        odd = sorted(set(tensors) ^ trainable)
        raise ProfuserError(f"the checkpoint's adapter does not match the model's ({len(odd)} parameters differ, e.g. "
                            f"{odd[0]}); delete it to start over", where=str(where))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in tensors:
                param.copy_(tensors[name])


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
        if spec.max_bad_steps:
            raise ProfuserError("train.max_bad_steps needs the accelerate backend: DeepSpeed applies a step's update "
                                "before its gradient norm is known (leave it 0: a bad step stops the run)",
                                where="train.max_bad_steps")
        self.accum = accumulation_steps(spec, self.world_size)
        self.spec, self.where = spec, config_path
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

    def prepare(self, model, optimizer, make_scheduler, *, warmup_steps: int, total_steps: int):
        """The config's ``optimizer`` / ``scheduler`` blocks, when it has them, are DeepSpeed's to
        build (their "auto" values filled from the recipe); otherwise ours are used."""
        import deepspeed

        self.config = fill_schedule(self.config, self.spec, warmup_steps, total_steps, where=self.where)
        left = _autos(self.config)
        if left:  # DeepSpeed would fail on the string deep inside initialize
            raise ProfuserError(f"{left[0]} is \"auto\" but profuser has no value for it; set it", where=self.where)
        kwargs: dict[str, Any] = {"optimizer": optimizer}
        if "optimizer" in self.config:  # DeepSpeed's own (fused or CPU Adam) over the trainable parameters
            kwargs = {"model_parameters": [p for p in model.parameters() if p.requires_grad]}
        if "scheduler" not in self.config:  # ours, bound to whichever optimizer DeepSpeed ends up with
            kwargs["lr_scheduler"] = make_scheduler if "optimizer" in self.config else make_scheduler(optimizer)
        # DeepSpeed owns accumulation, clipping, mixed precision and steps the scheduler
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(model=model, config=self.config, **kwargs)
        return self.model

    def micro_step(self, loss_fn, share: float):
        loss, parts = loss_fn(self.model)
        # backward scales by 1/accumulation and ZeRO averages gradients over ranks: undo both
        self.model.backward(loss * (share * self.accum * self.world_size))
        self.model.step()  # updates only at the accumulation boundary
        return loss, parts

    can_skip = False  # DeepSpeed updates inside micro_step: a bad step is only seen afterwards

    def grad_norm(self) -> float | None:
        norm = self.model.get_global_grad_norm()
        return None if norm is None else float(norm)

    def step(self) -> None:
        pass  # done by the last micro_step (DeepSpeed's accumulation boundary)

    def save(self, path: Path) -> None:
        path = Path(path)
        self.model.save_checkpoint(str(path), tag="deepspeed")  # module, optimizer, scheduler (pickles)
        save_rng(path, self.rank)
        torch.distributed.barrier()
        sign_files(path, self.rank, self.world_size, _shared_key(self.device))  # every rank signs its share of the files

    def load(self, path: Path) -> None:
        path = Path(path)
        ok = verify_files(path, self.rank, self.world_size, _shared_key(self.device))
        flag = torch.tensor([1 if ok is None else 0], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        if ok is not None:
            raise ProfuserError(f"{ok}: not loaded (DeepSpeed checkpoints are pickles); delete the checkpoint to start "
                                "over", where=str(path))
        if not flag.item():
            raise ProfuserError("another rank found a checkpoint file that fails its signature; not loaded", where=str(path))
        loaded, _ = self.model.load_checkpoint(str(path), tag="deepspeed")
        if loaded is None:
            raise ProfuserError("DeepSpeed could not load the checkpoint", where=str(path))
        load_rng(path, self.rank)

    def full_state_dict(self) -> dict | None:
        if self.zero_stage == 3:  # gathered on rank 0 (needs stage3_gather_16bit_weights_on_model_save)
            return self.model._zero3_consolidated_16bit_state_dict()
        return self.model.module.state_dict()

    def unwrap(self):
        return self.model.module

    def finish(self) -> None:
        """After the final gather: from_pretrained stops building models partitioned (ZeRO-3), so the
        main process alone can load one (a LoRA merge) without waiting for the other ranks."""
        if self.zero_stage == 3:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            self._hf_ds_config = None
            unset_hf_deepspeed_config()

    def barrier(self) -> None:
        torch.distributed.barrier()


# DeepSpeed's defaults for the size-dependent ZeRO settings HF's Trainer derives from hidden_size
ZERO_AUTO = {"reduce_bucket_size": 500_000_000, "stage3_prefetch_bucket_size": 50_000_000,
             "stage3_param_persistence_threshold": 100_000, "stage3_gather_16bit_weights_on_model_save": True}
# a scheduler block's type -> the train.scheduler whose shape it has (checked against the recipe)
DS_SCHEDULERS = {"WarmupLR": "constant", "WarmupDecayLR": "linear", "WarmupCosineLR": "cosine"}


def fill_deepspeed_config(config: dict, spec: TrainSpec, world_size: int, *, where: str = "deepspeed config") -> dict:
    """The recipe's batch sizes, precision, clipping and optimizer settings in place of "auto" (and
    checked where set), as HF's Trainer fills its stock configs. A scheduler block is filled later
    (``fill_schedule``: it needs the step count)."""
    config = json.loads(json.dumps(config))
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
    zero = config.get("zero_optimization", {})
    for key, value in ZERO_AUTO.items():
        if zero.get(key) == "auto":
            zero[key] = value
    if "optimizer" in config:
        block = config["optimizer"]
        if str(block.get("type", "")).lower() not in ("adam", "adamw"):
            raise ProfuserError(f"optimizer.type is {block.get('type')!r}: the recipe's training is AdamW (type AdamW or "
                                "Adam), or leave the block out", where=f"{where}: optimizer.type")
        params = block.setdefault("params", {})
        # AdamW as the trainer builds it: torch's defaults for betas and eps; Adam with decoupled decay
        _fill(params, {"lr": spec.lr, "weight_decay": spec.weight_decay, "betas": [0.9, 0.999], "eps": 1e-8},
              f"{where}: optimizer.params", checked=("lr", "weight_decay"))
    if "scheduler" in config:
        kind = config["scheduler"].get("type")
        if kind not in DS_SCHEDULERS:
            raise ProfuserError(f"scheduler.type is {kind!r}: one of {', '.join(DS_SCHEDULERS)}, or leave the block out "
                                "(train.scheduler is used)", where=f"{where}: scheduler.type")
        if DS_SCHEDULERS[kind] != spec.scheduler:
            raise ProfuserError(f"scheduler.type {kind} decays {DS_SCHEDULERS[kind]!r} but train.scheduler is "
                                f"{spec.scheduler!r}: make them agree, or leave the block out", where=f"{where}: scheduler.type")
    return config


def fill_schedule(config: dict, spec: TrainSpec, warmup_steps: int, total_steps: int, *, where: str) -> dict:
    """A scheduler block's "auto" values: warm-up from 0 to ``train.lr`` over the recipe's warm-up
    steps, over all the steps of all phases."""
    if "scheduler" not in config:
        return config
    config = json.loads(json.dumps(config))
    params = config["scheduler"].setdefault("params", {})
    wanted = {"warmup_min_lr": 0.0, "warmup_max_lr": spec.lr, "warmup_num_steps": warmup_steps}
    if config["scheduler"]["type"] != "WarmupLR":
        wanted["total_num_steps"] = total_steps
    if config["scheduler"]["type"] == "WarmupCosineLR":  # ratios of the peak rate rather than rates
        wanted = {"warmup_min_ratio": 0.0, "cos_min_ratio": 0.0, "warmup_num_steps": warmup_steps,
                  "total_num_steps": total_steps}
    _fill(params, wanted, f"{where}: scheduler.params", checked=tuple(wanted))
    return config


def _autos(config: dict, prefix: str = "") -> list[str]:
    """The dotted paths of the "auto" values left in a config."""
    found = []
    for key, value in config.items():
        if isinstance(value, dict):
            found += _autos(value, f"{prefix}{key}.")
        elif value == "auto":
            found.append(prefix + key)
    return found


def _fill(params: dict, wanted: dict, where: str, *, checked: tuple[str, ...]) -> None:
    """``wanted`` in place of "auto" (or where absent); a ``checked`` key set to another value is refused."""
    for key, value in wanted.items():
        if params.get(key, "auto") == "auto":
            params[key] = value
        elif key in checked and params[key] != value:
            raise ProfuserError(f"{key} is {params[key]} but the recipe's train section gives {value}; set it to \"auto\"",
                                where=f"{where}.{key}")


# --- checkpoint state without pickles ---------------------------------------------------------------

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"  # tensors and numbers only: read with weights_only=True
SCHEDULER_FILE = "scheduler.json"
SIGNATURES = "signatures-rank{rank}.json"
KEY_FILE = "checkpoint.key"


def save_rng(path: Path, rank: int) -> None:
    """This rank's Python, NumPy (JSON) and torch (safetensors) random states."""
    from safetensors.torch import save_file

    version, keys, gauss = random.getstate()
    name, np_keys, pos, has_gauss, cached = np.random.get_state()
    _write_json(path / f"rng-{rank}.json", {"python": [version, list(keys), gauss],
                                            "numpy": [name, np_keys.tolist(), pos, has_gauss, cached]})
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(tensors, str(path / f"rng-{rank}.safetensors"))


def load_rng(path: Path, rank: int) -> None:
    from safetensors.torch import load_file

    _require(path, [f"rng-{rank}.json", f"rng-{rank}.safetensors"])
    state = _read_json(path / f"rng-{rank}.json")
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    name, np_keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(np_keys, dtype=np.uint32), pos, has_gauss, cached))
    tensors = load_file(str(path / f"rng-{rank}.safetensors"))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors) - 1) if f"cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _write_json(path: Path, data: dict) -> None:
    from ..store import atomic_write_json

    atomic_write_json(path, data)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ProfuserError(f"unreadable checkpoint state: {exc}; delete the checkpoint to start over", where=str(path)) from None


def _require(path: Path, names: list[str]) -> None:
    missing = [n for n in names if not (path / n).is_file()]
    if missing:  # e.g. a checkpoint from an older profuser (accelerate's pickled format)
        raise ProfuserError(f"the checkpoint lacks {', '.join(missing)} (an older or foreign format); delete it to "
                            "start over", where=str(path))


def checkpoint_key(cache_dir: Path | None = None) -> bytes:
    """The per-user signing key, ``<profuser cache>/checkpoint.key`` (created 0600): outside the runs
    directory, so write access there is not enough to forge a signature."""
    from ..models.cache import default_cache_dir

    path = Path(cache_dir or default_cache_dir()) / KEY_FILE
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process created it first
            pass
        else:
            with os.fdopen(fd, "wb") as fh:
                fh.write(secrets.token_bytes(32))
    key = path.read_bytes()
    if len(key) < 32:
        raise ProfuserError("the checkpoint signing key is too short; delete it (a new one is made)", where=str(path))
    return key


def _shared_key(device) -> bytes:
    """Rank 0's key on every rank (nodes may not share a home directory)."""
    raw = checkpoint_key()[:32] if torch.distributed.get_rank() == 0 else bytes(32)
    key = torch.tensor(list(raw), dtype=torch.uint8, device=device)
    torch.distributed.broadcast(key, src=0)
    return bytes(key.cpu().tolist())


def _signed_files(path: Path) -> list[str]:
    """The files DeepSpeed unpickles: all but the JSON and safetensors this module and the trainer
    write at the top (read without pickle), signatures included."""
    return sorted(str(f.relative_to(path)) for f in path.rglob("*")
                  if f.is_file() and not (f.parent == path and f.suffix in (".json", ".safetensors")))


def _signature(key: bytes, path: Path, name: str) -> str:
    mac = hmac.new(key, f"{path.name}/{name}".encode() + b"\0", hashlib.sha256)  # bound to checkpoint and name
    with open(path / name, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            mac.update(chunk)
    return mac.hexdigest()


def sign_files(path: Path, rank: int, world: int, key: bytes) -> None:
    """Rank r signs files r, r + W, ... of the checkpoint (hashing large ZeRO states is shared)."""
    mine = _signed_files(path)[rank::world]
    _write_json(path / SIGNATURES.format(rank=rank), {name: _signature(key, path, name) for name in mine})


def verify_files(path: Path, rank: int, world: int, key: bytes) -> str | None:
    """None when every file of the checkpoint is signed, and this rank's share matches; else the problem."""
    signed: dict[str, str] = {}
    for sig in path.glob("signatures-rank*.json"):
        signed.update(_read_json(sig))
    names = _signed_files(path)
    unsigned = [n for n in names if n not in signed]
    if unsigned:
        return f"unsigned file {unsigned[0]}"
    for name in names[rank::world]:
        if not hmac.compare_digest(signed[name], _signature(key, path, name)):
            return f"{name} does not match its signature"
    return None
