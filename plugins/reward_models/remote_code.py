"""``remote_code``: reward models whose architecture lives in their repository's Python files
(Eurus-RM-7b: a Mistral backbone with a ``regression_head``, loaded with ``AutoModel`` and
``trust_remote_code``). Running that code is opt-in per reward model: ``trust_remote_code: true``
in its params, else the recipe is rejected before anything is downloaded or run.

The model is called with right-padded ``input_ids`` and ``attention_mask``. Its output may be a
tensor or a model output with ``rewards`` / ``scores`` / ``logits``; one value per sequence
([B] or [B, 1]) is the reward, one per token ([B, T]) is read at the last real token.

Input: ``template`` (plain text with ``{system}``, ``{instruction}``, ``{response}``; Eurus:
``[INST] {instruction} [/INST] {response}``) tokenised with the tokenizer's special tokens, as the
model cards do; or, without a template, the tokenizer's chat template.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import model_validator

from profuser import hookimpl
from profuser.components import Judged, RewardModel
from profuser.errors import ModelError

from ._common import (
    RMParams,
    chat_ids,
    fill_template,
    load_failure,
    pad_batch,
    pickled_only,
    resolve,
    runtime_of,
    score_batches,
    text_ids,
    torch_dtype,
    where,
)


class RemoteCodeRM(RewardModel):
    name = "remote_code"

    class Params(RMParams):
        trust_remote_code: bool = False
        auto_class: Literal["AutoModel", "AutoModelForSequenceClassification"] = "AutoModel"
        template: str | None = None  # None: the tokenizer's chat template
        label_index: int = 0  # which value when the output has several per sequence

        @model_validator(mode="after")
        def _opted_in(self):
            if not self.trust_remote_code:
                raise ValueError(f"{self.model} runs Python code from its repository; set "
                                 "trust_remote_code: true in this reward model's params to allow it")
            return self

    def __init__(self, params=None):
        super().__init__(params)
        self._loaded: tuple[Any, Any] | None = None

    def _load(self):
        if self._loaded is None:
            import transformers

            p = self.params
            device = runtime_of(self).torch_device()
            path = resolve(p, self, trust_remote_code=True)
            try:
                tokenizer = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=True)
                auto = getattr(transformers, p.auto_class)
                model = auto.from_pretrained(path, dtype=torch_dtype(p.dtype, device), trust_remote_code=True,
                                             use_safetensors=not pickled_only(path, self),
                                             weights_only=True).to(device).eval()  # .bin: tensors only
            except Exception as exc:  # noqa: BLE001 - remote code can fail in any way; name the model
                raise ModelError(f"cannot load it: {load_failure(exc)}", where=where(self)) from None
            if tokenizer.pad_token_id is None:
                tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
            self._loaded = (model, tokenizer)
        return self._loaded

    def _rewards(self, output, mask):
        import torch

        if not isinstance(output, torch.Tensor):
            found = next((getattr(output, k, None) for k in ("rewards", "scores", "logits")
                          if getattr(output, k, None) is not None), None)
            if found is None and isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
                found = output[0]
            if found is None:
                raise ModelError(f"cannot find rewards in its output ({type(output).__name__})", where=where(self))
            output = found
        batch, width = mask.shape
        if output.dim() == 3 and output.shape[:2] == (batch, width):  # [B, T, labels]
            output = output[..., self.params.label_index]
        if output.dim() == 2 and output.shape == (batch, width) and width > 1:  # one value per token
            return output[torch.arange(batch, device=output.device), mask.sum(-1) - 1]
        if output.dim() == 2 and output.shape[0] == batch:  # [B, labels]
            return output[:, self.params.label_index]
        if output.dim() == 1 and output.shape[0] == batch:
            return output
        raise ModelError(f"output of shape {tuple(output.shape)} is not one reward per sequence", where=where(self))

    def score(self, items: list[Judged]) -> list[float]:
        if not items:
            return []
        model, tokenizer = self._load()
        p = self.params
        if p.template is None:
            encoded = [chat_ids(tokenizer, item, p.max_length)[0] for item in items]
        else:
            encoded = [text_ids(tokenizer, fill_template(p.template, item), p.max_length)[0] for item in items]
        device = next(model.parameters()).device

        def forward(batch: list[list[int]]):
            ids, mask = pad_batch(batch, tokenizer.pad_token_id)
            mask = mask.to(device)
            return self._rewards(model(input_ids=ids.to(device), attention_mask=mask), mask)

        return score_batches(self, encoded, forward, batch_size=p.batch_size)


@hookimpl
def profuser_register_reward_models(register):
    register(RemoteCodeRM)
