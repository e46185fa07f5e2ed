"""Chat formatting: prompts for generation, and token-level response masks for training.

Every model sees a conversation through its own chat template (the tokenizer's, or the recipe's
``chat_template`` override). Base models without one (Gemma-3-270M) get ``FALLBACK_CHAT_TEMPLATE``,
an Alpaca-style layout that ends the response with the EOS token, so a fused model learns to stop::

    {system}\\n\\n### Instruction:\\n{instruction}\\n\\n### Response:\\n{response}{eos}

(the system paragraph only when there is a system message). Templates that reject a ``system``
role get the system text folded into the user turn (``system\\n\\ninstruction``).

Response tokens are located by character offsets (fast tokenizers' offset mapping) in the one
tokenisation of the whole conversation, so a BPE merge across the prompt/response boundary cannot
shift the mask: the first response token is the first token that covers a response character.

Named formats (``CHAT_FORMATS``) pin the paper's models' conversation layouts, each checked against
the model's published template: a recipe writes ``chat_template: vicuna_v1.1`` (or
``llama2_chat``, ``mpt_chatml``) instead of jinja text. ``SCORING_TEMPLATES`` holds reward-model
input layouts (plain text with ``{instruction}``, ``{response}``) for the ``remote_code`` reward model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from jinja2 import TemplateError

from .errors import DataError, ModelError

__all__ = [
    "CHAT_FORMATS", "FALLBACK_CHAT_TEMPLATE", "SCORING_TEMPLATES", "ChatEncoding", "ChatFormat", "encode_chat",
    "format_prompt", "messages", "prompt_ids", "resolve_chat_template", "template_for",
]

FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '### Response:\n' + message['content'] + eos_token }}"
    "{% if not loop.last %}{{ '\n\n' }}{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)



@dataclass(frozen=True)
class ChatFormat:
    """A model family's conversation layout: the jinja ``template``, the ``stop`` strings that end
    an answer in generated text (the generator's EOS ids stop it too), and where it was checked."""

    template: str
    stop: tuple[str, ...]
    source: str


VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
MPT_SYSTEM = "A conversation between a user and an LLM-based AI assistant. The assistant gives helpful and honest answers."

CHAT_FORMATS: dict[str, ChatFormat] = {
    # FastChat's vicuna_v1.1 (ADD_COLON_TWO, sep " ", sep2 "</s>"): "{system} USER: {q} ASSISTANT: {a}</s>";
    # the generation prompt ends at "ASSISTANT:" and the answer starts with a space. The tokenizer
    # adds BOS (vicuna-7b-v1.5's tokenizer_config ships no chat template).
    "vicuna_v1.1": ChatFormat(
        template=(
            "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
            "{% set turns = messages[1:] %}{% else %}{% set system = '" + VICUNA_SYSTEM.replace("'", "\\'") + "' %}"
            "{% set turns = messages %}{% endif %}"
            "{{ system + ' ' }}"
            "{% for message in turns %}"
            "{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}"
            "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' + message['content'] + eos_token }}"
            "{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
        ),
        stop=("</s>",),
        source="lm-sys/FastChat conversation.py vicuna_v1.1; docs/weights_version.md (separator </s>)",
    ),
    # meta-llama/Llama-2-7b-chat-hf tokenizer_config.json chat_template, verbatim (BOS per user turn,
    # <<SYS>> folded into the first user turn, content stripped, " </s>" after each answer).
    "llama2_chat": ChatFormat(
        template=(
            "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
            "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
            "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
            "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
            "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
            "{% if loop.index0 == 0 and system_message != false %}"
            "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
            "{% else %}{% set content = message['content'] %}{% endif %}"
            "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
            "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
            "{% endfor %}"
        ),
        stop=("</s>",),
        source="meta-llama/Llama-2-7b-chat-hf tokenizer_config.json chat_template",
    ),
    # mosaicml/mpt-7b-8k-chat tokenizer_config.json chat_template (llm-foundry's ChatML: the system
    # line has no <|im_end|>, turns are joined by "\n"). <|im_end|> (id 50278) ends a turn; the EOS
    # is <|endoftext|> (id 0), and the generation config stops at both.
    "mpt_chatml": ChatFormat(
        template=(
            "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
            "{% set system_message = messages[0]['content'] %}{% elif not 'system' in messages[0]['role'] %}"
            "{% set loop_messages = messages %}{% set system_message = '" + MPT_SYSTEM + "' %}"
            "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
            "{% for message in loop_messages %}{% if loop.index0 == 0 %}"
            "{% if system_message != false %}{{ '<|im_start|>system\\n' + system_message.strip() + '\\n'}}{% endif %}"
            "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' }}"
            "{% else %}{{ '\\n' + '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' }}"
            "{% endif %}{% if (add_generation_prompt == true and loop.last) %}"
            "{{ '\\n' + '<|im_start|>' + 'assistant' + '\\n' }}{% endif %}{% endfor %}"
        ),
        stop=("<|im_end|>", "<|endoftext|>"),
        source="mosaicml/mpt-7b-8k-chat tokenizer_config.json chat_template (PR #7); generation_config eos [0, 50278]",
    ),
}

# Reward-model inputs for the remote_code reward model's ``template`` param.
SCORING_TEMPLATES: dict[str, str] = {
    # openbmb/Eurus-RM-7b model card: "[INST] {instruction} [/INST] {response}", tokenised with BOS
    "eurus_rm": "[INST] {instruction} [/INST] {response}",
}


def resolve_chat_template(value: str | None, *, base: Path | None = None) -> str | None:
    """A recipe's ``chat_template``: a ``CHAT_FORMATS`` name, jinja text (holds ``{{`` or ``{%``),
    or a path to a file holding it (relative to ``base`` when given)."""
    if value is None or value in CHAT_FORMATS:
        return CHAT_FORMATS[value].template if value else None
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if base is not None and not path.is_absolute() and (base / path).is_file():
        path = base / path
    if not path.is_file():
        raise ModelError(f"chat_template is neither a named format ({', '.join(CHAT_FORMATS)}) "
                         f"nor jinja text nor an existing file: {value}", where="chat_template")
    return path.read_text(encoding="utf-8")


# raise_exception() in a template raises jinja2's TemplateError; bad templates raise the others
_TEMPLATE_ERRORS = (TemplateError, ValueError, TypeError, KeyError, IndexError)

# Stands in for the response to find where the template puts it (the template may trim it).
_SENTINEL = "\x00PROFUSER_RESPONSE\x00"


@dataclass
class ChatEncoding:
    """One conversation in one tokenizer.

    ``input_ids`` [L]: prompt + response + end-of-turn tokens, at most ``max_length``;
    ``response_start``: index of the first response token (labels are ``input_ids[response_start:]``);
    ``response_offsets`` [L - response_start, 2] int32: character span of each of those tokens in
    the ``response`` string; tokens after the response text (end-of-turn, EOS) get
    ``(len(response), len(response))``; ``truncated``: tokens cut from the end.
    """

    input_ids: list[int]
    response_start: int
    response_offsets: np.ndarray
    truncated: int = 0

    @property
    def labels(self) -> list[int]:
        """``input_ids`` with -100 on prompt tokens (the trainer shifts)."""
        from .artifacts import IGNORE_INDEX

        return [IGNORE_INDEX] * self.response_start + self.input_ids[self.response_start:]


def template_for(tokenizer, chat_template: str | None = None) -> str:
    """The jinja template used for ``tokenizer``: the override (a named format, jinja text or a
    file), its own, else the fallback."""
    return resolve_chat_template(chat_template) or getattr(tokenizer, "chat_template", None) or FALLBACK_CHAT_TEMPLATE


def messages(system: str, instruction: str, response: str | None = None, *, fold_system: bool = False) -> list[dict]:
    """The conversation as chat messages (no system message when ``system`` is empty)."""
    if system and fold_system:
        turns = [{"role": "user", "content": f"{system}\n\n{instruction}"}]
    else:
        turns = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": instruction}]
    if response is not None:
        turns.append({"role": "assistant", "content": response})
    return turns


def _render(tokenizer, template: str, system: str, instruction: str, response: str | None) -> str:
    def apply(fold: bool) -> str:
        text = tokenizer.apply_chat_template(
            messages(system, instruction, response, fold_system=fold), chat_template=template, tokenize=False,
            add_generation_prompt=response is None,
        )
        return text if isinstance(text, str) else text[0]

    try:
        return apply(False)
    except _TEMPLATE_ERRORS as exc:  # jinja raise_exception(...) from templates without a system role
        if not system:
            raise ModelError(f"chat template failed: {exc}", where=_name(tokenizer)) from None
        try:
            return apply(True)
        except _TEMPLATE_ERRORS as exc2:
            raise ModelError(f"chat template failed: {exc2}", where=_name(tokenizer)) from None


def _name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def format_prompt(tokenizer, system: str, instruction: str, *, chat_template: str | None = None) -> str:
    """The prompt text up to where the model starts answering (generation prompt included).

    BOS is not in the text unless the template writes it: ``prompt_ids`` tokenises it with the
    BOS token exactly once."""
    return _render(tokenizer, template_for(tokenizer, chat_template), system, instruction, None)


def _with_bos(tokenizer, text: str, ids: list[int]) -> bool:
    """Whether ``ids`` (``text`` tokenised without special tokens) need the BOS token in front:
    the tokenizer normally adds one and the template did not write it."""
    bos = tokenizer.bos_token
    return bool(bos) and not text.startswith(bos) and _adds_bos(tokenizer)


def prompt_ids(tokenizer, system: str, instruction: str, *, chat_template: str | None = None) -> list[int]:
    """``format_prompt``'s text as token ids, BOS exactly once: what generation feeds the model.
    For templates whose generation prompt is a prefix of the conversation (ChatML, the fallback)
    these are ``encode_chat(...).input_ids[:response_start]``."""
    text = format_prompt(tokenizer, system, instruction, chat_template=chat_template)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return [tokenizer.bos_token_id, *ids] if _with_bos(tokenizer, text, ids) else ids


def _response_span(tokenizer, template: str, system: str, instruction: str, response: str) -> tuple[str, int, int, int]:
    """The full conversation text and where the response sits in it: ``(text, start, end, lead)``
    where ``text[start:end] == response[lead:lead + end - start]`` (``lead`` > 0 when the
    template strips leading whitespace)."""
    marked = _render(tokenizer, template, system, instruction, _SENTINEL)
    at = marked.find(_SENTINEL)
    if at < 0:
        raise ModelError("the chat template drops the assistant message", where=_name(tokenizer))
    before, after = marked[:at], marked[at + len(_SENTINEL):]
    text = _render(tokenizer, template, system, instruction, response)
    # templates that trim the content (Llama-3, Gemma): find which form of the response is there
    n_lead = len(response) - len(response.lstrip())
    for shown, lead in ((response, 0), (response.strip(), n_lead), (response.lstrip(), n_lead), (response.rstrip(), 0)):
        if text == before + shown + after:
            return text, len(before), len(before) + len(shown), lead
    raise ModelError("the chat template changes the response text; cannot locate response tokens", where=_name(tokenizer))


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def encode_chat(
    tokenizer, system: str, instruction: str, response: str, *, max_length: int, chat_template: str | None = None
) -> ChatEncoding:
    """Tokenise prompt + response + end-of-turn as the model sees it in a chat, and locate the
    response tokens. Needs a fast tokenizer (offsets).

    Truncation cuts tokens from the end (the response, then nothing else); a prompt that leaves
    no room for a single response token raises ``DataError``. BOS is added once: by the template
    if it writes it, else as the tokenizer's own encoding would."""
    if max_length <= 0:
        raise ValueError("max_length must be positive")
    template = template_for(tokenizer, chat_template)
    text, start, end, lead = _response_span(tokenizer, template, system, instruction, response)
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise ModelError("needs a fast tokenizer (character offsets) to locate response tokens", where=_name(tokenizer)) from None
    ids: list[int] = list(enc["input_ids"])
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)  # [n, 2] chars in `text`
    if _with_bos(tokenizer, text, ids):
        ids = [tokenizer.bos_token_id, *ids]
        offsets = np.concatenate([np.zeros((1, 2), np.int64), offsets])

    # the first token that covers a response character starts the response: a BPE merge across
    # the boundary puts that token in the response (it predicts response text); zero-width
    # tokens at or after the response end (inserted specials) belong to the response too
    covers = (offsets[:, 1] > start) & (offsets[:, 1] > offsets[:, 0])
    after = offsets[:, 0] >= end
    hits = np.flatnonzero(covers | after)
    response_start = int(hits[0]) if len(hits) else len(ids)
    if response_start == len(ids) and response:
        raise ModelError("the tokenizer's offsets cover no response character", where=_name(tokenizer))

    # [n_resp, 2] spans in `response`: clipped to the response, shifted by what the template trimmed
    spans = offsets[response_start:]
    rel = np.clip(spans, start, end) - start + lead
    rel[spans[:, 0] >= end] = len(response)  # end-of-turn and anything after the response text
    truncated = max(0, len(ids) - max_length)
    if response_start >= max_length:
        raise DataError(
            f"the prompt is {response_start} tokens; max_length {max_length} leaves no room for the response",
            where=_name(tokenizer),
        )
    ids = ids[:max_length]
    rel = rel[: len(ids) - response_start]
    return ChatEncoding(ids, response_start, rel.astype(np.int32), truncated)


def target_max_length(tokenizer, max_length: int) -> int:
    """The recipe's max length, capped by the target's context (align and build must agree)."""
    limit = getattr(tokenizer, "model_max_length", None) or max_length
    return min(max_length, int(limit))
