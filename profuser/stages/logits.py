"""The ``logits/<mode>/<source>`` stage: teacher-force one source and store its top-k logits.

training mode: the source reads every train example's ground-truth response (its NLL feeds
Min-CE, its distribution is the training-mode teacher); inference mode: only the examples the
source won in ``select/inference``, on its own generation (the paper keeps "the chosen output
and its associated logits").

Each conversation is formatted with the source's own chat template (``profuser.chat``); the
logits at position t-1 predict response token t. Only those positions are projected onto the
vocabulary (``logits_to_keep``), never the prompt's: with a 262k vocabulary the full [B, L, V]
tensor is most of the memory. Examples are sorted by length and right-padded in batches; the
writer (``profuser.logits_store``) skips ids already stored by a killed earlier attempt.

Under a multi-process launch (torchrun, accelerate launch) every rank runs this stage: rank r
teacher-forces examples r, r + W, r + 2W, ... (in data order: a split every rank computes alike,
whatever is already stored) into its own shards (``shard-NNNNN-rR.arrow``); rank 0 then waits
until the shards hold every example and writes the store's index, and the runner seals the one
artifact. The result does not depend on the number of processes, so neither does the cache key.
"""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from ..data import read_records
from ..errors import DataError, ModelError, ProfuserError
from ..logits_store import LogitsWriter
from ..pipeline import rank_and_world, wait_until
from ..recipe import DistillSpec, ModelSpec

VERSION = "1"
DISTRIBUTED = True  # every rank of a multi-process launch takes a slice (see above)
log = logging.getLogger(__name__)

# positions reduced at once (logsumexp, top-k): bounds the float32 temporaries to CHUNK x V x 4
# bytes on top of the logits themselves (134 MB at Gemma's 262k vocabulary)
CHUNK = 128


@dataclass
class Item:
    id: str
    system: str
    instruction: str
    response: str


@dataclass
class Encoded:
    id: str
    response: str
    input_ids: np.ndarray  # [L] int64
    response_start: int
    offsets: np.ndarray  # [L - response_start, 2] int32
    truncated: int


def items(ctx, mode: str, source: str) -> list[Item]:
    """The (prompt, response) pairs this source is teacher-forced on, in data order."""
    records = read_records(ctx.inputs["data"] / "train.parquet")
    if mode == "training":
        return [Item(r.id, r.system, r.instruction, r.response) for r in records]
    if mode != "inference":
        raise ProfuserError(f"unknown mode {mode!r} (inference or training)", where=f"stage logits/{mode}/{source}")
    selection = pq.read_table(ctx.inputs["select"] / "selection.parquet", columns=["id", "chosen"])
    won = {i for i, c in zip(selection["id"].to_pylist(), selection["chosen"].to_pylist()) if c == source}
    generations = pq.read_table(ctx.inputs["generate"] / "generations.parquet", columns=["id", "response"])
    generated = dict(zip(generations["id"].to_pylist(), generations["response"].to_pylist()))
    out = []
    for r in records:
        if r.id not in won:
            continue
        if r.id not in generated:
            raise DataError(f"example {r.id!r} was won by {source!r} but its generation is missing",
                            where=f"generate/{source}/generations.parquet")
        out.append(Item(r.id, r.system, r.instruction, generated[r.id]))
    return out


def encode(tokenizer, item: Item, *, max_length: int, source: str) -> Encoded:
    """``item`` in the source's chat format (``load_tokenizer`` applied any recipe template override)."""
    from ..chat import encode_chat

    try:
        enc = encode_chat(tokenizer, item.system, item.instruction, item.response, max_length=max_length)
    except DataError as exc:
        raise DataError(f"example {item.id!r}: {exc.message} (raise distill.max_length?)", where=f"model {source}") from None
    if enc.response_start < 1:  # the first response token needs a position before it to be predicted
        raise ModelError(f"example {item.id!r}: the chat format puts no token before the response", where=f"model {source}")
    return Encoded(item.id, item.response, np.asarray(enc.input_ids, dtype=np.int64), enc.response_start,
                   np.asarray(enc.response_offsets, dtype=np.int32), enc.truncated)


