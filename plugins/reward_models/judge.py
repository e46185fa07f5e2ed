"""``judge``: a generative judge made of any instruct causal LM (LLM-as-a-judge, pointwise).

The judge reads a rubric prompt (``{instruction}``, ``{response}`` and optionally ``{system}``)
in its own chat template and is asked for a verdict; the score is the log-odds of "yes" at the
first answer token::

    score = log p(yes) - log p(no)        (each summed over the word's case/space variants)

which is higher for better responses and needs no sampling. Two judges with different rubrics
(correctness, helpfulness) make a vote with real disagreements and tie-breaks; that is what the
default recipe runs offline on SmolLM2-135M-Instruct.

Batches are left-padded with explicit position ids (so padding changes nothing) and the LM head
runs on the last position only (``logits_to_keep=1``): memory is one [B, V] row per batch.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from profuser import hookimpl
from profuser.components import Judged, RewardModel, StrictModel
from profuser.errors import ModelError

from ._common import encode_each, fill_template, pad_batch, prompt_ids, runtime_of, score_batches

DEFAULT_RUBRIC = (
    "Instruction: {instruction}\n"
    "Response: {response}\n"
    "Is the response helpful, correct and complete? Reply yes or no."
)


def word_variants(tokenizer, word: str) -> list[int]:
    """Ids of the first token of ``word`` as the judge may write it: any case, with or without a
    leading space (tokens that are only whitespace are skipped)."""
    ids: list[int] = []
    for form in dict.fromkeys([word, word.lower(), word.capitalize(), word.upper()]):
        for text in (form, " " + form):
            tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
            for tok in tokens:
                if tokenizer.decode([tok]).strip():
                    if tok not in ids:
                        ids.append(tok)
                    break
    return ids


class JudgeRM(RewardModel):
    name = "judge"
    aliases = ("llm_judge",)

    class Params(StrictModel):
        model: str = "builtin:smollm2-135m-instruct"
        revision: str | None = None
        dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
        trust_remote_code: bool = False
        chat_template: str | None = None
        rubric: str = DEFAULT_RUBRIC
        yes: str = "yes"
        no: str = "no"
        batch_size: int = Field(default=8, gt=0)
        max_length: int = Field(default=2048, gt=0)

        @field_validator("rubric")
        @classmethod
        def _placeholders(cls, value: str):
            missing = [p for p in ("{instruction}", "{response}") if p not in value]
            if missing:
                raise ValueError(f"the rubric must contain {' and '.join(missing)}")
            return value

    def __init__(self, params=None):
        super().__init__(params)
        self._loaded: tuple[Any, Any, list[int], list[int]] | None = None

    @property
    def _where(self) -> str:
        return f"reward model judge ({self.params.model})"

    def _load(self):
        if self._loaded is None:
            from profuser.models import load_model
            from profuser.recipe import ModelSpec

            p = self.params
            runtime = runtime_of(self)
            spec = ModelSpec(ref=p.model, revision=p.revision, dtype=p.dtype, trust_remote_code=p.trust_remote_code,
                             chat_template=p.chat_template)
            model, tokenizer = load_model(spec, device=runtime.torch_device(), cache_dir=runtime.cache_dir,
                                          engine=runtime.engine)
            yes, no = word_variants(tokenizer, p.yes), word_variants(tokenizer, p.no)
            if not yes or not no or set(yes) & set(no):
                raise ModelError(f"the verdict words {p.yes!r} and {p.no!r} need distinct first tokens in its "
                                 "vocabulary", where=self._where)
            self._loaded = (model, tokenizer, yes, no)
        return self._loaded

    def prompt_ids(self, tokenizer, item: Judged) -> list[int]:
        """The judge's prompt for one item, ending where its verdict starts. A prompt over
        ``max_length`` loses the end of the judged response (marked "…"), never the rubric."""
        from profuser.chat import format_prompt

        p = self.params
        response = item.response
        for _ in range(4):
            text = format_prompt(tokenizer, "", fill_template(p.rubric, Judged(item.system, item.instruction, response)))
            ids = prompt_ids(tokenizer, text)
            excess = len(ids) - p.max_length
            if excess <= 0:
                return ids
            kept = tokenizer(response, add_special_tokens=False)["input_ids"]
            if len(kept) <= 1:
                break
            response = tokenizer.decode(kept[: max(len(kept) - excess - 8, 0)]) + " …"
        raise ModelError(f"the rubric and instruction alone exceed max_length {p.max_length} tokens", where=self._where)

    def score(self, items: list[Judged]) -> list[float]:
        import torch

        if not items:
            return []
        model, tokenizer, yes, no = self._load()
        encoded = encode_each(self, items, lambda item: self.prompt_ids(tokenizer, item))
        yes_ids, no_ids = torch.tensor(yes), torch.tensor(no)

        def forward(batch: list[list[int]]):
            ids, mask = pad_batch(batch, tokenizer.pad_token_id, left=True)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as if unpadded
            out = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                        position_ids=positions.to(model.device), logits_to_keep=1)
            logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # [B, V]
            return (torch.logsumexp(logp[:, yes_ids.to(logp.device)], -1)
                    - torch.logsumexp(logp[:, no_ids.to(logp.device)], -1))

        return score_batches(self, encoded, forward, batch_size=self.params.batch_size)


@hookimpl
def profuser_register_reward_models(register):
    register(JudgeRM)
