"""``sequence_classifier``: any reward model that loads with ``AutoModelForSequenceClassification``
(FsfairX-LLaMA3-RM-v0.1, Skywork-Reward, ArmoRM's score head, ...).

The conversation is rendered with the model's own chat template (system, user, assistant turn
closed) and tokenised with BOS exactly once — FsfairX's card strips the BOS that the Llama-3
template writes because its pipeline adds one; ``profuser.chat.encode_chat`` gets the same ids
directly. The reward is the classification logit (``label_index``) that the model's head reads at
the last token; batches are right-padded, with a pad id chosen so that the head reads the same
token it reads without padding.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from profuser import hookimpl
from profuser.components import Judged, RewardModel
from profuser.errors import ModelError

from ._common import (
    RMParams,
    chat_ids,
    load_failure,
    pad_batch,
    pickled_only,
    resolve,
    runtime_of,
    score_batches,
    torch_dtype,
    where,
)


class SequenceClassifierRM(RewardModel):
    name = "sequence_classifier"
    aliases = ("seq_cls",)

    class Params(RMParams):
        trust_remote_code: bool = False
        chat_template: str | None = None  # jinja override of the tokenizer's template
        label_index: int = Field(default=0, ge=0, description="which logit is the reward when num_labels > 1")

    def __init__(self, params=None):
        super().__init__(params)
        self._loaded: tuple[Any, Any] | None = None

    def _load(self):
        if self._loaded is None:
            from transformers import AutoModelForSequenceClassification

            from profuser.models import load_tokenizer
            from profuser.recipe import ModelSpec

            p = self.params
            device = runtime_of(self).torch_device()
            path = resolve(p, self, trust_remote_code=p.trust_remote_code)
            tokenizer = load_tokenizer(ModelSpec(ref=str(path), trust_remote_code=p.trust_remote_code,
                                                 chat_template=p.chat_template))
            try:
                model = AutoModelForSequenceClassification.from_pretrained(
                    path, dtype=torch_dtype(p.dtype, device), trust_remote_code=p.trust_remote_code,
                    use_safetensors=not pickled_only(path, self), weights_only=True,  # .bin: tensors only
                ).to(device).eval()
            except Exception as exc:  # noqa: BLE001 - any loading failure names the reward model
                raise ModelError(f"cannot load it as a sequence classifier: {load_failure(exc)}",
                                 where=where(self)) from None
            if p.label_index >= model.config.num_labels:
                raise ModelError(f"label_index {p.label_index} but the head has {model.config.num_labels} labels",
                                 where=where(self))
            self._loaded = (model, tokenizer)
        return self._loaded

    def score(self, items: list[Judged]) -> list[float]:
        if not items:
            return []
        model, tokenizer = self._load()
        p = self.params
        encoded = [chat_ids(tokenizer, item, p.max_length)[0] for item in items]
        text_config = model.config.get_text_config()
        own_pad = text_config.pad_token_id

        def forward(batch: list[list[int]]):
            # The head reads the rightmost token that is not the pad id. Without a pad id of its
            # own, pad with one that ends no sequence, so it reads each one's true last token.
            pad = own_pad
            if pad is None:
                last = {seq[-1] for seq in batch}
                pad = next(t for t in [tokenizer.pad_token_id, tokenizer.eos_token_id, *range(len(tokenizer))]
                           if t is not None and t not in last)
                text_config.pad_token_id = pad
            ids, mask = pad_batch(batch, pad)
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits
            return logits[:, p.label_index]

        try:
            return score_batches(self, encoded, forward, batch_size=p.batch_size)
        finally:
            text_config.pad_token_id = own_pad


@hookimpl
def profuser_register_reward_models(register):
    register(SequenceClassifierRM)
