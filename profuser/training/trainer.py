"""The fusion training loop, top to bottom: curriculum phases -> seeded batches -> loss -> update.

    train(model, examples, loss, curriculum, spec, out_dir)  ->  summary dict

1. The backend (``parallel.py``): accelerate for one process, DDP and FSDP; DeepSpeed for ZeRO.
2. Data: each mode's examples.arrow (read per example, ``data.py``); the curriculum's phases become per-phase seeded orders
   (``Curriculum.order_examples`` per epoch) of ``steps * batch_size`` units (``data.py``):
   instructions, each with both modes' examples in a co-fusion phase (``Phase.draws``), or
   single examples. Rank r takes a contiguous 1/world share of each global batch's units, its rows
   split evenly into the backend's micro-batches; gradient accumulation fills the global batch.
   ``train.packing`` lays each micro-batch's examples end to end (``data.pack``; the model then gets
   position ids and no mask, and each position its example's weight).
3. Model, AdamW (= Adam at the default weight decay 0), one warm-up + decay schedule spanning the
   steps of all phases.
4. Resume: the newest complete checkpoint under ``out_dir/checkpoints`` restores model, optimizer,
   scheduler and RNG; the global step alone says where in which phase to continue, and the
   phase's order is recomputed from the seed, so the data continue exactly where they stopped.
5. The loop: per step, each rank's micro-batches run forward + ``loss(logits, batch, beta=phase
   beta)`` + backward, each weighted by its share of the global batch's labelled tokens N, every
   example's weight scaled by N / N_mode (its mode's labelled tokens in the global batch), so the
   step's loss is Eq. 5, w1 · (token mean over inference-mode tokens) + w2 · (token mean over
   training-mode tokens), whatever the split into micro-batches and ranks;
   clipping at ``max_grad_norm``; one optimizer step; metrics (token-weighted means) go to
   metrics.jsonl, the trackers of ``train.report_to`` (accelerate's; TensorBoard in ``tb/`` by
   default) and the callbacks; checkpoints every ``checkpoint_every`` steps and
   at each phase's end.
   Guard: a non-finite loss or gradient norm (the pre-clip norm, measured even without clipping)
   skips the step's update; past ``train.max_bad_steps`` such steps (default 0) the run stops with a
   ``TrainingError`` naming the step and phase, and the last good checkpoint stays (nothing is saved).
6. The final model: save_pretrained + tokenizer (with the chat template it was trained with) + README.md model card, then ``summary.json``
   (written atomically: marks training complete), and only then are the checkpoints removed; a re-run
   that finds ``summary.json`` returns it without training (a kill before the stage is sealed loses
   nothing).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..chat import template_for
from ..components import Curriculum, Loss, Trainable
from ..errors import ProfuserError
from ..recipe import TRACKER_PACKAGES, ModelSpec, TrainSpec, missing_trackers
from ..store import atomic_write_json, atomic_write_text
from .card import model_card
from .data import IGNORE, ExampleSet, labelled_per_example, plan_phases
from .parallel import make_backend

log = logging.getLogger(__name__)
Callback = Callable[[int, dict], None]  # (global step, metrics), main process only
BatchHook = Callable[[int, list], None]  # (global step, this rank's example ids), every rank
STATE_FILE = "trainer_state.json"  # written last into a checkpoint: marks it complete
SUMMARY_FILE = "summary.json"  # written after the final model: marks the whole training complete


class TrainingError(ProfuserError):
    """Training cannot go on (a non-finite loss or gradient); names the step and phase."""


def train(
    model: ModelSpec | dict | str,
    examples: dict[str, str | Path],
    loss: Loss,
    curriculum: Curriculum,
    spec: TrainSpec,
    out_dir: str | Path,
    *,
    target_reward: dict[str, float] | None = None,
    callbacks: Iterable[Callback] = (),
    on_batch: BatchHook | None = None,
    card: dict[str, Any] | None = None,
    device: str = "auto",
    cache_dir: Path | None = None,
    progress: bool = False,
    keep_checkpoints: bool = False,
    run_name: str | None = None,
    engine: Any = None,
) -> dict[str, Any]:
    """Train ``model`` (a ModelSpec, its dict, or a model reference) on ``examples`` (mode ->
    examples.arrow) through the phases of ``curriculum``; write ``out_dir/model``,
    ``metrics.jsonl`` and ``tb/``. Re-running with the same arguments resumes from the last
    checkpoint. ``card``: ``title``, ``recipe`` (YAML text) and ``lineage`` for the model card.
    ``run_name``: the trackers' project (wandb project, MLflow experiment); default the model's key.
    ``engine``: the plugin engine that resolves a ``builtin:`` model (``profuser.models.load_model``)."""
    from transformers import get_scheduler, set_seed

    from ..models import as_spec, load_model
    from ..models.loading import check_attention

    out_dir = Path(out_dir)
    spec = spec if isinstance(spec, TrainSpec) else TrainSpec(**spec)
    model = as_spec(model)
    tracker_names = trackers_to_start(spec)  # a missing tracker package stops us before anything loads
    if spec.peft is not None:
        _require_peft()

    # --- 1. backend ------------------------------------------------------------------------------
    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    check_attention(model, cpu=cpu)
    backend = make_backend(spec, cpu=cpu)
    rank, world, is_main = backend.rank, backend.world_size, backend.is_main
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)

    # --- 2. data and phases ----------------------------------------------------------------------
    needs = frozenset(getattr(loss, "needs", ()))  # the extra batch entries the loss reads
    if spec.packing:
        check_packing(loss, needs)
    data = ExampleSet.load(examples, spec.max_length, needs)
    batching = {"batch_size": spec.batch_size, "micro_batch_size": spec.micro_batch_size, "world_size": world}
    phases = curriculum.phases(data.curriculum_input(target_reward, **batching))
    plans = plan_phases(phases, data, spec.batch_size, micro_batch_size=spec.micro_batch_size, world_size=world)
    total_steps = sum(p.steps for p in plans)
    if total_steps == 0:
        raise ProfuserError(f"nothing to train: the phases of {curriculum.name!r} select no example with a label "
                            f"within max_length={spec.max_length}")
    bounds = np.cumsum([0] + [p.steps for p in plans])  # global step where each phase starts
    # a phase's trainable set joins its entry only when set, so other runs' checkpoints still match
    fingerprint = {"phases": [[p.phase.name, p.steps] + ([_as_json(p.phase.trainable)] if p.phase.trainable else [])
                              for p in plans], "batch_size": spec.batch_size, "seed": spec.seed}
    done = _completed(out_dir, fingerprint)
    if done is not None:  # trained and saved, but the stage was not sealed: nothing to redo
        return done
    per_rank = spec.batch_size // world  # examples per rank per optimizer step
    micro = spec.micro_batch_size

    # --- 3. model, optimizer, schedule -----------------------------------------------------------
    net, tokenizer = load_model(model, device="cpu", cache_dir=cache_dir, engine=engine)  # the backend places it
    net.config.use_cache = False
    weights_dtype = net.dtype  # the spec's dtype: the saved model keeps it
    master = spec.peft is None and backend.name in ("single", "ddp") and _fp32_master(net)
    if spec.gradient_checkpointing:
        # recompute activations in backward (non-reentrant: works under DDP); transformers 5 renamed it
        enable = getattr(net, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if spec.peft is not None:
        if any(p.phase.trainable is not None for p in plans):  # the curriculum would unfreeze the base
            raise ProfuserError(f"train.peft cannot be combined with the per-phase trainable parameters of curriculum "
                                f"{curriculum.name!r}", where="train.peft")
        with torch.random.fork_rng(devices=[]):  # the adapter's init from the seed, the same on every rank and run
            torch.manual_seed(spec.seed)
            net = with_lora(net, spec.peft, model)
    net.train()
    # LoRA: only the adapter's parameters get optimizer state (the base is frozen)
    params = [p for p in net.parameters() if p.requires_grad] if spec.peft is not None else net.parameters()
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    warmup = math.ceil(spec.warmup_ratio * total_steps)
    schedule = "constant_with_warmup" if spec.scheduler == "constant" else spec.scheduler

    def make_scheduler(opt):  # the backend binds it (DeepSpeed's optimizer, when its config has one)
        return get_scheduler(schedule, opt, num_warmup_steps=warmup, num_training_steps=total_steps)

    # wraps (DDP/FSDP/ZeRO) and places the model; a DeepSpeed config's optimizer/scheduler blocks replace ours
    backend.prepare(net, optimizer, make_scheduler, warmup_steps=warmup, total_steps=total_steps)
    scheduler = backend.scheduler
    layered = any(p.phase.trainable is not None for p in plans)
    if layered and backend.name not in ("single", "ddp"):
        raise ProfuserError(f"per-phase trainable parameters (curriculum {curriculum.name!r}) need one process or DDP; "
                            f"the {backend.name} backend shards parameters and optimizer state", where="train.distributed")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    # --- 4. resume ---------------------------------------------------------------------------------
    ckpt_root = out_dir / "checkpoints"
    step = 0  # optimizer steps done
    bad_steps = 0  # steps whose update was skipped (non-finite loss or gradient)
    latest = latest_checkpoint(ckpt_root)
    if latest is not None:
        state = json.loads((latest / STATE_FILE).read_text())
        if state["fingerprint"] != fingerprint:
            raise ProfuserError(f"the checkpoint was written for other phases or batches ({state['fingerprint']}, "
                                f"now {fingerprint}); delete it to start over", where=str(latest))
        backend.load(latest)
        step = state["step"]
        bad_steps = state.get("bad_steps", 0)
    else:
        set_seed(spec.seed + rank)  # dropout differs between ranks; a resume restores the RNG instead
    resumed_from = step

    metrics_path = out_dir / "metrics.jsonl"
    trackers: list = []
    last: dict[str, Any] = {}  # the latest step's metrics
    if is_main:
        _truncate_metrics(metrics_path, step)  # drop steps logged after the checkpoint we resume from
        if step and metrics_path.is_file():  # killed after the last step: the summary still has a loss
            lines = metrics_path.read_text(encoding="utf-8").splitlines()
            last = json.loads(lines[-1]) if lines else {}
        trackers = start_trackers(tracker_names, spec, out_dir, step, run_name=run_name or model.key)
    callbacks = list(callbacks)
    tokens_total, started = 0, time.time()
    bar = _progress(total_steps, step, enabled=progress and is_main)

    # --- 5. the loop -------------------------------------------------------------------------------
    for plan in plans:
        if step >= bounds[plan.index + 1]:
            continue  # finished before the resume
        draws = plan.draws(spec.seed, spec.batch_size, curriculum)  # [steps * batch_size] units, same on every rank
        if layered:  # also on a resume mid-phase: the same freezing, the same optimizer state
            set_trainable(backend, plan.phase.trainable)
        for phase_step in range(step - bounds[plan.index], plan.steps):
            t0 = time.perf_counter()
            lr = scheduler.get_last_lr()[0]  # the rate this step uses
            first = phase_step * spec.batch_size + rank * per_rank
            # [>= per_rank]: this rank's units with all their rows (an instruction brings both modes)
            my_rows, my_weights = plan.expand(draws[first:first + per_rank])
            if on_batch is not None:
                on_batch(step + 1, [data.example_id(r) for r in my_rows])
            # the backend accumulates a fixed per_rank // micro micro-batches: split the rows evenly
            # (up to 2 * micro rows each when every instruction brings both modes)
            batches = [data.collate(my_rows[part], my_weights[part], pad_id, packed=spec.packing)
                       for part in np.array_split(np.arange(len(my_rows)), per_rank // micro)]
            # Eq. 5 over the global batch, not a mean of micro-batch means: each mode's token mean
            # (example weights scaled by N / N_mode), each micro-batch counted by its share of N
            labelled = [int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches]
            global_labelled = _mode_weights(batches, data.modes, backend.device)
            for batch in batches:
                if "example" in batch:  # packed: each position gets its example's weight
                    batch["weight"] = batch["weight"][batch["example"].clamp_min(0)] * (batch["example"] >= 0)
            sums: dict[str, float] = defaultdict(float)
            tokens = 0
            for batch, count in zip(batches, labelled):
                tensors = {k: v.to(backend.device) if torch.is_tensor(v) else v for k, v in batch.items()
                           if torch.is_tensor(v) or k in needs}  # lists (ids, modes, sources) only when needed

                def forward_loss(m, tensors=tensors, beta=plan.phase.beta):
                    if "position_ids" in tensors:  # packed: without a mask or cache transformers keeps attention
                        # within each example (masking_utils.find_packed_sequence_indices reads the position ids)
                        logits = m(input_ids=tensors["input_ids"], position_ids=tensors["position_ids"],
                                   use_cache=False).logits
                    else:
                        logits = m(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"]).logits  # [b, T, V]
                    return loss(logits, tensors, beta=beta)

                share = count / global_labelled
                value, parts = backend.micro_step(forward_loss, share)
                sums["loss"] += value.item() * share
                for key, part in parts.items():
                    sums[f"loss/{key}"] += float(part) * share
                tokens += int(tensors["attention_mask"].sum())
            # token-weighted means over the global batch (shares sum to 1 over ranks); tokens summed.
            # Reduced before the update so that every rank takes the same guard decision.
            keys = sorted(sums)
            reduced = _all_reduce([sums[k] for k in keys] + [tokens], backend.device)
            means = dict(zip(keys, reduced[:-1]))
            tokens = int(reduced[-1])
            grad_norm = backend.grad_norm()  # pre-clip, the same on every rank (gradients are reduced)
            # fp16: the grad scaler skips overflowing steps itself, so only the loss is guarded there
            problem = _non_finite(means["loss"], None if spec.precision == "fp16" else grad_norm)
            problem = agreed_problem(problem, backend.device)  # one rank skipping alone would hang the others
            if problem is None:
                backend.step()
            else:
                bad_steps += 1
                if bad_steps > spec.max_bad_steps or not backend.can_skip:
                    bar.close()  # ends the bar's line: the error gets its own
                    raise _stopped(step + 1, plan, phase_step, problem, bad_steps, spec, ckpt_root)
                backend.skip()
            step += 1
            tokens_total += tokens
            if step % spec.checkpoint_every == 0 or phase_step + 1 == plan.steps:
                save_checkpoint(backend, ckpt_root, step, fingerprint, bad_steps=bad_steps)
            seconds = time.perf_counter() - t0
            last = {
                "step": step, "phase": plan.phase.name, "phase_index": plan.index,
                "phase_step": phase_step + 1, "phase_steps": plan.steps,
                "epoch": round((phase_step + 1) / plan.steps * plan.phase.epochs, 6),
                **means, "lr": lr, "grad_norm": grad_norm, "examples": spec.batch_size, "tokens": tokens,
                "tokens_per_s": tokens / seconds, "seconds": seconds, "world_size": world,
                "skipped": problem is not None, "bad_steps": bad_steps,
            }
            if is_main:
                with open(metrics_path, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(last) + "\n")
                scalars = {f"train/{key}": value for key, value in last.items()
                           if isinstance(value, (int, float)) and key != "step"}
                for tracker in trackers:
                    tracker.log(scalars, step=step)
                bar.update(1)
                bar.set_postfix(phase=plan.phase.name, loss=f"{means['loss']:.4f}")
                for callback in callbacks:
                    callback(step, last)

    # --- 6. the final model --------------------------------------------------------------------
    bar.close()
    backend.barrier()
    state_dict = backend.full_state_dict()  # gathered (FSDP, ZeRO-3) before the main process saves
    backend.finish()  # ZeRO-3's partitioned loading off: a LoRA merge loads the base plainly
    summary = {
        "steps": total_steps, "world_size": world, "backend": backend.name, "resumed_from": resumed_from,
        "final_loss": last.get("loss"), "tokens": tokens_total, "seconds": time.time() - started,
        "bad_steps": bad_steps,
        "phases": [{"name": p.phase.name, "epochs": p.phase.epochs, "beta": p.phase.beta, "examples": len(p.rows),
                    "draws": p.phase.draws, "units": p.units, "samples": p.samples, "steps": p.steps,
                    **({"trainable": _as_json(p.phase.trainable)} if p.phase.trainable else {})} for p in plans],
    }
    if layered:
        set_trainable(backend, None)  # the saved model's parameters all require grad again
    if is_main:
        model_dir = out_dir / "model"
        unwrapped = backend.unwrap()
        if master:  # trained over fp32 master weights; saved in the spec's dtype, as loaded
            unwrapped.to(weights_dtype)
            state_dict = {k: v.to(weights_dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
        unwrapped.config.use_cache = True
        if spec.peft is None:
            unwrapped.save_pretrained(model_dir, state_dict=state_dict, safe_serialization=True)
        else:
            save_lora(unwrapped, state_dict, model, spec.peft, model_dir, cache_dir=cache_dir, engine=engine)
        # the template the examples were encoded with (build: chat.template_for): a base model trained
        # with the fallback keeps it, so it chats the same after reload
        tokenizer.chat_template = template_for(tokenizer)  # load_model applied the recipe's override
        tokenizer.save_pretrained(model_dir)
        card = card or {}
        atomic_write_text(model_dir / "README.md", model_card(
            title=card.get("title") or f"{model.key} fused with profuser", base_model=model.ref, summary=summary,
            recipe_yaml=card.get("recipe"), lineage=card.get("lineage")))
        for tracker in trackers:
            tracker.finish()
        # the completion record first: a kill from here on leaves a finished training to return
        atomic_write_json(out_dir / SUMMARY_FILE, {**summary, "fingerprint": fingerprint})
        if not keep_checkpoints:
            shutil.rmtree(ckpt_root, ignore_errors=True)
    backend.barrier()
    return summary


# --- helpers ---------------------------------------------------------------------------------------


def trackers_to_start(spec: TrainSpec) -> list[str]:
    """``spec.report_to``, or ProfuserError naming the first tracker whose package is missing; the
    default TensorBoard, when not installed, is left out (metrics.jsonl is always written)."""
    missing = missing_trackers(spec.report_to)
    if missing and "report_to" not in spec.model_fields_set:
        log.info("tensorboard is not installed: the training metrics go to metrics.jsonl only")
        return []
    if missing:
        index, message = missing[0]
        raise ProfuserError(message, where=f"train.report_to.{index}")
    return list(spec.report_to)


def start_trackers(names: list[str], spec: TrainSpec, out_dir: Path, step: int, *, run_name: str) -> list:
    """Started accelerate trackers (main process only): what ``Accelerator(log_with=names)
    .init_trackers`` builds, without an Accelerator (the DeepSpeed backend has none). TensorBoard
    writes ``out_dir/tb`` and, on resume, purges the steps after ``step``."""
    from accelerate import PartialState
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    PartialState()  # the trackers log through accelerate's logger, which needs its state (set up by then, or now)
    config = {key: value if isinstance(value, (bool, int, float, str)) or value is None else json.dumps(value)
              for key, value in spec.model_dump(exclude=TrainSpec.NOT_HASHED).items()}
    trackers = []
    for name in names:
        if name == "tensorboard":  # tb/ itself (no run subfolder), as before; its hparams would add files
            tracker = LOGGER_TYPE_TO_CLASS[name]("", str(out_dir / "tb"), purge_step=step + 1 if step else None)
        elif LOGGER_TYPE_TO_CLASS[name].requires_logging_directory:
            tracker = LOGGER_TYPE_TO_CLASS[name](run_name, str(out_dir / "tracking"))
        else:
            tracker = LOGGER_TYPE_TO_CLASS[name](run_name)
        tracker.main_process_only = False  # the caller is the main process; skips accelerate's PartialState
        try:
            tracker.start()
            if name != "tensorboard":
                tracker.store_init_configuration(config)
        except Exception as exc:  # noqa: BLE001  (a tracker's own failure: login, server, bad settings)
            raise ProfuserError(f"{name} ({TRACKER_PACKAGES[name]}) failed to start: {type(exc).__name__}: {exc}",
                                where="train.report_to") from None
        trackers.append(tracker)
    return trackers


def _as_json(trainable: Trainable) -> dict:
    return {**asdict(trainable), "blocks": list(trainable.blocks)}  # as it reads back from a checkpoint


def transformer_blocks(model: torch.nn.Module) -> tuple[str, int]:
    """The name and length of the model's list of transformer blocks: the ModuleList holding the
    most parameters (``model.layers`` of Llama-likes, ``transformer.h`` of GPT-2)."""
    best, best_size, depth = "", 0, 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module):
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size, depth = name, size, len(module)
    if not depth:
        raise ProfuserError(f"{type(model).__name__} has no list of transformer blocks to train layer by layer",
                            where="curriculum")
    return best, depth


def trainable_mask(model: torch.nn.Module, trainable: Trainable | None) -> dict[str, bool]:
    """Parameter name -> whether it trains under ``trainable`` (None: all)."""
    names = [name for name, _ in model.named_parameters()]
    if trainable is None:
        return dict.fromkeys(names, True)
    blocks, depth = transformer_blocks(model)
    lo, hi = (math.floor(f * depth + 0.5) for f in trainable.blocks)  # half up: the same on any Python
    embedded = {id(p) for p in model.get_input_embeddings().parameters()}
    mask = {}
    for name, param in model.named_parameters():
        if id(param) in embedded:
            mask[name] = trainable.embeddings
        elif name.startswith(blocks + "."):
            mask[name] = lo <= int(name[len(blocks) + 1:].split(".")[0]) < hi
        else:
            mask[name] = trainable.rest
    return mask


def set_trainable(backend, trainable: Trainable | None) -> None:
    """Freeze the parameters ``trainable`` leaves out (requires_grad False) and drop their optimizer
    state (it is rebuilt from zero if they train again, as when a phase starts them); DDP is
    rewrapped when the set changes, since its reducer waits for every parameter that required grad."""
    model = backend.unwrap()
    mask = trainable_mask(model, trainable)
    optimizer = getattr(backend.optimizer, "optimizer", backend.optimizer)  # inside accelerate's wrapper
    changed = False
    for name, param in model.named_parameters():
        if param.requires_grad != mask[name]:
            param.requires_grad_(mask[name])
            changed = True
        if not mask[name]:
            param.grad = None
            optimizer.state.pop(param, None)
    if changed and backend.name == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        accelerator, old = backend.accelerator, backend.model
        kwargs = accelerator.ddp_handler.to_kwargs() if accelerator.ddp_handler is not None else {}
        ids = [accelerator.local_process_index] if backend.device.type == "cuda" else None
        backend.model = DistributedDataParallel(model, device_ids=ids, output_device=ids[0] if ids else None, **kwargs)
        # accelerate keeps the wrapper it made: the old reducer's hooks must go with it
        accelerator._models = [backend.model if m is old else m for m in accelerator._models]
        del old


PER_EXAMPLE_NEEDS = frozenset({"example_id", "mode", "source", "all_teachers"})  # [B] entries in LOSS_NEEDS


def check_packing(loss: Loss, needs: frozenset[str]) -> None:
    """``train.packing`` lays several examples in a row, so a loss must find an example's entries
    through ``profuser.losses.example_rows``: the ``SparseDivergenceLoss`` kernel and ``flat_batch``
    do, as does a loss that says so (``supports_packing = True``). Refused: a loss with its own
    ``__call__`` that reads per-example entries and does not say so."""
    from ..losses import SparseDivergenceLoss

    own_call = not (isinstance(loss, SparseDivergenceLoss) and type(loss).__call__ is SparseDivergenceLoss.__call__)
    if needs & PER_EXAMPLE_NEEDS and own_call and not getattr(loss, "supports_packing", False):
        name = getattr(loss, "name", "") or type(loss).__name__
        raise ProfuserError(f"loss {name!r} reads per-example entries ({', '.join(sorted(needs & PER_EXAMPLE_NEEDS))}) "
                            "in its own __call__ and does not declare supports_packing; set train.packing: false, "
                            "or index them with profuser.losses.example_rows (docs/training.md)", where="train.packing")


def _fp32_master(net: torch.nn.Module) -> bool:
    """Weights loaded in bf16/fp16 become fp32 for training (True if any did): AdamW updates fp32
    master weights and accelerate's mixed precision autocasts the compute, as docs/training.md
    says. Updating bf16 weights directly rounds away every update below 2^-8 of a weight.
    FSDP (accelerate upcasts itself), DeepSpeed (its own fp32 master) and LoRA (peft keeps the
    adapter in fp32, the base is frozen) are left alone."""
    low = [p for p in net.parameters() if p.is_floating_point() and p.dtype != torch.float32]
    if low:
        net.float()
    return bool(low)


def _require_peft() -> None:
    from ..errors import import_extra

    import_extra("peft", "peft", what="train.peft (LoRA)", where="train.peft")


def with_lora(net: torch.nn.Module, peft_spec, model: ModelSpec) -> torch.nn.Module:
    """``net`` wrapped by peft with a fresh LoRA adapter (only its parameters require grad).
    The adapter's config names the base by its hub id when it has one, else its local path."""
    from peft import LoraConfig, get_peft_model

    from ..models.loading import _looks_local

    config = LoraConfig(r=peft_spec.r, lora_alpha=peft_spec.alpha, lora_dropout=peft_spec.dropout,
                        target_modules=peft_spec.target_modules, task_type="CAUSAL_LM")
    try:
        net = get_peft_model(net, config)
    except ValueError as exc:  # target modules that match nothing, or layers LoRA cannot adapt
        raise ProfuserError(f"cannot add LoRA to {model.ref}: {exc}".split("\n")[0],
                            where="train.peft.target_modules") from None
    if not (model.ref.startswith("builtin:") or model.gguf_file or _looks_local(model.ref)):
        net.peft_config["default"].base_model_name_or_path = model.ref
    return net


