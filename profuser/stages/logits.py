"""The ``logits/<mode>/<source>`` stage: teacher-force one source and store its top-k logits.

training mode: the source reads every train example's ground-truth response (its NLL feeds
Min-CE, its distribution is the training-mode teacher); inference mode: only the examples the
source won in ``select/inference``, on its own generation (the paper keeps "the chosen output
and its associated logits"). With ``all_examples`` in its config (a loss that needs every
source's teacher, ``all_teachers``) inference mode reads every selected example's chosen
response instead, whichever source generated it (its inputs then hold every source's generate
stage, ``generations_role(source)``).

Each conversation is formatted with the source's own chat template (``profuser.chat``); the
logits at position t-1 predict response token t. Only those positions are projected onto the
vocabulary (``logits_to_keep``), never the prompt's: with a 262k vocabulary the full [B, L, V]
tensor is most of the memory. Prompts are streamed from the data file ``PROMPT_CHUNK`` records at a time;
within a chunk, examples are sorted by length and right-padded in batches (the store is in that
order); the writer (``profuser.logits_store``) skips ids already stored by a killed earlier attempt.

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
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq

from ..artifacts import CHUNK_RECORDS, iter_chunks, iter_records, read_selection
from ..chat import conversation_history
from ..components import Mode
from ..errors import DataError, ModelError, ProfuserError
from ..logits_store import LogitsWriter
from ..recipe import DistillSpec, ModelSpec
from ..runtime import rank_and_world, wait_until
from . import ModelIdentity, StageConfig

VERSION = "1"
DISTRIBUTED = True  # every rank of a multi-process launch takes a slice (see above)
log = logging.getLogger(__name__)

# positions reduced at once (logsumexp, top-k): bounds the float32 temporaries to CHUNK x V x 4
# bytes on top of the logits themselves (134 MB at Gemma's 262k vocabulary)
CHUNK = 128
# data records read at once: their items are sorted by length (less padding) and teacher-forced,
# then dropped, so memory does not grow with the data; ``align`` reads the store in the same chunks
PROMPT_CHUNK = CHUNK_RECORDS
# input roles: the data stage; in inference mode also the source's generate stage and the selection
# (with all_examples: every source's generate stage, generations_role(source), instead)
DATA, GENERATIONS, SELECTION = "data", "generate", "select"


def generations_role(source: str) -> str:
    """The input role of one source's generate stage (inference mode with ``all_examples``)."""
    return f"generate/{source}"


class Config(StageConfig):
    mode: Mode
    model: ModelIdentity  # the source
    source: str  # its key
    distill: DistillSpec
    # inference mode: every selected example's chosen response, whichever source generated it (a
    # loss that needs all_teachers), not only this source's wins; hashed only when set
    all_examples: bool = False

    OMITTED_WHEN_UNSET = ("all_examples",)


@dataclass
class Item:
    id: str
    system: str
    instruction: str
    response: str
    history: list[dict] = field(default_factory=list)  # a conversation's earlier turns (profuser.chat)


def _item(r: dict, response: str) -> Item:
    return Item(r["id"], r["system"] or "", r["instruction"], response, conversation_history(r["meta"]))


@dataclass
class Encoded:
    id: str
    response: str
    input_ids: np.ndarray  # [L] int64
    response_start: int
    offsets: np.ndarray  # [n, 2] int32, in the labelled text (the response of a single turn)
    truncated: int
    positions: np.ndarray | None = None  # [n] labelled positions; None: response_start..L-1


