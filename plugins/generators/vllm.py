"""``vllm``: generation with vLLM (continuous batching, tensor parallelism; needs a CUDA GPU).

Install with ``pip install 'profuser[vllm]'``; vLLM is imported only when this generator runs.
Prompts are formatted by profuser (the same chat templates as the ``hf`` generator) and handed
to vLLM as token ids, so BOS is never doubled. Each prompt gets its own sampling seed derived
from (``seed``, prompt id): a response does not depend on which other prompts share its batch,
shard or engine, so a resumed stage reproduces an uninterrupted one and the split across engines
does not change the result.

Data parallel: the visible GPUs are cut into groups of ``tensor_parallel_size``, one engine per
group, each on its own slice of the prompts. In a single process the engines run in spawned
worker processes (``CUDA_VISIBLE_DEVICES`` set to their group before vLLM loads); under a
multi-process launch (torchrun) each rank takes its share of the node's GPUs and its own shards
of the stage. One engine in a plain process runs in-process. ``close()`` shuts every engine down.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import multiprocessing
import os
import sys
import threading
import time
import weakref
from typing import Any

from pydantic import Field

from profuser import hookimpl
from profuser.components import Generator, Prompt
from profuser.errors import ModelError

from ._common import (
    SamplingParams,
    context_limit,
    cut_at_stop,
    encode_prompt,
    model_label,
    runtime_of,
    split_stops,
)

# what a launcher sets: an engine's worker must not take itself for a rank of the launch
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE",
               "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP")
_ENV_LOCK = threading.Lock()


def prompt_seed(seed: int, prompt_id: str) -> int:
    digest = hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def visible_devices(env: dict[str, str] | None = None, count: int | None = None) -> list[str]:
    """The CUDA devices this process may use, as ``CUDA_VISIBLE_DEVICES`` names them (ids or UUIDs);
    without that variable, ``0 .. count-1`` (``count``: torch's device count)."""
    env = os.environ if env is None else env
    listed = env.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip()]
    if count is None:
        import torch

        count = torch.cuda.device_count()  # NVML: does not initialise CUDA in this process
    return [str(i) for i in range(count)]


def launch_shape(env: dict[str, str] | None = None) -> tuple[int, int, int]:
    """(world size, local rank, processes on this node) of a multi-process launch ((1, 0, 1) without)."""
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE", 1))
    local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    return world, int(env.get("LOCAL_RANK", 0)), local_world


def ranks_fit(devices: list[str], tensor_parallel_size: int, local_world: int) -> bool:
    """Whether every process of a launch on this node gets a GPU group of its own."""
    return local_world * tensor_parallel_size <= len(devices)


def engine_groups(devices: list[str], tensor_parallel_size: int, engines: int | None = None, *,
                  local_rank: int = 0, local_world: int = 1) -> list[list[str]]:
    """The GPU groups this process drives, one engine each: under a launch (``local_world`` > 1)
    the node's devices are cut into one contiguous block per process first; ``engines`` (None: as
    many as fit) groups of ``tensor_parallel_size`` devices are then taken from this process's block."""
    where = "this process"
    if local_world > 1:
        per = len(devices) // local_world
        devices = devices[local_rank * per:(local_rank + 1) * per]
        where = f"rank {local_rank} of {local_world} on this node"
    fit = len(devices) // tensor_parallel_size
    if fit == 0:
        raise ModelError(f"tensor_parallel_size {tensor_parallel_size} needs {tensor_parallel_size} GPU(s); "
                         f"{len(devices)} visible to {where}", where="generator vllm")
    count = engines or fit
    if count > fit:
        raise ModelError(f"data_parallel_size {count} x tensor_parallel_size {tensor_parallel_size} needs "
                         f"{count * tensor_parallel_size} GPUs; {len(devices)} visible to {where}", where="generator vllm")
    return [devices[i * tensor_parallel_size:(i + 1) * tensor_parallel_size] for i in range(count)]


def split_evenly(n: int, parts: int) -> list[slice]:
    """``parts`` contiguous slices of ``range(n)``, sizes differing by at most one (empty ones dropped)."""
    size, extra = divmod(n, parts)
    bounds, start = [], 0
    for i in range(parts):
        stop = start + size + (i < extra)
        if stop > start:
            bounds.append(slice(start, stop))
        start = stop
    return bounds