ADAPTER_DIR = "adapter"  # model/adapter/ beside merged weights: see save_lora


def save_lora(unwrapped, state_dict: dict | None, model: ModelSpec, peft_spec, model_dir: Path, *,
              cache_dir: Path | None, engine: Any = None) -> None:
    """The adapter (``adapter_model.safetensors`` + ``adapter_config.json``, peft's save_pretrained)
    and ``base_model.json`` (the base ModelSpec, so ``load_model`` rebuilds base + adapter) into
    ``model_dir``; with ``merge``, the merged plain model into ``model_dir`` and the adapter into
    ``model_dir/adapter``: transformers applies an ``adapter_config.json`` it finds beside full
    weights on top of them, which would add the update twice."""
    from ..models.loading import BASE_MODEL_FILE, merge_adapter

    adapter_dir = model_dir / ADAPTER_DIR if peft_spec.merge else model_dir
    unwrapped.save_pretrained(adapter_dir, state_dict=state_dict, safe_serialization=True)
    atomic_write_json(adapter_dir / BASE_MODEL_FILE, model.identity())
    if peft_spec.merge:
        merged = merge_adapter(model, adapter_dir, device="cpu", cache_dir=cache_dir, engine=engine)
        merged.save_pretrained(model_dir, safe_serialization=True)


