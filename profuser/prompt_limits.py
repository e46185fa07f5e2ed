"""Prompts longer than a model's context, counted against its real limit (issue 24).

A prompt is measured as the model sees it: chat-formatted with the model's template (the whole
conversation for a multi-turn row) and tokenised with its own tokenizer, BOS once
(``profuser.chat.prompt_ids``). The limit is the smaller of the model's maximum positions
(``max_position_embeddings`` of its config, which a tokenizer's ``model_max_length`` may overstate)
and the tokenizer's limit as ``load_tokenizer`` sets it (the recipe's ``max_length`` when given).

``profuser validate`` refuses a recipe whose cached training prompts exceed a local model's
limit; the ``generate`` stage counts them in its stats and says so in one line of the run log.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NO_LIMIT = 10**20  # transformers' sentinel (int(1e30)) for a tokenizer without a known limit


def max_positions(path: Path) -> int | None:
    """``max_position_embeddings`` of a model folder's config.json (its text config's for a
    multimodal one; GPT-2's ``n_positions`` alike), None where the folder has no config saying it."""
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for block in (config.get("text_config"), config) if isinstance(config, dict) else ():
        if isinstance(block, dict):
            for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
                value = block.get(name)
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    return value
    return None


@dataclass
class Limit:
    tokens: int
    what: str  # what sets it: "max_position_embeddings" or "model_max_length"


def context_limit(tokenizer: Any, positions: int | None, *, max_length: int | None = None) -> Limit | None:
    """The longest prompt the model takes: its positions, or the tokenizer's limit if smaller (the
    recipe's ``max_length``, which ``load_tokenizer`` made it, when given); None when neither is known."""
    limits = []
    if positions:
        limits.append(Limit(int(positions), "max_position_embeddings"))
    own = getattr(tokenizer, "model_max_length", None)
    if own and own < NO_LIMIT:
        limits.append(Limit(int(own), "the recipe's max_length" if max_length == own else "model_max_length"))
    return min(limits, key=lambda limit: limit.tokens) if limits else None


@dataclass
class Overlong:
    """Prompts (of ``total``) longer than ``limit`` tokens: how many, the longest, a few ids."""

    model: str
    limit: Limit
    total: int
    count: int = 0
    longest: int = 0
    ids: list[str] = field(default_factory=list)

    def line(self) -> str:
        shown = ", ".join(self.ids[:3]) + (", ..." if self.count > 3 else "")
        return (f"{self.count} of {self.total} prompts are longer than model {self.model}'s {self.limit.tokens:,} tokens "
                f"({self.limit.what}; longest {self.longest:,} tokens, chat-formatted; ids {shown})")

    def stats(self) -> dict[str, int]:
        return {"overlong_prompts": self.count, "context_limit": self.limit.tokens, "longest_prompt_tokens": self.longest}


def count_overlong(tokenizer: Any, prompts: list, limit: Limit, *, model: str, chat_template: str | None = None) -> Overlong:
    """``prompts`` (``profuser.components.Prompt``) longer than ``limit``, each measured as the
    model sees it."""
    from .chat import prompt_ids

    found = Overlong(model, limit, len(prompts))
    for prompt in prompts:
        n = len(prompt_ids(tokenizer, prompt.system, prompt.instruction, chat_template=chat_template,
                           history=prompt.history))
        found.longest = max(found.longest, n)
        if n > limit.tokens:
            found.count += 1
            found.ids.append(prompt.id)
    return found


def overlong_prompts(tokenizer: Any, spec: Any, prompts: list) -> Overlong | None:
    """``count_overlong`` for a loaded tokenizer of ``spec`` (a ``ModelSpec``), against the limit of
    the folder it was loaded from; None when no limit is known."""
    limit = context_limit(tokenizer, max_positions(Path(tokenizer.name_or_path)), max_length=spec.max_length)
    if limit is None:
        return None
    return count_overlong(tokenizer, prompts, limit, model=spec.key, chat_template=spec.chat_template)