def worker_env(devices: list[str], env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of an engine worker: its GPU group, and no launch variables."""
    env = dict(os.environ if env is None else env)
    for name in LAUNCH_VARS:
        env.pop(name, None)
    env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
    return env


def shutdown_engine(llm: Any) -> None:
    """Release what a ``vllm.LLM`` holds: its engine processes, the distributed state, the CUDA cache
    (deleting the object alone leaves GPU memory in use: vllm-project/vllm#1908, #6544)."""
    shutdown = getattr(llm, "shutdown", None)  # newer vLLM: LLM.shutdown()
    if callable(shutdown):
        shutdown()
    else:
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and callable(getattr(core, "shutdown", None)):
            core.shutdown()
    del llm
    with contextlib.suppress(ImportError):
        from vllm.distributed import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()  # model-parallel groups, gc, torch.cuda.empty_cache
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_engine(llm: Any, prompts: list[list[int]], sampling: list[dict], progress: bool = False) -> list[tuple[str, int]]:
    """(text, new tokens) per prompt, in input order (vLLM keeps it)."""
    import vllm

    params = [vllm.SamplingParams(**kw) for kw in sampling]
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=progress)
    return [(out.outputs[0].text, len(out.outputs[0].token_ids)) for out in outputs]


def _engine_worker(conn, devices: list[str], llm_kwargs: dict) -> None:
    """A spawned process driving one engine on ``devices``; messages: ("generate", ids, sampling) -> ("ok",
    results) | ("error", line); ("close",) ends it. Its exit returns the GPU whatever vLLM keeps."""
    os.environ.update(worker_env(devices))  # set before spawn too; again here in case of an odd start method
    for name in LAUNCH_VARS:
        os.environ.pop(name, None)
    try:
        import vllm

        llm = vllm.LLM(**llm_kwargs)
    except BaseException as exc:  # noqa: BLE001  (reported to the parent as one line)
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", None))
    try:
        while True:
            message = conn.recv()
            if message[0] == "close":
                break
            try:
                conn.send(("ok", run_engine(llm, message[1], message[2])))
            except Exception as exc:  # noqa: BLE001
                conn.send(("error", f"{type(exc).__name__}: {exc}"))
    except EOFError:  # the parent went away
        pass
    finally:
        shutdown_engine(llm)
        conn.close()


class _Worker:
    def __init__(self, devices: list[str], llm_kwargs: dict):
        context = multiprocessing.get_context("spawn")  # never fork a process that may hold CUDA
        self.devices = devices
        self.conn, child = context.Pipe()
        # spawn copies os.environ when the child starts: CUDA_VISIBLE_DEVICES is in place before any import
        with _ENV_LOCK, _patched_environ(worker_env(devices)):
            self.process = context.Process(target=_engine_worker, args=(child, devices, llm_kwargs),
                                           name=f"vllm-engine-{','.join(devices)}")
            self.process.start()
        child.close()

    def receive(self, what: str):
        try:
            status, value = self.conn.recv()
        except (EOFError, ConnectionError):
            self.process.join(timeout=5)
            raise ModelError(f"the vLLM engine on GPU(s) {','.join(self.devices)} exited during {what} "
                             f"(exit code {self.process.exitcode})", where="generator vllm") from None
        if status == "error":
            raise ModelError(f"the vLLM engine on GPU(s) {','.join(self.devices)} failed during {what}: {value}",
                             where="generator vllm")
        return value

    def close(self, timeout: float = 120) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.conn.send(("close",))
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(10)
        self.conn.close()


@contextlib.contextmanager
def _patched_environ(env: dict[str, str]):
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _close_all(engines: dict) -> None:
    workers, llm = engines.pop("workers", []), engines.pop("llm", None)
    for worker in workers:
        worker.close()
    if llm is not None:
        shutdown_engine(llm)


def _vllm_missing() -> bool:
    if "vllm" in sys.modules:
        return sys.modules["vllm"] is None
    return importlib.util.find_spec("vllm") is None


class VLLMGenerator(Generator):
    name = "vllm"
    shard_size = 1024  # vLLM schedules its own batches; large shards keep the GPUs busy

    class Params(SamplingParams):
        tensor_parallel_size: int = Field(default=1, gt=0)
        data_parallel_size: int | None = Field(
            default=None, gt=0,
            description="engines per process, each on its own tensor_parallel_size GPUs; None: as many as the GPUs hold")
        gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
        enforce_eager: bool = False  # skip CUDA graph capture (faster start, slower decoding)

    def __init__(self, params=None):
        super().__init__(params)
        self._key: str | None = None  # the model the engines hold
        self._engines: dict[str, Any] = {}  # "llm" (in-process) or "workers"
        self._finalizer = weakref.finalize(self, _close_all, self._engines)  # also at interpreter exit
        self.last_stats: dict[str, Any] = {}

    @property
    def data_parallel(self) -> bool:  # type: ignore[override]
        """Under a launch, each rank drives its own engines when every rank on the node gets a GPU
        group of its own; otherwise rank 0 spreads its engines over every GPU and the others wait."""
        world, _, local_world = launch_shape()
        return world > 1 and ranks_fit(visible_devices(), self.params.tensor_parallel_size, local_world)

    def groups(self) -> list[list[str]]:
        """The GPU groups of this process's engines."""
        world, local_rank, local_world = launch_shape()
        devices, p = visible_devices(), self.params
        if world > 1 and not ranks_fit(devices, p.tensor_parallel_size, local_world):
            local_rank, local_world = 0, 1  # rank 0 alone generates (data_parallel is False)
        return engine_groups(devices, p.tensor_parallel_size, p.data_parallel_size,
                             local_rank=local_rank, local_world=local_world)

    def close(self) -> None:
        """Shut every engine down and free their GPU memory (the stage calls this when done)."""
        _close_all(self._engines)
        self._key = None

    def _start(self, spec):
        from profuser.models import load_tokenizer, resolve_model
        from profuser.store import stable_hash

        runtime = runtime_of(self)
        tokenizer = load_tokenizer(spec, cache_dir=runtime.cache_dir, engine=runtime.engine)
        key = stable_hash(spec.identity())
        if self._key == key:
            return tokenizer
        self.close()
        path = resolve_model(spec, cache_dir=runtime.cache_dir, engine=runtime.engine)  # a local directory (hub snapshot, GGUF, builtin)
        p = self.params
        llm_kwargs = {"model": str(path), "tokenizer": str(path), "dtype": spec.dtype,
                      "trust_remote_code": spec.trust_remote_code, "tensor_parallel_size": p.tensor_parallel_size,
                      "gpu_memory_utilization": p.gpu_memory_utilization, "max_model_len": spec.max_length,
                      "enforce_eager": p.enforce_eager}
        groups = self.groups()
        if len(groups) == 1 and launch_shape()[0] == 1:  # one engine in a plain process: no worker needed
            import vllm

            self._engines["llm"] = vllm.LLM(**llm_kwargs)
        else:
            workers = [_Worker(group, llm_kwargs) for group in groups]
            self._engines["workers"] = workers
            try:
                for worker in workers:  # they load in parallel; wait for all
                    worker.receive("loading")
            except ModelError:
                self.close()
                raise
        self._key = key
        return tokenizer

    def generate(self, model: Any, prompts: list[Prompt], *, seed: int) -> list[str]:
        from profuser.chat import format_prompt
        from profuser.models import as_spec

        spec = as_spec(model)
        if not prompts:
            return []
        if _vllm_missing():  # a clear error before any model or process
            raise ModelError("the vllm generator needs vLLM and a CUDA GPU: pip install 'profuser[vllm]' "
                             "(or use the hf generator)", where=model_label(spec))
        tokenizer = self._start(spec)
        p = self.params
        encoded = [encode_prompt(tokenizer, format_prompt(tokenizer, q.system, q.instruction, chat_template=spec.chat_template,
                                                                 history=q.history))
                   for q in prompts]
        limit = context_limit(tokenizer) or spec.max_length
        room = limit - p.max_new_tokens if limit else 1 << 62
        if room <= 0:
            raise ModelError(f"max_new_tokens {p.max_new_tokens} leaves no room for a prompt in {limit} positions",
                             where=model_label(spec))
        truncated = sum(len(ids) > room for ids in encoded)
        encoded = [ids[-room:] if len(ids) > room else ids for ids in encoded]  # keep the assistant turn opener
        sampling = self.sampling_kwargs([q.id for q in prompts], seed, tokenizer)
        started = time.perf_counter()
        if "llm" in self._engines:
            outputs = run_engine(self._engines["llm"], encoded, sampling, progress=runtime_of(self).progress)
        else:
            workers = self._engines["workers"]
            parts = split_evenly(len(encoded), len(workers))
            for worker, rows in zip(workers, parts):  # every engine works at once
                worker.conn.send(("generate", encoded[rows], sampling[rows]))
            outputs = [out for worker, _ in zip(workers, parts) for out in worker.receive("generation")]
        results = [cut_at_stop(text, p.stop) for text, _ in outputs]
        self.last_stats = {"prompts": len(prompts), "new_tokens": sum(n for _, n in outputs),
                           "seconds": time.perf_counter() - started, "truncated_prompts": truncated,
                           "engines": len(self._engines.get("workers", [])) or 1}
        return results

    def sampling_kwargs(self, ids: list[str], seed: int, tokenizer=None) -> list[dict[str, Any]]:
        """``vllm.SamplingParams`` keyword arguments per prompt (plain dicts: they travel to workers).
        With the ``tokenizer``, stop strings that are one special token go as ``stop_token_ids``:
        vLLM matches stop strings against text decoded without special tokens."""
        p = self.params
        sampling = ({"temperature": 0.0} if p.greedy else
                    {"temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k or -1})
        stop_ids, stop = split_stops(tokenizer, p.stop) if tokenizer is not None else ([], p.stop)
        extra = {"stop_token_ids": stop_ids} if stop_ids else {}
        return [{"n": 1, "max_tokens": p.max_new_tokens, "min_tokens": p.min_new_tokens,
                 "repetition_penalty": p.repetition_penalty, "stop": stop or None,
                 "seed": prompt_seed(seed, i), **sampling, **extra} for i in ids]


@hookimpl
def profuser_register_generators(register):
    register(VLLMGenerator)