def save_checkpoint(backend, root: Path, step: int, fingerprint: dict, *, bad_steps: int = 0) -> Path:
    """Every rank saves its part; then the main process marks the checkpoint complete and drops
    the previous one (a kill mid-save leaves the previous checkpoint as the newest complete one)."""
    path = root / f"step-{step:08d}"
    backend.save(path)
    backend.barrier()
    if backend.is_main:
        atomic_write_json(path / STATE_FILE, {"step": step, "fingerprint": fingerprint, "world_size": backend.world_size,
                                              "bad_steps": bad_steps})
        for old in root.glob("step-*"):
            if old != path:
                shutil.rmtree(old, ignore_errors=True)
    backend.barrier()
    return path


def latest_checkpoint(root: Path) -> Path | None:
    done = [p for p in root.glob("step-*") if (p / STATE_FILE).is_file()] if root.is_dir() else []
    return max(done, key=lambda p: p.name) if done else None


def _completed(out_dir: Path, fingerprint: dict) -> dict | None:
    """The summary of a training that finished in ``out_dir`` (model saved), or None."""
    path = out_dir / SUMMARY_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:  # written atomically, so this is damage, not a kill
        raise TrainingError(f"unreadable completion record ({exc}); delete it to train again", where=str(path)) from None
    if record.pop("fingerprint", None) != fingerprint:
        raise TrainingError(f"the finished training was for other phases or batches; delete {out_dir} to start over",
                            where=str(path))
    return {**record, "resumed_from": record["steps"]}  # nothing was trained again