def items(ctx, mode: str, source: str) -> Iterator[list[Item]]:
    """The (prompt, response) pairs this source is teacher-forced on, in data order, in chunks of
    the items of ``PROMPT_CHUNK`` data records (the data file and the generations are streamed)."""
    where = f"stage logits/{mode}/{source}"
    if mode not in ("training", "inference"):
        raise ProfuserError(f"unknown mode {mode!r} (inference or training)", where=where)
    records = iter_records(ctx.inputs[DATA] / "train.parquet", ["id", "system", "instruction", "response", "meta"])
    if mode == "training":
        for chunk in iter_chunks(records, PROMPT_CHUNK):
            yield [_item(r, r["response"]) for r in chunk]
        return
    if ctx.config.all_examples:  # a loss that reads every source's teacher on the same response
        yield from _chosen_items(ctx, records)
        return
    # n > 1 samples per prompt: the won one is teacher-forced
    won = {i: s.sample for i, s in read_selection(ctx.inputs[SELECTION]).items() if s.chosen == source}
    path = ctx.inputs[GENERATIONS] / "generations.parquet"
    multi = "responses" in pq.read_schema(path).names
    # the generate stage writes one row per record in data order: read them side by side
    generations = iter_records(path, ["id", "responses" if multi else "response"])
    pending = next(generations, None)
    for chunk in iter_chunks(records, PROMPT_CHUNK):
        out = []
        for r in chunk:
            generated = None
            if pending is not None and pending["id"] == r["id"]:
                generated = pending["responses"][won.get(r["id"], 0)] if multi else pending["response"]
                pending = next(generations, None)
            if r["id"] not in won:
                continue
            if generated is None:
                raise DataError(f"example {r['id']!r} was won by {source!r} but its generation is missing (rows follow "
                                f"the data's order; the next one is {pending['id'] if pending else None!r})", where=str(path))
            out.append(_item(r, generated))
        yield out


def _chosen_items(ctx, records: Iterator[dict]) -> Iterator[list[Item]]:
    """Every selected example on its chosen response (the won sample of the chosen source's
    generations), in data order: the generations of every source that won an example
    (``generations_role(source)`` inputs, one row per record in data order) are streamed beside the data."""
    where = ctx.stage.id
    won = {i: (s.chosen, s.sample) for i, s in read_selection(ctx.inputs[SELECTION]).items()}
    followers = {}
    for source in dict.fromkeys(c for c, _ in won.values()):
        if generations_role(source) not in ctx.inputs:
            example = next(i for i, (c, _) in won.items() if c == source)
            raise DataError(f"example {example!r}: the chosen source {source!r} has no generations among this "
                            f"stage's inputs ({', '.join(sorted(ctx.inputs))})", where=where)
        file = ctx.inputs[generations_role(source)] / "generations.parquet"
        column = "responses" if "responses" in pq.read_schema(file).names else "response"
        rows = iter_records(file, ["id", column])
        followers[source] = [rows, next(rows, None), column]
    for chunk in iter_chunks(records, PROMPT_CHUNK):
        out = []
        for r in chunk:
            generated = {}
            for source, follower in followers.items():  # advance every source past this record
                rows, pending, column = follower
                if pending is not None and pending["id"] == r["id"]:
                    generated[source] = pending[column] if column == "responses" else [pending[column]]
                    follower[1] = next(rows, None)
            if r["id"] not in won:
                continue
            source, sample = won[r["id"]]
            if source not in generated or not 0 <= sample < len(generated[source]):
                raise DataError(f"example {r['id']!r} was won by {source!r} (sample {sample}) but that generation is "
                                "missing (rows follow the data's order)", where=str(ctx.inputs[generations_role(source)]))
            out.append(_item(r, generated[source][sample]))
        yield out


def encode(tokenizer, item: Item, *, max_length: int, source: str) -> Encoded:
    """``item`` in the source's chat format (``load_tokenizer`` applied any recipe template override).
    A conversation's labelled earlier assistant turns are teacher-forced too: the store's
    ``response`` is then ``chat.labelled_text`` (those turns and the response), which the offsets index."""
    from ..chat import encode_chat, labelled_text

    try:
        enc = encode_chat(tokenizer, item.system, item.instruction, item.response, max_length=max_length,
                          history=item.history)
    except DataError as exc:
        raise DataError(f"example {item.id!r}: {exc.message} (raise distill.max_length?)", where=f"model {source}") from None
    first = enc.response_start if enc.positions is None or not len(enc.positions) else int(enc.positions[0])
    if first < 1:  # the first response token needs a position before it to be predicted
        raise ModelError(f"example {item.id!r}: the chat format puts no token before the response", where=f"model {source}")
    return Encoded(item.id, labelled_text(item.response, item.history), np.asarray(enc.input_ids, dtype=np.int64),
                   enc.response_start, np.asarray(enc.response_offsets, dtype=np.int32), enc.truncated,
                   enc.positions)


