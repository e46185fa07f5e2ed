"""The ``generate/<source>`` stage: one response per training instruction from one source model
(the inference mode's candidates), or n of them with a generator whose params set ``n`` > 1.

Prompts are generated in shards written atomically into the partial directory
(``shards/00000.parquet``, ...): a killed stage resumes at the first missing shard; under a
multi-process launch the ranks split the shards. Each shard
has its own seed derived from (``seed``, shard index), so a resumed run writes exactly what an
uninterrupted one would. At the end the shards are joined into ``generations.parquet`` (id,
response) and removed. With n > 1 samples per prompt it also has ``responses`` list<string> [n]
(``response`` stays sample 0, so every reader of one response per source reads that).

Metrics: examples, new tokens (the responses counted with the source's tokenizer, so every
backend is measured the same way), generation seconds and tokens per second, prompts whose
responses are empty, and prompts longer than the model's context (``profuser.prompt_limits``:
counted chat-formatted against its real limit and said in one line; ``truncated_prompts``: those
the generator reports it cut to leave room for the new tokens).
"""

from __future__ import annotations

import hashlib
import logging
import time

import pyarrow as pa
import pyarrow.parquet as pq

from ..artifacts import finish, run_shards, table_stats
from ..chat import conversation_history
from ..components import Prompt
from ..data import read_records
from ..errors import ProfuserError
from ..prompt_limits import overlong_prompts
from . import ModelIdentity, Ref, StageConfig

log = logging.getLogger(__name__)
VERSION = "1"  # n > 1 (the responses column) comes only from a params n, which is in the key
DISTRIBUTED = True  # under a multi-process launch the ranks split the shards (``run_shards``)
SHARD_SIZE = 32  # prompts per shard, unless the generator says otherwise (``shard_size``)
OUTPUT = "generations.parquet"
DATA = "data"  # input role: the data stage


class Config(StageConfig):
    model: ModelIdentity  # the source
    generator: Ref
    seed: int


def shard_seed(seed: int, shard: int) -> int:
    digest = hashlib.sha256(f"{seed}:{shard}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def samples_per_prompt(generator) -> int:
    """The generator's ``n`` param (samples per prompt), 1 when it has none."""
    n = getattr(generator.params, "n", 1)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ProfuserError(f"n must be a whole number >= 1, not {n!r}", where=f"generator {generator.name}")
    return n


def run(ctx) -> dict:
    from ..models import as_spec, load_tokenizer

    cfg = ctx.config
    spec = as_spec(cfg.model)
    records = read_records(ctx.inputs[DATA] / "train.parquet")
    ids = [r.id for r in records]
    final = ctx.out / OUTPUT
    if final.is_file() and pq.read_table(final, columns=["id"])["id"].to_pylist() == ids:
        return table_stats(final)  # finished before a kill that came ahead of the commit

    generator = ctx.build("generators", cfg.generator)
    tokenizer = load_tokenizer(spec, cache_dir=ctx.runtime.cache_dir, engine=ctx.engine)
    prompts = [Prompt(r.id, r.system, r.instruction, conversation_history(r.meta)) for r in records]
    # prompts past the model's context: counted in the stats and said in one line, never cut silently
    overlong = overlong_prompts(tokenizer, spec, prompts)
    if overlong is not None and overlong.count:
        log.warning("%s: %s; counted in its stats (overlong_prompts; truncated_prompts: those the generator cut)",
                    ctx.stage.id, overlong.line())
    shard_size = int(getattr(generator, "shard_size", SHARD_SIZE))

    n = samples_per_prompt(generator)

    def compute(index: int, rows: slice):
        chunk = prompts[rows]
        started = time.perf_counter()
        responses = generator.generate(spec, chunk, seed=shard_seed(cfg.seed, index))
        seconds = time.perf_counter() - started
        where = f"generator {cfg.generator.name} on {spec.key}"
        if n == 1 and (len(responses) != len(chunk) or not all(isinstance(r, str) for r in responses)):
            raise ProfuserError(f"returned {len(responses)} responses for {len(chunk)} prompts (shard {index})", where=where)
        if n > 1 and (len(responses) != len(chunk) or not all(
                isinstance(r, (list, tuple)) and len(r) == n and all(isinstance(x, str) for x in r) for r in responses)):
            raise ProfuserError(f"n is {n}: must return a list of {n} responses for each of the {len(chunk)} prompts "
                                f"(shard {index})", where=where)
        texts = [x for r in responses for x in r] if n > 1 else responses
        tokens = [len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in texts]
        stats = {"examples": len(chunk), "new_tokens": sum(tokens), "seconds": seconds,
                 "empty": sum(not r.strip() for r in texts),
                 "truncated": int(getattr(generator, "last_stats", {}).get("truncated_prompts", 0))}  # room for new tokens
        ctx.log_metrics(index, {**stats, "tokens_per_s": stats["new_tokens"] / max(seconds, 1e-9)})
        columns = {"id": [q.id for q in chunk], "response": [r[0] for r in responses] if n > 1 else responses}
        if n > 1:
            columns["responses"] = pa.array([list(r) for r in responses], pa.list_(pa.string()))
        return pa.table(columns), stats

    try:
        results = run_shards(ctx.out, ids, shard_size, compute, split=generator.data_parallel)
    finally:  # engines that keep GPU memory (vLLM) shut down before the next stage loads a model
        if callable(close := getattr(generator, "close", None)):
            close()
    if results is None:  # another rank than 0: rank 0 joins the shards
        return {}
    totals = {k: sum(s.get(k, 0) for _, s in results) for k in ("examples", "new_tokens", "seconds", "empty", "truncated")}
    metrics = {
        "model": spec.key,
        "examples": len(ids),
        "new_tokens": totals["new_tokens"],
        "generation_seconds": round(totals["seconds"], 3),
        "tokens_per_s": round(totals["new_tokens"] / totals["seconds"], 2) if totals["seconds"] else 0.0,
        "mean_new_tokens": round(totals["new_tokens"] / (totals["examples"] * n), 2) if totals["examples"] else 0.0,
        "empty_responses": totals["empty"],
        "truncated_prompts": totals["truncated"],  # as the generator reports it (hf, vllm)
        **(overlong.stats() if overlong is not None else {}),
    }
    if n > 1:
        metrics["samples_per_prompt"] = n
    fields = [("id", pa.string()), ("response", pa.string())] + ([("responses", pa.list_(pa.string()))] if n > 1 else [])
    finish(ctx.out, OUTPUT, results, pa.schema(fields), metrics)
    return metrics
