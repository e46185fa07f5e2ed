"""``starling``: Starling-RM-7B-alpha (berkeley-nest), a Llama-2-7b-chat backbone with a linear
value head ``v_head: hidden -> 1``; the reward is the head's value at the last token.

The published checkpoint is the state dict of the authors' ``GPTRewardModel`` wrapper, so its
keys carry ``transformer.`` and/or ``model.model.`` prefixes (the wrapper registers the backbone
twice) plus ``v_head.weight``. Here the head is a small ``nn.Module`` around the backbone. The
weights are read from ``*.safetensors`` files, or, in a directory without any (the hub repository
ships a pickled ``.bin``), from its ``*.bin`` / ``*.pt`` files with ``torch.load(weights_only=True)``:
tensors only, no object is unpickled.

Input format, as on the model card: ``<s>[INST] {prompt} </s> [/INST] {response}</s>``,
tokenised with the tokenizer's own special tokens, i.e. exactly the ids the card's ``get_reward``
feeds the model (its BOS then appears twice; that is what the model was used with).
"""

from __future__ import annotations

import functools
import logging
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import Field

from profuser import hookimpl
from profuser.components import Judged, RewardModel
from profuser.errors import ModelError

from ._common import (
    RMParams,
    fill_template,
    pad_batch,
    runtime_of,
    score_batches,
    text_ids,
    torch_dtype,
    where,
)

log = logging.getLogger(__name__)

STARLING_TEMPLATE = "<s>[INST] {instruction} </s> [/INST] {response}</s>"

# prefixes the GPTRewardModel wrapper gives its backbone, longest first
_BACKBONE_PREFIXES = ("model.model.", "transformer.", "model.")
_IGNORED_PREFIXES = ("model.lm_head.", "lm_head.")  # the wrapper's unused language-model head


def _value_head_module():
    import torch
    from torch import nn

    class ValueHeadRM(nn.Module):
        """backbone hidden states [B, T, H] -> v_head -> [B, T]; the reward at the last real token."""

        def __init__(self, backbone: nn.Module, hidden_size: int):
            super().__init__()
            self.transformer = backbone
            self.v_head = nn.Linear(hidden_size, 1, bias=False)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            values = self.v_head(hidden).squeeze(-1)  # [B, T]
            last = attention_mask.sum(-1) - 1  # right padding: the last real token
            return values[torch.arange(values.shape[0], device=values.device), last]

    return ValueHeadRM


# pickled files that hold no weights (a Trainer's arguments)
_NOT_WEIGHTS = frozenset({"training_args.bin"})


def _tensors(directory: Path, where_: str) -> Iterator[tuple[str, Callable[[], Any]]]:
    """(key, a reader of its tensor) of every weight in the directory: its ``*.safetensors`` files,
    else its pickled ``*.bin`` / ``*.pt`` files read with ``torch.load(weights_only=True)``."""
    from safetensors import safe_open

    files = sorted(directory.glob("*.safetensors"))
    for file in files:
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - a safetensors file handle, not a dict
                yield key, functools.partial(fh.get_tensor, key)
    if files:
        return
    pickled = sorted(p for p in [*directory.glob("*.bin"), *directory.glob("*.pt")] if p.name not in _NOT_WEIGHTS)
    if not pickled:
        raise ModelError(f"no weights in {directory} (*.safetensors, or pickled *.bin / *.pt)", where=where_)
    import torch

    log.warning("%s ships pickled weights (%s): read with torch.load(weights_only=True), tensors only",
                where_, ", ".join(p.name for p in pickled))
    for file in pickled:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:  # weights_only refused it: nothing of it ran
            raise ModelError(f"cannot read {file.name} as tensors only (torch.load weights_only): not a torch file, "
                             "or it holds other objects, which are never unpickled; convert it to safetensors on a "
                             "machine you trust", where=where_) from None
        except Exception as exc:  # noqa: BLE001 - not a torch file at all
            raise ModelError(f"cannot read {file.name}: {type(exc).__name__}: {exc}", where=where_) from None
        if not isinstance(state, dict):
            raise ModelError(f"{file.name} holds a {type(state).__name__}, not a state dict", where=where_)
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                yield key, (lambda v=value: v)


