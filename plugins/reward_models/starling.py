"""``starling``: Starling-RM-7B-alpha (berkeley-nest), a Llama-2-7b-chat backbone with a linear
value head ``v_head: hidden -> 1``; the reward is the head's value at the last token.

The published checkpoint is the state dict of the authors' ``GPTRewardModel`` wrapper, so its
keys carry ``transformer.`` and/or ``model.model.`` prefixes (the wrapper registers the backbone
twice) plus ``v_head.weight``. Here the head is a small ``nn.Module`` around the backbone, and the
weights are read from ``*.safetensors`` files only: nothing is unpickled. (The hub repository
ships pickled ``.bin`` files; convert them once on a machine you trust — see
docs/inference-mode.md.)

Input format, as on the model card: ``<s>[INST] {prompt} </s> [/INST] {response}</s>``,
tokenised with the tokenizer's own special tokens, i.e. exactly the ids the card's ``get_reward``
feeds the model (its BOS then appears twice; that is what the model was used with).
"""

from __future__ import annotations

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


def read_value_head_checkpoint(directory: Path, where_: str) -> tuple[dict[str, Any], Any]:
    """(backbone state dict with bare keys, v_head weight [1, H]) from ``directory/*.safetensors``."""
    from safetensors import safe_open

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in directory.glob("*.bin"))
        hint = (f"; it has {', '.join(pickled)} (pickled): convert them to safetensors once, on a trusted machine "
                "(docs/inference-mode.md)") if pickled else ""
        raise ModelError(f"no *.safetensors weights in {directory}{hint}", where=where_)
    backbone: dict[str, Any] = {}
    head = None
    for file in files:
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - a safetensors file handle, not a dict
                if key == "v_head.weight":
                    head = fh.get_tensor(key)
                    continue
                if key.startswith(_IGNORED_PREFIXES):
                    continue
                bare = next((key[len(pre):] for pre in _BACKBONE_PREFIXES if key.startswith(pre)), key)
                backbone.setdefault(bare, fh.get_tensor(key))  # the wrapper's two copies are the same tensor
    if head is None:
        raise ModelError(f"no v_head.weight in {directory}: not a value-head reward model checkpoint", where=where_)
    return backbone, head


class StarlingRM(RewardModel):
    name = "starling"

    class Params(RMParams):
        model: str = Field(description="local directory with the checkpoint's *.safetensors")
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
