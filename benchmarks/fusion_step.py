"""What does the teacher cost a training step? fuse_kl vs sft on SmolLM2-135M, CPU.

    .venv/bin/python benchmarks/fusion_step.py --json

One process times every variant on the same model and batch (forward + backward of the whole
model, rounds interleaved so machine noise hits all variants alike; medians of wall time, and of
the process's CPU time, which other processes on a shared machine disturb less), and the loss
alone on fixed logits. Peak memory is measured per variant in a fresh subprocess: after a warm-up step
and ``malloc_trim``, the kernel's resident high-water mark (VmHWM) is reset through
``/proc/self/clear_refs`` and read back after one step, so it is the real peak RSS of that step
(Linux only). ``peak_memory_ratio`` compares whole-process peaks; ``step_memory_ratio`` compares
what the step adds on top of the resident model.

Variants:
  sft        the ``sft`` plugin (CE through the fused kernel)
  fuse_kl    the ``fuse_kl`` plugin (CE + beta * KL to the sparse top-k teacher, one fused kernel)
  dense      FuseLLM's way: a dense [B, T, V] teacher and a [B, T, V] log-softmax shared by CE and KL
  torch_ce   plain ``F.cross_entropy`` (transformers' own loss), for reference
  multi_teacher_kl  the ``multi_teacher_kl`` plugin (CE + beta * sum_s w_s KL to S = ``--teachers``
             sources' top-k on the same response, uniform weights), the seed summary's variant
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
MODEL = "builtin:smollm2-135m-instruct"
VARIANTS = ("sft", "fuse_kl", "dense", "torch_ce", "multi_teacher_kl")


def load(model_ref: str):
    from profuser.models import load_model
    from profuser.plugins import Engine
    from profuser.recipe import ModelSpec

    model, _ = load_model(ModelSpec(ref=model_ref), engine=Engine())  # its plugins resolve builtin: refs
    model.train()
    return model


def make_batch(vocab: int, batch: int, length: int, k: int, prompt: int, teachers: int = 3,
               seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tokens; the first ``prompt`` positions are prompt (-100), the rest carry a label and
    a k-slot teacher with distinct ids, and ``teachers`` sources' k-slot teachers (the
    ``all_teachers`` entries multi_teacher_kl reads; the first source is the single teacher)."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch, length), generator=g)
    labels = input_ids.clone()
    labels[:, :prompt] = -100
    start = torch.randint(0, vocab, (batch, length, 1), generator=g)
    teacher_ids = (start + torch.arange(k) * 4099) % vocab  # distinct: k * 4099 < vocab
    teacher_logits = (torch.randn(batch, length, k, generator=g) * 3).sort(-1, descending=True).values
    # the other sources: their own top-k (other ids, other logits), all on every labelled token
    starts = torch.cat([start, torch.randint(0, vocab, (batch, length, teachers - 1), generator=g)], -1)
    all_ids = (starts[..., None] + torch.arange(k) * 4099) % vocab  # [B, T, S, k]
    extra = (torch.randn(batch, length, teachers - 1, k, generator=g) * 3).sort(-1, descending=True).values
    all_logits = torch.cat([teacher_logits[:, :, None], extra], dim=2)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "teacher_ids": teacher_ids,
        "teacher_logits": teacher_logits,
        "teacher_mask": labels != -100,
        "weight": torch.ones(batch),
        "all_teacher_ids": all_ids,
        "all_teacher_logits": all_logits,
        "all_teacher_mask": (labels != -100)[..., None].expand(batch, length, teachers).clone(),
        "all_teacher_scores": torch.randn(batch, teachers, generator=g).abs() + 1.0,  # CE-like, unused by uniform
    }


def dense_fuse_kl(logits, batch, *, beta=0.5, temperature=2.0, top_p=0.95):
    """Eq. 4 with a dense teacher (FuseLLM's way; labels shift instead of a logits copy, as ours)."""
    from profuser.teacher import teacher_logprobs

    b, t, v = logits.shape
    shift = lambda x, fill: F.pad(x[:, 1:], [0, 0] * (x.dim() - 2) + [0, 1], value=fill)
    target = shift(batch["labels"], -100)
    labelled = target != -100
    logq = F.log_softmax(logits.float(), dim=-1)  # [B, T, V]
    ce = F.nll_loss(logq.view(-1, v), target.view(-1), reduction="none").view(b, t)
    with torch.no_grad():
        probs = teacher_logprobs(shift(batch["teacher_logits"], float("-inf")), temperature=temperature, top_p=top_p).exp()
        dense = torch.zeros_like(logq).scatter_(-1, shift(batch["teacher_ids"], 0), probs)  # [B, T, V]
    has = shift(batch["teacher_mask"], False) & labelled
    kl = (torch.xlogy(dense, dense) - dense * logq).sum(-1)
    w = batch["weight"][:, None]
    n = labelled.sum()
    return ((ce * labelled + beta * kl * has) * w).sum() / n, {}


def torch_ce(logits, batch):
    target = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), target.view(-1), ignore_index=-100), {}


