"""What the generation backends share: sampling params, prompt encoding, stop strings."""

from __future__ import annotations

from pydantic import Field, model_validator

from profuser.components import StrictModel
from profuser.pipeline import runtime_of  # noqa: F401  (re-exported for the plugins)


class SamplingParams(StrictModel):
    """Sampling settings shared by the generation backends."""

    max_new_tokens: int = Field(default=512, gt=0)
    min_new_tokens: int = Field(default=0, ge=0, description="EOS is suppressed before this many tokens")
    do_sample: bool = True  # False (or temperature 0): greedy
    temperature: float = Field(default=0.7, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0, description="0: no top-k filter")
    repetition_penalty: float = Field(default=1.0, gt=0)
    stop: list[str] = Field(default_factory=list, description="extra stop strings, cut from the response")

    @model_validator(mode="after")
    def _lengths(self):
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens {self.min_new_tokens} exceeds max_new_tokens {self.max_new_tokens}")
        return self

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


def cut_at_stop(text: str, stop: list[str]) -> str:
    """``text`` up to the earliest occurrence of any stop string."""
    ends = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return text[: min(ends)] if ends else text


def split_stops(tokenizer, stop: list[str]) -> tuple[list[int], list[str]]:
    """``stop`` as (token ids, strings): a stop string that is one special token (``<|im_end|>``
    of mpt-7b-8k-chat) never shows in text decoded without special tokens, so it can only end a
    response as a token id (vLLM's ``stop_token_ids``, transformers' ``eos_token_id``)."""
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    ids, strings = [], []
    for s in stop:
        encoded = tokenizer.encode(s, add_special_tokens=False) if s else []
        if len(encoded) == 1 and encoded[0] in special:
            ids.append(encoded[0])
        else:
            strings.append(s)
    return ids, strings


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a formatted prompt with BOS exactly once: the template may have written it
    already (Llama-3, Gemma chat), otherwise the tokenizer adds it as it normally does."""
    bos = tokenizer.bos_token
    add_special = not (bos and text.startswith(bos))
    return list(tokenizer(text, add_special_tokens=add_special)["input_ids"])


def context_limit(tokenizer) -> int | None:
    """The longest sequence the model takes (``load_tokenizer`` sets it from the recipe's
    ``max_length``, else the tokenizer's or the config's context length)."""
    limit = tokenizer.model_max_length
    return int(limit) if limit and limit < 10**20 else None


def model_label(spec) -> str:
    return f"model {spec.key} ({spec.ref})"