def _keeps_masked_positions(model) -> bool:
    """Whether ``model.forward`` projects only the positions of a boolean ``logits_to_keep`` mask
    (transformers >= 5); otherwise the full logits are computed and indexed afterwards."""
    try:
        from transformers.modeling_utils import slice_logits_to_keep  # noqa: F401
    except ImportError:
        return False
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def score_batch(model, batch: list[Encoded], *, top_k: int, pad_id: int, device: str, masked: bool) -> list[dict]:
    """Teacher-force one batch; per example the arrays ``LogitsWriter.add`` takes."""
    import torch

    lengths = [len(e.input_ids) for e in batch]
    width = max(lengths)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # [B, L] right-padded
    attention = torch.zeros((len(batch), width), dtype=torch.long)  # [B, L]
    keep = torch.zeros((len(batch), width), dtype=torch.bool)  # [B, L] positions that predict response tokens
    for b, e in enumerate(batch):
        input_ids[b, : lengths[b]] = torch.from_numpy(e.input_ids)
        attention[b, : lengths[b]] = 1
        keep[b, e.response_start - 1 : lengths[b] - 1] = True
    # the token each kept position predicts, in the same (row-major) order as the kept logits
    targets = torch.cat([torch.from_numpy(e.input_ids[e.response_start :]) for e in batch]).to(device)  # [N]
    input_ids, attention, keep = input_ids.to(device), attention.to(device), keep.to(device)
    if masked:
        logits = model(input_ids=input_ids, attention_mask=attention, logits_to_keep=keep, use_cache=False).logits
    else:
        logits = model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits[keep]
    logits = logits.reshape(-1, logits.shape[-1])  # [N, V]
    if logits.shape[0] != targets.shape[0]:
        raise ModelError(f"returned logits for {logits.shape[0]} positions, expected {targets.shape[0]}", where="logits stage")

    nll, logz, top_ids, top_logits = [], [], [], []
    for a in range(0, logits.shape[0], CHUNK):
        chunk = logits[a : a + CHUNK].float()  # [c, V] at T = 1
        z = torch.logsumexp(chunk, dim=-1)  # [c]
        nll.append(z - chunk.gather(-1, targets[a : a + CHUNK, None]).squeeze(-1))
        logz.append(z)
        top = chunk.topk(top_k, dim=-1)  # sorted: descending logits
        top_ids.append(top.indices)
        top_logits.append(top.values)
    nll_all = torch.cat(nll).cpu().numpy()  # [N]
    logz_all = torch.cat(logz).cpu().numpy()  # [N]
    ids_all = torch.cat(top_ids).to(torch.int32).cpu().numpy()  # [N, k]
    logits_all = torch.cat(top_logits).cpu().numpy()  # [N, k] float32; the writer checks the fp16 range

    out, at = [], 0
    for e in batch:
        n = len(e.input_ids) - e.response_start
        span = slice(at, at + n)
        out.append({
            "example_id": e.id, "response": e.response, "token_ids": e.input_ids[e.response_start :], "offsets": e.offsets,
            "nll": nll_all[span], "topk_ids": ids_all[span], "topk_logits": logits_all[span], "logz": logz_all[span],
            "truncated": e.truncated,
        })
        at += n
    return out


def run(ctx) -> dict:
    import torch
    from tqdm.auto import tqdm

    from ..models import load_model

    cfg = ctx.config
    mode, source = cfg["mode"], cfg["source"]
    spec = ModelSpec(**cfg["model"])
    distill = DistillSpec(**cfg["distill"])

    all_items = items(ctx, mode, source)
    rank, world = rank_and_world()
    writer = LogitsWriter(ctx.out, distill.top_k, model=source, part=f"-r{rank}" if world > 1 else "")
    mine = all_items[rank::world]  # [every example] with one process
    resumed = sum(1 for it in mine if it.id in writer)
    todo_items = [it for it in mine if it.id not in writer]
    device = ctx.runtime.torch_device()
    tokens = truncated = 0
    seconds = load_seconds = 0.0
    max_length = distill.max_length
    if todo_items:
        t_load = time.time()
        model, tokenizer = load_model(spec, device=device, cache_dir=ctx.runtime.cache_dir)
        load_seconds = time.time() - t_load
        # the model's context (or the recipe's model max_length) caps the distill length
        max_length = min(distill.max_length, tokenizer.model_max_length or distill.max_length)
        vocab = model.get_output_embeddings().weight.shape[0]
        if distill.top_k > vocab:
            raise ProfuserError(f"distill.top_k = {distill.top_k} exceeds the vocabulary ({vocab})", where=f"model {source}")
        encoded = [encode(tokenizer, it, max_length=max_length, source=source) for it in todo_items]
        encoded.sort(key=lambda e: -len(e.input_ids))  # stable: equal lengths keep data order
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        masked = _keeps_masked_positions(model)
        t0 = time.time()
        try:
            with torch.inference_mode(), tqdm(total=len(encoded), unit="ex", desc=ctx.stage.id,
                                              disable=not ctx.runtime.progress) as bar:
                for start in range(0, len(encoded), distill.batch_size):
                    batch = encoded[start : start + distill.batch_size]
                    for row in score_batch(model, batch, top_k=distill.top_k, pad_id=pad_id, device=device, masked=masked):
                        writer.add(**row)
                        tokens += len(row["nll"])
                        truncated += row["truncated"] > 0
                    bar.update(len(batch))
                    bar.set_postfix(tok_s=f"{tokens / max(time.time() - t0, 1e-9):.0f}")
        finally:
            writer.flush()  # also after a failure: a rerun resumes after the complete examples
        seconds = time.time() - t0
    if rank > 0:  # rank 0 writes the index once every rank's shards are in
        return {}
    if world > 1:
        expected = {it.id for it in all_items}

        def all_stored() -> bool:
            writer.rescan()  # the other ranks' shards written since
            return expected <= writer.done_ids

        wait_until(all_stored)
    summary = writer.close()
    if truncated:
        log.warning("%s: %d responses truncated to max_length %d", ctx.stage.id, truncated, max_length)
    return {
        "examples": summary["examples"],
        "tokens": summary["tokens"],
        "computed_examples": len(todo_items),  # by this process (rank 0 of ``world_size``)
        "world_size": world,
        "computed_tokens": tokens,
        "resumed_examples": resumed,
        "truncated_examples": int(truncated),
        "seconds": seconds,
        "load_seconds": load_seconds,
        "tokens_per_s": tokens / seconds if seconds else 0.0,
        "bytes_per_token": summary["bytes_per_token"],
        "top_k": distill.top_k,
    }