def _non_finite(loss: float, grad_norm: float | None) -> str | None:
    """What is not finite in a step (None: the step is sound)."""
    if not math.isfinite(loss):
        return f"the loss is {loss}"
    if grad_norm is not None and not math.isfinite(grad_norm):
        return f"the gradient norm is {grad_norm}"
    return None


def agreed_problem(problem: str | None, device) -> str | None:
    """Every rank's guard decision made together: a step is bad on all ranks if it is bad on one
    (a rank that skipped or stopped alone would leave the others waiting in the next collective)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return problem
    flag = torch.tensor([0.0 if problem is None else 1.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if problem is None and flag.item():
        return "the loss or gradient norm is not finite on another rank"
    return problem


def _stopped(step: int, plan, phase_step: int, problem: str, bad_steps: int, spec: TrainSpec, ckpt_root: Path) -> TrainingError:
    kept = latest_checkpoint(ckpt_root)
    kept_text = f"the last good checkpoint ({kept.name}) is kept" if kept else "no checkpoint was written yet"
    limit = f" ({bad_steps} bad steps, train.max_bad_steps is {spec.max_bad_steps})" if spec.max_bad_steps else ""
    return TrainingError(
        f"step {step} (phase {plan.phase.name!r}, step {phase_step + 1} of {plan.steps}): {problem}{limit}; stopped, "
        f"{kept_text} and nothing is cached; lower train.lr, set train.max_grad_norm, check the data, or allow "
        "skipping with train.max_bad_steps", where="train")


def _truncate_metrics(path: Path, step: int) -> None:
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except json.JSONDecodeError:  # a line cut short by the kill
            continue
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def _mode_weights(batches: list[dict], modes: list[str], device) -> float:
    """Eq. 5 over the global batch: scales each example's ``weight`` by N / N_mode (N the step's
    labelled tokens over all micro-batches and ranks, N_mode those of the example's mode), so that
    the token mean over the step, sum(weight * loss) / N, is sum_mode w_mode * (token mean over the
    mode). Returns N (at least 1)."""
    local = np.zeros(len(modes))
    per_example = [labelled_per_example(b).tolist() for b in batches]
    for batch, counts in zip(batches, per_example):
        for mode, count in zip(batch["modes"], counts):
            local[modes.index(mode)] += count
    per_mode = np.asarray(_all_reduce(local.tolist(), device))
    total = max(float(per_mode.sum()), 1.0)
    scale = {mode: total / n for mode, n in zip(modes, per_mode.tolist()) if n > 0}
    for batch in batches:  # a mode without tokens in this micro-batch's examples is never looked up
        factor = torch.tensor([scale.get(m, 0.0) for m in batch["modes"]], dtype=batch["weight"].dtype)
        batch["weight"] = batch["weight"] * factor
    return total


def _all_reduce(values: list[float], device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)  # sum
    return tensor.tolist()


def _progress(total: int, initial: int, *, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step")