def loss_fns():
    from profuser_plugins.losses.fuse_kl import FuseKL
    from profuser_plugins.losses.multi_teacher_kl import MultiTeacherKL
    from profuser_plugins.losses.sft import SFT

    return {"sft": SFT(), "fuse_kl": FuseKL(), "dense": dense_fuse_kl, "torch_ce": torch_ce,
            "multi_teacher_kl": MultiTeacherKL()}


def _clock() -> tuple[float, float]:
    # wall time, and CPU time of all this process's threads (less sensitive to other processes)
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = _clock()
    return wall - start[0], cpu - start[1]


def train_step(model, loss_fn, batch) -> tuple[float, float]:
    model.zero_grad(set_to_none=True)
    start = _clock()
    logits = model(input_ids=batch["input_ids"], use_cache=False).logits  # [B, T, V]
    loss, _ = loss_fn(logits, batch)
    loss.backward()
    return _since(start)


def loss_step(logits, loss_fn, batch) -> tuple[float, float]:
    logits.grad = None
    start = _clock()
    loss, _ = loss_fn(logits, batch)
    loss.backward()
    return _since(start)


# --- memory, in a fresh process per variant ----------------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap pages back, so RSS = live memory
    except OSError:
        pass


def measure_memory(args) -> dict:
    model = load(args.model)
    batch = make_batch(model.config.vocab_size, args.batch, args.length, args.k, args.prompt, args.teachers)
    loss_fn = loss_fns()[args.memory_of]
    peaks, bases = [], []
    for i in range(3):  # the first step warms up (lazy inits, thread pools); two measured
        model.zero_grad(set_to_none=True)
        _trim()
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        base = _status_kib("VmRSS")
        train_step(model, loss_fn, batch)
        if i:
            peaks.append(_status_kib("VmHWM"))
            bases.append(base)
    return {"peak_rss_mib": max(peaks) / 1024, "base_rss_mib": min(bases) / 1024, "step_mib": max(p - b for p, b in zip(peaks, bases)) / 1024}