def _labelled(e: Encoded) -> np.ndarray:
    """[n] the labelled tokens of an encoded example, in order."""
    return e.input_ids[e.response_start :] if e.positions is None else e.input_ids[e.positions]


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
        if e.positions is None:
            keep[b, e.response_start - 1 : lengths[b] - 1] = True
        else:  # a conversation's labelled turns
            keep[b, torch.from_numpy(e.positions - 1)] = True
    # the token each kept position predicts, in the same (row-major) order as the kept logits
    targets = torch.cat([torch.from_numpy(_labelled(e)) for e in batch]).to(device)  # [N]
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
        token_ids = _labelled(e)
        n = len(token_ids)
        span = slice(at, at + n)
        out.append({
            "example_id": e.id, "response": e.response, "token_ids": token_ids, "offsets": e.offsets,
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
    mode, source = cfg.mode, cfg.source
    spec = ModelSpec(**cfg.model)
    distill = cfg.distill

    rank, world = rank_and_world()
    writer = LogitsWriter(ctx.out, distill.top_k, model=source, part=f"-r{rank}" if world > 1 else "")
    device = ctx.runtime.torch_device()
    tokens = truncated = resumed = computed = seen = 0
    seconds = load_seconds = 0.0
    max_length = distill.max_length
    expected: set[str] = set()  # every item's id: what rank 0 waits for under a launch
    model = tokenizer = bar = None
    try:
        for chunk in items(ctx, mode, source):
            expected.update(it.id for it in chunk)
            # rank r takes items r, r + W, ... of the whole (data-ordered) list
            mine = [it for j, it in enumerate(chunk, seen) if j % world == rank]
            seen += len(chunk)
            todo = [it for it in mine if it.id not in writer]
            resumed += len(mine) - len(todo)
            if not todo:
                continue
            if model is None:
                t_load = time.time()
                model, tokenizer = load_model(spec, device=device, cache_dir=ctx.runtime.cache_dir, engine=ctx.engine)
                load_seconds = time.time() - t_load
                # the model's context (or the recipe's model max_length) caps the distill length
                max_length = min(distill.max_length, tokenizer.model_max_length or distill.max_length)
                vocab = model.get_output_embeddings().weight.shape[0]
                if distill.top_k > vocab:
                    raise ProfuserError(f"distill.top_k = {distill.top_k} exceeds the vocabulary ({vocab})",
                                        where=f"model {source}")
                pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
                masked = _keeps_masked_positions(model)
                bar = tqdm(unit="ex", desc=ctx.stage.id, disable=not ctx.runtime.progress)
                t0 = time.time()
            encoded = [encode(tokenizer, it, max_length=max_length, source=source) for it in todo]
            encoded.sort(key=lambda e: -len(e.input_ids))  # stable: equal lengths keep data order
            with torch.inference_mode():
                for start in range(0, len(encoded), distill.batch_size):
                    batch = encoded[start : start + distill.batch_size]
                    for row in score_batch(model, batch, top_k=distill.top_k, pad_id=pad_id, device=device, masked=masked):
                        writer.add(**row)
                        tokens += len(row["nll"])
                        truncated += row["truncated"] > 0
                    computed += len(batch)
                    bar.update(len(batch))
                    bar.set_postfix(tok_s=f"{tokens / max(time.time() - t0, 1e-9):.0f}")
    finally:
        writer.flush()  # also after a failure: a rerun resumes after the complete examples
        if bar is not None:
            bar.close()
    if model is not None:
        seconds = time.time() - t0
    if rank > 0:  # rank 0 writes the index once every rank's shards are in
        return {}
    if world > 1:
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
        "computed_examples": computed,  # by this process (rank 0 of ``world_size``)
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