def read_value_head_checkpoint(directory: Path, where_: str) -> tuple[dict[str, Any], Any]:
    """(backbone state dict with bare keys, v_head weight [1, H]) from the directory's weights
    (``_tensors``: safetensors, else pickled files read as tensors only)."""
    backbone: dict[str, Any] = {}
    head = None
    for key, tensor in _tensors(directory, where_):
        if key == "v_head.weight":
            head = tensor()
            continue
        if key.startswith(_IGNORED_PREFIXES):
            continue
        bare = next((key[len(pre):] for pre in _BACKBONE_PREFIXES if key.startswith(pre)), key)
        if bare not in backbone:  # the wrapper's two copies are the same tensor
            backbone[bare] = tensor()
    if head is None:
        raise ModelError(f"no v_head.weight in {directory}: not a value-head reward model checkpoint", where=where_)
    return backbone, head


class StarlingRM(RewardModel):
    name = "starling"

    class Params(RMParams):
        model: str = Field(description="local directory with the checkpoint's weights (*.safetensors, or its pickled "
                                       "*.bin read as tensors only)")
        # config and tokenizer of the backbone: the checkpoint directory when it has them
        backbone: str = "meta-llama/Llama-2-7b-chat-hf"
        template: str = STARLING_TEMPLATE

    def __init__(self, params=None):
        super().__init__(params)
        self._loaded: tuple[Any, Any] | None = None

    def _load(self):
        if self._loaded is not None:
            return self._loaded
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        from profuser.models import resolve_model
        from profuser.recipe import ModelSpec

        p = self.params
        runtime = runtime_of(self)
        device = runtime.torch_device()
        directory = Path(p.model).expanduser()
        if not directory.is_dir():
            raise ModelError(f"checkpoint directory not found: {directory}", where=where(self))
        state, head = read_value_head_checkpoint(directory, where(self))
        source = directory if (directory / "config.json").is_file() else resolve_model(
            ModelSpec(ref=p.backbone, revision=p.revision), cache_dir=runtime.cache_dir, engine=runtime.engine)
        config = AutoConfig.from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
        # the card pads with UNK and reads the value before the first pad
        if tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        elif tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        dtype = torch_dtype(p.dtype, device)
        backbone_cls = AutoModel._model_mapping[type(config)]  # e.g. LlamaModel
        try:
            backbone, info = backbone_cls.from_pretrained(None, config=config, state_dict=state, dtype=dtype,
                                                          output_loading_info=True)
        except Exception as exc:  # noqa: BLE001
            raise ModelError(f"cannot build the {backbone_cls.__name__} backbone: {type(exc).__name__}: {exc}",
                             where=where(self)) from None
        if info["missing_keys"]:
            raise ModelError(f"the checkpoint lacks backbone weights, e.g. {sorted(info['missing_keys'])[:3]}",
                             where=where(self))
        model = _value_head_module()(backbone, config.hidden_size)
        if tuple(head.shape) != (1, config.hidden_size):
            raise ModelError(f"v_head.weight has shape {tuple(head.shape)}, expected (1, {config.hidden_size})",
                             where=where(self))
        model.v_head.weight.data.copy_(head)
        self._loaded = (model.to(device=device, dtype=dtype).eval(), tokenizer)
        return self._loaded

    def score(self, items: list[Judged]) -> list[float]:
        if not items:
            return []
        model, tokenizer = self._load()
        p = self.params
        encoded = [text_ids(tokenizer, fill_template(p.template, item), p.max_length)[0] for item in items]
        device = next(model.parameters()).device

        def forward(batch: list[list[int]]):
            ids, mask = pad_batch(batch, tokenizer.pad_token_id)
            return model(ids.to(device), mask.to(device))

        return score_batches(self, encoded, forward, batch_size=p.batch_size)


@hookimpl
def profuser_register_reward_models(register):
    register(StarlingRM)