def memory_in_subprocess(args, variant: str) -> dict:
    cmd = [sys.executable, __file__, "--memory-of", variant, "--model", args.model, "--batch", str(args.batch),
           "--length", str(args.length), "--k", str(args.k), "--prompt", str(args.prompt),
           "--teachers", str(args.teachers)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def time_losses(fns, variants, batch, vocab, args) -> dict:
    """The loss alone (forward + backward) on fixed logits, far less noisy than whole steps."""
    logits = torch.randn(args.batch, args.length, vocab, generator=torch.Generator().manual_seed(1)).mul_(3).requires_grad_()
    loss_s = {v: [] for v in variants}
    for r in range(args.loss_rounds + 1):  # the first round warms up
        for v in variants:
            elapsed = loss_step(logits, fns[v], batch)
            if r:
                loss_s[v].append(elapsed[0])
    loss = {v: statistics.median(s) for v, s in loss_s.items()}
    out = {"loss_seconds": loss, "loss_seconds_all": {v: [round(w, 4) for w in s] for v, s in loss_s.items()},
           "loss_time_ratio": loss["fuse_kl"] / loss["sft"]}
    out.update({f"{v}_loss_time_ratio": loss[v] / loss["sft"] for v in variants if v not in ("sft", "fuse_kl")})
    return out


# --- main ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object (else a table)")
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--teachers", type=int, default=3, help="sources S of multi_teacher_kl (>= 1)")
    parser.add_argument("--prompt", type=int, default=64, help="prompt positions per example (no label)")
    parser.add_argument("--rounds", type=int, default=3, help="timed steps per variant (after one warm-up)")
    parser.add_argument("--loss-rounds", type=int, default=10, help="timed loss-only calls per variant")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--loss-only", action="store_true", help="time the losses alone on random logits, no model")
    parser.add_argument("--vocab", type=int, default=49152, help="vocabulary of --loss-only")
    parser.add_argument("--memory-of", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.memory_of:
        print(json.dumps(measure_memory(args)))
        return
    fns = loss_fns()
    variants = list(dict.fromkeys(["sft", "fuse_kl", *args.variants]))
    if args.loss_only:
        batch = make_batch(args.vocab, args.batch, args.length, args.k, args.prompt, args.teachers)
        print(json.dumps({"vocab": args.vocab, "batch": [args.batch, args.length], "k": args.k, "teachers": args.teachers,
                          **time_losses(fns, variants, batch, args.vocab, args)}, indent=2))
        return

    model = load(args.model)
    vocab = model.config.vocab_size
    batch = make_batch(vocab, args.batch, args.length, args.k, args.prompt, args.teachers)

    step_s = {v: [] for v in variants}  # (wall, cpu) per step
    for v in variants:
        train_step(model, fns[v], batch)  # warm-up
    for r in range(args.rounds):
        for v in variants[r % len(variants):] + variants[: r % len(variants)]:  # rotate the order
            step_s[v].append(train_step(model, fns[v], batch))
    model.zero_grad(set_to_none=True)

    losses = time_losses(fns, variants, batch, vocab, args)

    step = {v: statistics.median(w for w, _ in s) for v, s in step_s.items()}
    step_cpu = {v: statistics.median(c for _, c in s) for v, s in step_s.items()}
    result = {
        "model": args.model,
        "batch": [args.batch, args.length],
        "vocab": vocab,
        "k": args.k,
        "teachers": args.teachers,
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "step_seconds": step,
        "step_cpu_seconds": step_cpu,
        "step_seconds_all": {v: [round(w, 3) for w, _ in s] for v, s in step_s.items()},
        "time_ratio": step["fuse_kl"] / step["sft"],
        "cpu_time_ratio": step_cpu["fuse_kl"] / step_cpu["sft"],
        **losses,
    }
    for v in variants:
        if v not in ("sft", "fuse_kl"):
            result[f"{v}_time_ratio"] = step[v] / step["sft"]
            result[f"{v}_cpu_time_ratio"] = step_cpu[v] / step_cpu["sft"]
    if "torch_ce" in variants:
        result["fuse_kl_vs_torch_ce_time_ratio"] = step["fuse_kl"] / step["torch_ce"]

    if not args.no_memory:
        del model
        _trim()
        memory = {v: memory_in_subprocess(args, v) for v in variants}
        result["memory_mib"] = memory
        result["memory_method"] = "fresh process per variant; VmHWM reset via /proc/self/clear_refs, read after a step"
        result["peak_memory_ratio"] = memory["fuse_kl"]["peak_rss_mib"] / memory["sft"]["peak_rss_mib"]
        result["step_memory_ratio"] = memory["fuse_kl"]["step_mib"] / memory["sft"]["step_mib"]
        for v in variants:
            if v not in ("sft", "fuse_kl"):
                result[f"{v}_peak_memory_ratio"] = memory[v]["peak_rss_mib"] / memory["sft"]["peak_rss_mib"]
                result[f"{v}_step_memory_ratio"] = memory[v]["step_mib"] / memory["sft"]["step_mib"]

    if args.json:
        print(json.dumps(result, indent=2))
        return
    loss = result["loss_seconds"]
    print(f"{args.model}  batch {args.batch} x {args.length}  k={args.k}  threads={result['threads']}  medians of {args.rounds}")
    print(f"{'variant':10} {'step s':>8} {'x sft':>7} {'cpu s':>8} {'x sft':>7} {'loss s':>8} {'peak MiB':>9} {'step MiB':>9}")
    for v in variants:
        mem = result.get("memory_mib", {}).get(v, {})
        print(f"{v:10} {step[v]:8.2f} {step[v] / step['sft']:7.3f} {step_cpu[v]:8.2f} {step_cpu[v] / step_cpu['sft']:7.3f} {loss[v]:8.3f} "
              f"{mem.get('peak_rss_mib', float('nan')):9.0f} {mem.get('step_mib', float('nan')):9.0f}")


if __name__ == "__main__":
    main()
