"""``hf``: generation with transformers' ``model.generate``.

Prompts are formatted with the model's chat template (``profuser.chat.format_prompt``: the
recipe's override, the tokenizer's own, or the fallback for base models), sorted by length and
batched with LEFT padding (so every sequence's answer starts at the same column and ``generate``
derives positions from the attention mask), then put back in input order. One sample per prompt,
as in the paper; ``n`` > 1 gives n samples per prompt (a list of n per prompt), sample j drawn
with its own seed (sample 0 with ``seed`` itself, so it is what ``n: 1`` gives; sample j > 0 with
a seed derived from (``seed``, j)). A run is repeatable: the RNG is seeded inside a forked RNG
state (the caller's random streams are left alone), and batches always run in the same order.

A response ends at the model's EOS / end-of-turn token(s) (its generation config), at
``max_new_tokens``, or at the first of the ``stop`` strings (which is cut off).
"""

from __future__ import annotations

import time
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


class HFGenerator(Generator):
    name = "hf"
    aliases = ("transformers",)

    class Params(SamplingParams):
        batch_size: int = Field(default=16, gt=0)
        n: int = Field(default=1, ge=1, description="samples per prompt (each seeded on its own; sample 0 is n: 1's)")

    def __init__(self, params=None):
        super().__init__(params)
        self._loaded: tuple[str, Any, Any] | None = None  # (key, model, tokenizer): reused across shards
        self.last_stats: dict[str, Any] = {}

    def _load(self, spec):
        from profuser.models import load_model
        from profuser.store import stable_hash

        runtime = runtime_of(self)
        device = runtime.torch_device()
        key = stable_hash([spec.identity(), device])
        if self._loaded is None or self._loaded[0] != key:
            self._loaded = None  # free the previous model before loading the next
            model, tokenizer = load_model(spec, device=device, cache_dir=runtime.cache_dir, engine=runtime.engine)
            model.eval()
            self._loaded = (key, model, tokenizer)
        return self._loaded[1], self._loaded[2]

    def _generation_config(self, model, tokenizer):
        import copy

        p = self.params
        config = copy.deepcopy(model.generation_config)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _first(config.eos_token_id)
        sampling = {} if p.greedy else {"temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k}
        # greedy: clear sampling knobs the checkpoint may set, so transformers does not warn
        cleared = {"temperature": None, "top_p": None, "top_k": None} if p.greedy else {}
        stop_ids, stop_strings = split_stops(tokenizer, p.stop)
        config.update(**{**cleared, **sampling}, do_sample=not p.greedy, max_new_tokens=p.max_new_tokens,
                      min_new_tokens=p.min_new_tokens or None,
                      repetition_penalty=p.repetition_penalty, num_return_sequences=1, pad_token_id=pad,
                      max_length=None, stop_strings=stop_strings or None)
        if not _as_list(config.eos_token_id) and tokenizer.eos_token_id is not None:
            config.eos_token_id = tokenizer.eos_token_id
        if stop_ids:  # special-token stops end a response like an EOS (and are dropped from the text as one)
            eos = _as_list(config.eos_token_id)
            config.eos_token_id = eos + [i for i in stop_ids if i not in eos]
        return config

    def generate(self, model: Any, prompts: list[Prompt], *, seed: int) -> list[str] | list[list[str]]:
        import torch
        from tqdm.auto import tqdm

        from profuser.chat import format_prompt
        from profuser.models import as_spec

        spec = as_spec(model)
        if not prompts:
            return []
        lm, tokenizer = self._load(spec)
        p = self.params
        runtime = runtime_of(self)
        config = self._generation_config(lm, tokenizer)
        eos_ids = set(_as_list(config.eos_token_id))
        if config.pad_token_id is None:
            raise ModelError("has neither a pad nor an EOS token to pad batches with", where=model_label(spec))

        encoded = [encode_prompt(tokenizer, format_prompt(tokenizer, q.system, q.instruction, chat_template=spec.chat_template,
                                                                 history=q.history))
                   for q in prompts]
        limit = context_limit(tokenizer)
        truncated = 0
        if limit is not None:
            room = limit - p.max_new_tokens
            if room <= 0:
                raise ModelError(f"max_new_tokens {p.max_new_tokens} leaves no room for a prompt in {limit} positions",
                                 where=model_label(spec))
            for i, ids in enumerate(encoded):
                if len(ids) > room:  # keep the end: the question's end and the assistant turn opener
                    encoded[i] = ids[-room:]
                    truncated += 1

        # longest first: similar lengths share a batch (little padding), and an out-of-memory
        # batch shows up at the start rather than hours in
        order = sorted(range(len(prompts)), key=lambda i: (-len(encoded[i]), i))
        samples: list[list[str]] = [[] for _ in prompts]
        new_tokens = 0
        device = lm.device
        started = time.perf_counter()
        bar = tqdm(total=len(prompts) * p.n, desc=f"generate {spec.key}", unit="prompt", disable=not runtime.progress)
        cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
        for j in range(p.n):
            results: list[str | None] = [None] * len(prompts)
            with torch.random.fork_rng(devices=cuda), torch.inference_mode():
                torch.manual_seed(seed if j == 0 else sample_seed(seed, j))
                for start in range(0, len(order), p.batch_size):
                    batch = order[start:start + p.batch_size]
                    width = max(len(encoded[i]) for i in batch)
                    input_ids = torch.full((len(batch), width), config.pad_token_id, dtype=torch.long)
                    mask = torch.zeros((len(batch), width), dtype=torch.long)
                    for row, i in enumerate(batch):  # left padding
                        input_ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
                        mask[row, width - len(encoded[i]):] = 1
                    try:
                        out = lm.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                          generation_config=config, tokenizer=tokenizer if config.stop_strings else None)
                    except RuntimeError as exc:
                        if "probability tensor contains" not in str(exc):
                            raise
                        raise _non_finite(spec, [prompts[i].id for i in batch], spec.dtype) from None
                    for row, i in enumerate(batch):
                        ids = out[row, width:].tolist()
                        end = next((k for k, t in enumerate(ids) if t in eos_ids), len(ids))
                        new_tokens += min(end + 1, len(ids))  # the EOS was generated too
                        text = tokenizer.decode(ids[:end], skip_special_tokens=True)
                        results[i] = cut_at_stop(text, p.stop)
                    bar.update(len(batch))
            for i, text in enumerate(results):
                samples[i].append(text)
        bar.close()
        self.last_stats = {"prompts": len(prompts), "new_tokens": new_tokens, "seconds": time.perf_counter() - started,
                           "truncated_prompts": truncated, "samples": p.n}
        return [s[0] for s in samples] if p.n == 1 else samples


def sample_seed(seed: int, sample: int) -> int:
    """The seed of sample ``sample`` > 0 of a prompt (sample 0 uses ``seed``)."""
    import hashlib

    digest = hashlib.sha256(f"{seed}:sample:{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _non_finite(spec, ids: list[str], dtype: str) -> ModelError:
    """torch.multinomial's "probability tensor contains either inf, nan or element < 0": the model
    produced NaN/inf logits for one of these prompts."""
    shown = ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
    return ModelError(f"the model's logits are not finite (NaN/inf) while sampling for example(s) {shown}; its "
                      f"weights are broken or overflow in {dtype} (try dtype: float32, or do_sample: false)",
                      where=model_label(spec))


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _first(value) -> int | None:
    values = _as_list(value)
    return values[0] if values else None


@hookimpl
def profuser_register_generators(register):
    register(HFGenerator)
