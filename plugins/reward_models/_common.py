"""What the reward-model plugins share: params, device and dtype, conversation encoding, batching."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from profuser.components import Judged, StrictModel
from profuser.errors import DataError, ModelError, ProfuserError
from profuser.pipeline import runtime_of  # (also re-exported for the plugins)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

Dtype = Literal["auto", "float32", "bfloat16", "float16"]


class RMParams(StrictModel):
    model: str = Field(description="hub id, local directory or builtin:NAME")
    revision: str | None = None
    dtype: Dtype = "auto"  # auto: bfloat16 on a GPU with native bf16, else float32 (recipe.default_dtype)
    batch_size: int = Field(default=8, gt=0)
    max_length: int = Field(default=2048, gt=0, description="tokens per (prompt + response); longer ones are cut")




def torch_dtype(name: str, device: str) -> torch.dtype:
    import torch

    from profuser.recipe import default_dtype

    if name == "auto":  # the recipe's rule for a model without a dtype: emulated bf16 is not bf16
        cuda = device.startswith("cuda") and torch.cuda.is_available()
        return getattr(torch, default_dtype(device)) if cuda else torch.float32
    return getattr(torch, name)


def resolve(params: RMParams, component, *, trust_remote_code: bool = False):
    """A local directory for ``params.model`` (builtins, GGUF and hub snapshots resolved and cached
    by ``profuser.models``; a hub repository's pickled .bin weights only when it has no safetensors)."""
    from profuser.models import resolve_model
    from profuser.recipe import ModelSpec

    spec = ModelSpec(ref=params.model, revision=params.revision, trust_remote_code=trust_remote_code)
    runtime = runtime_of(component)
    return resolve_model(spec, cache_dir=runtime.cache_dir, engine=runtime.engine)


def pickled_only(path: str | Path, component) -> bool:
    """Whether the directory's weights are pickled ``pytorch_model*.bin`` files only (no safetensors):
    then the loader reads them with ``torch.load(weights_only=True)``, tensors only, as
    ``profuser.models`` does, and says so in one line."""
    from profuser.models.loading import pickled_weights

    pickled = pickled_weights(Path(path))
    if pickled:
        log.warning("%s ships pickled .bin weights: read with torch.load(weights_only=True), tensors only",
                    where(component))
    return pickled


def load_failure(exc: Exception) -> str:
    """One line for a loader's exception: torch's weights_only refusal (pages long) said plainly."""
    import pickle

    if isinstance(exc, pickle.UnpicklingError):
        return ("its pickled weights hold objects other than tensors (torch.load weights_only refused them; "
                "nothing was unpickled): convert them to safetensors on a machine you trust")
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def where(component) -> str:
    return f"reward model {component.name} ({component.params.model})"


def fill_template(template: str, item: Judged) -> str:
    """A plain-text prompt template with ``{system}``, ``{instruction}`` and ``{response}``
    (replaced literally: other braces in the template stay). A template without ``{system}``
    gets a non-empty system message folded in front of the instruction."""
    instruction = item.instruction
    if item.system and "{system}" not in template:
        instruction = f"{item.system}\n\n{instruction}"
    return template.replace("{system}", item.system).replace("{instruction}", instruction).replace("{response}", item.response)


def row_name(item: Judged, index: int) -> str:
    """How errors name an item: its example id when the stage gave one, else its position."""
    return f"row {item.id!r}" if item.id else f"item {index}"


def encode_each(component, items: list[Judged], encode: Callable[[Judged], list[int]]) -> list[list[int]]:
    """``encode(item)`` for every item; an error names the row it failed on (and its size), so a
    2 MB instruction can be found in the data."""
    encoded = []
    for i, item in enumerate(items):
        try:
            encoded.append(encode(item))
        except ProfuserError as exc:
            size = len(item.system) + len(item.instruction) + len(item.response)
            raise type(exc)(f"{row_name(item, i)} ({size} characters): {exc.message}", where=exc.where) from None
    return encoded


def chat_ids(tokenizer, item: Judged, max_length: int, chat_template: str | None = None) -> tuple[list[int], bool]:
    """The whole conversation (system, user, assistant turn closed) in the tokenizer's chat
    template, BOS once; cut to ``max_length`` keeping the start (as HF pipelines truncate).
    Returns (ids, truncated)."""
    from profuser.chat import encode_chat

    try:
        enc = encode_chat(tokenizer, item.system, item.instruction, item.response, max_length=max_length,
                          chat_template=chat_template)
        return enc.input_ids, enc.truncated > 0
    except DataError:  # the prompt alone is longer than max_length: score its start anyway
        enc = encode_chat(tokenizer, item.system, item.instruction, item.response, max_length=1 << 62,
                          chat_template=chat_template)
        return enc.input_ids[:max_length], True


def prompt_ids(tokenizer, text: str) -> list[int]:
    """A formatted prompt's ids with BOS once: kept if the template wrote it, else added the way
    the tokenizer normally does (``profuser.chat.format_prompt``'s rule)."""
    bos = tokenizer.bos_token
    return list(tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"])


def text_ids(tokenizer, text: str, max_length: int, *, add_special_tokens: bool = True) -> tuple[list[int], bool]:
    """A formatted text as ids, cut to ``max_length`` keeping the start. Returns (ids, truncated)."""
    ids = list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
    return ids[:max_length], len(ids) > max_length


def pad_batch(seqs: list[list[int]], pad_id: int, *, left: bool = False):
    """[B, T] input ids and attention mask, padded on the right (or left)."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        span = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[row, span] = torch.tensor(seq, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


def score_batches(component, encoded: list[list[int]], forward: Callable[[list[list[int]]], Any], *,
                  batch_size: int) -> list[float]:
    """Run ``forward`` (a batch of id lists -> [B] scores) over length-sorted batches and return the
    scores in input order. Non-finite scores are errors naming the reward model and item."""
    import torch
    from tqdm.auto import tqdm

    empty = [i for i, ids in enumerate(encoded) if not ids]
    if empty:
        raise DataError(f"item {empty[0]} encodes to no tokens", where=where(component))
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))
    scores: list[float] = [0.0] * len(encoded)
    bar = tqdm(total=len(encoded), desc=f"score {component.name}", unit="item", disable=not runtime_of(component).progress)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            values = forward([encoded[i] for i in batch]).float().reshape(-1).tolist()
            if len(values) != len(batch):
                raise ModelError(f"returned {len(values)} scores for a batch of {len(batch)}", where=where(component))
            for i, value in zip(batch, values):
                if not math.isfinite(value):
                    raise ModelError(f"non-finite score {value} for item {i}", where=where(component))
                scores[i] = value
            bar.update(len(batch))
    bar.close()
    return scores
