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
    "CHAT_FORMATS", "FALLBACK_CHAT_TEMPLATE", "SCORING_TEMPLATES", "ChatEncoding", "ChatFormat", "conversation_history",
    "encode_chat", "format_prompt", "labelled_text", "messages", "prompt_ids", "resolve_chat_template", "response_of",
    "template_for",
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
    ``response_start``: index of the first token of the last assistant turn (the response);
    ``positions`` [n] int64: the labelled token indices, ascending (None: ``response_start``..L-1,
    a single-turn conversation or one whose earlier assistant turns are context only);
    ``response_offsets`` [n, 2] int32: character span of each labelled token in the labelled
    text (``labelled_text``: the ``response`` string of a single-turn conversation); tokens
    after a turn's text (end-of-turn, EOS) get the span ``(end, end)`` of that turn's end;
    ``truncated``: tokens cut from the end.
    """

    input_ids: list[int]
    response_start: int
    response_offsets: np.ndarray
    truncated: int = 0
    positions: np.ndarray | None = None

    @property
    def label_positions(self) -> np.ndarray:
        """[n] int64: the labelled token indices."""
        if self.positions is None:
            return np.arange(self.response_start, len(self.input_ids), dtype=np.int64)
        return self.positions

    @property
    def label_ids(self) -> list[int]:
        """The labelled tokens, in order (what the teacher rows are for)."""
        if self.positions is None:
            return self.input_ids[self.response_start:]
        return [self.input_ids[i] for i in self.positions]

    @property
    def labels(self) -> list[int]:
        """``input_ids`` with -100 on every token not labelled (the trainer shifts)."""
        from .artifacts import IGNORE_INDEX

        if self.positions is None:
            return [IGNORE_INDEX] * self.response_start + self.input_ids[self.response_start:]
        labels = [IGNORE_INDEX] * len(self.input_ids)
        for i in self.positions:
            labels[i] = self.input_ids[i]
        return labels


# --- whole conversations ----------------------------------------------------------------------------
#
# A record keeps its last assistant turn as ``response`` and the user turn before it as
# ``instruction``; the turns before that user turn (users' and assistants') are ``meta["history"]``,
# ``[{"role", "content"}]``. An assistant turn there is labelled (trained on, teacher-forced,
# scored) unless it carries ``"train": false`` (``data.turns: last`` marks them so).

TURN_SEPARATOR = "\n"  # between turns in the labelled text: keeps one turn's end apart from the next's start


def conversation_history(meta) -> list[dict]:
    """The earlier turns of a record (its ``meta``, a dict or the JSON text the data stage
    writes): a list of ``{role, content[, train]}`` dicts, or [] when there is none. A ``history``
    field of another shape (a user's own column) is not a conversation and is left alone."""
    if isinstance(meta, str):
        import json

        try:
            meta = json.loads(meta) if meta.strip() else {}
        except json.JSONDecodeError:
            return []
    history = meta.get("history") if isinstance(meta, dict) else None
    if not isinstance(history, list) or not history:
        return []
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
               for m in history):
        return []
    return history


def _trained(history: list[dict] | None) -> list[int]:
    """Indices (in ``history``) of the earlier assistant turns that are labelled."""
    return [i for i, m in enumerate(history or ()) if m["role"] == "assistant" and m.get("train", True) is not False]


def labelled_text(response: str, history: list[dict] | None = None) -> str:
    """The text the labelled tokens' offsets index: the labelled assistant turns' contents in
    order, joined by ``TURN_SEPARATOR``; just ``response`` when only the last turn is labelled.
    Every tokenizer's offsets of one conversation index the same text, which is what the
    aligners compare."""
    earlier = [history[i]["content"] for i in _trained(history)]
    return TURN_SEPARATOR.join([*earlier, response])


def response_of(text: str, history: list[dict] | None = None) -> str:
    """The last assistant turn in ``labelled_text(response, history)``."""
    earlier = [history[i]["content"] for i in _trained(history)]
    if not earlier:
        return text
    prefix = TURN_SEPARATOR.join(earlier) + TURN_SEPARATOR
    if not text.startswith(prefix):
        raise DataError("the stored labelled text does not start with the conversation's earlier assistant turns",
                        where="chat")
    return text[len(prefix):]


def template_for(tokenizer, chat_template: str | None = None) -> str:
    """The jinja template used for ``tokenizer``: the override (a named format, jinja text or a
    file), its own, else the fallback."""
    return resolve_chat_template(chat_template) or getattr(tokenizer, "chat_template", None) or FALLBACK_CHAT_TEMPLATE


def messages(system: str, instruction: str, response: str | None = None, *, fold_system: bool = False,
             history: list[dict] | None = None) -> list[dict]:
    """The conversation as chat messages (no system message when ``system`` is empty): the
    ``history`` turns (``conversation_history``'s form) come before the last user turn.
    ``fold_system`` opens the first user turn with the system text instead."""
    turns = [*(history or ()), {"role": "user", "content": instruction}]
    if response is not None:
        turns.append({"role": "assistant", "content": response})
    return _with_system(system, turns, fold_system)


def _with_system(system: str, turns: list[dict], fold: bool) -> list[dict]:
    turns = [{"role": m["role"], "content": m["content"]} for m in turns]  # no extra keys (train) to the template
    if system and fold:
        first = next((m for m in turns if m["role"] == "user"), None)
        if first is not None:
            first["content"] = f"{system}\n\n{first['content']}"
            return turns
    return ([{"role": "system", "content": system}] if system else []) + turns


def _render_turns(tokenizer, template: str, system: str, turns: list[dict], generation_prompt: bool) -> str:
    def apply(fold: bool) -> str:
        text = tokenizer.apply_chat_template(_with_system(system, turns, fold), chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)
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


def _render(tokenizer, template: str, system: str, instruction: str, response: str | None,
            history: list[dict] | None = None) -> str:
    turns = [*(history or ()), {"role": "user", "content": instruction}]
    if response is not None:
        turns.append({"role": "assistant", "content": response})
    return _render_turns(tokenizer, template, system, turns, response is None)


def _name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def format_prompt(tokenizer, system: str, instruction: str, *, chat_template: str | None = None,
                  history: list[dict] | None = None) -> str:
    """The prompt text up to where the model starts answering (generation prompt included): the
    whole conversation (``history``) continued at its last user turn.

    BOS is not in the text unless the template writes it: ``prompt_ids`` tokenises it with the
    BOS token exactly once."""
    return _render(tokenizer, template_for(tokenizer, chat_template), system, instruction, None, history)


def _with_bos(tokenizer, text: str, ids: list[int]) -> bool:
    """Whether ``ids`` (``text`` tokenised without special tokens) need the BOS token in front:
    the tokenizer normally adds one and the template did not write it."""
    bos = tokenizer.bos_token
    return bool(bos) and not text.startswith(bos) and _adds_bos(tokenizer)


def prompt_ids(tokenizer, system: str, instruction: str, *, chat_template: str | None = None,
               history: list[dict] | None = None) -> list[int]:
    """``format_prompt``'s text as token ids, BOS exactly once: what generation feeds the model.
    For templates whose generation prompt is a prefix of the conversation (ChatML, the fallback)
    these are ``encode_chat(...).input_ids[:response_start]``."""
    text = format_prompt(tokenizer, system, instruction, chat_template=chat_template, history=history)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return [tokenizer.bos_token_id, *ids] if _with_bos(tokenizer, text, ids) else ids


def _shown(text: str, at: int, content: str, following: str) -> tuple[int, int] | None:
    """``(shown length, lead)`` of the form of ``content`` the template wrote at ``text[at:]``
    (templates that trim it: Llama-3, Gemma), followed by ``following``; None when no form is there."""
    n_lead = len(content) - len(content.lstrip())
    for shown, lead in ((content, 0), (content.strip(), n_lead), (content.lstrip(), n_lead), (content.rstrip(), 0)):
        if text.startswith(shown, at) and text.startswith(following, at + len(shown)):
            return len(shown), lead
    return None


def _response_span(tokenizer, template: str, system: str, instruction: str, response: str,
                   history: list[dict] | None = None) -> tuple[str, int, int, int]:
    """The full conversation text and where the response sits in it: ``(text, start, end, lead)``
    where ``text[start:end] == response[lead:lead + end - start]`` (``lead`` > 0 when the
    template strips leading whitespace)."""
    marked = _render(tokenizer, template, system, instruction, _SENTINEL, history)
    at = marked.find(_SENTINEL)
    if at < 0:
        raise ModelError("the chat template drops the assistant message", where=_name(tokenizer))
    before, after = marked[:at], marked[at + len(_SENTINEL):]
    text = _render(tokenizer, template, system, instruction, response, history)
    # templates that trim the content (Llama-3, Gemma): find which form of the response is there
    found = _shown(text, len(before), response, after) if text.startswith(before) else None
    if found is None or len(before) + found[0] + len(after) != len(text):
        raise ModelError("the chat template changes the response text; cannot locate response tokens", where=_name(tokenizer))
    return text, len(before), len(before) + found[0], found[1]


def _turn_spans(tokenizer, template: str, system: str, instruction: str, response: str,
                history: list[dict]) -> tuple[str, list[tuple[int, int, int, int]]]:
    """The full conversation text and, for each labelled assistant turn in order (the response
    last), ``(start, end, lead, stop)``: its content is ``text[start:end]`` (less ``lead``
    trimmed characters, as ``_response_span``) and its end of turn runs to ``stop`` (the
    response's: to the end of the text). The end of an earlier turn is what the template writes
    after it when it ends the conversation (``<|im_end|>\n``, EOS) and writes there too."""
    trained = _trained(history)
    marks = [f"\x00PROFUSER_TURN_{j}\x00" for j in range(len(trained))] + [_SENTINEL]
    marked_history = [dict(m) for m in history]
    for j, i in enumerate(trained):
        marked_history[i]["content"] = marks[j]
    marked = _render(tokenizer, template, system, instruction, _SENTINEL, marked_history)
    cuts, pos = [], 0
    hint = " (data.turns: last keeps earlier turns as context only)"
    for j, mark in enumerate(marks):
        at = marked.find(mark, pos)
        if at < 0:
            which = "an earlier assistant message" + hint if j < len(trained) else "the assistant message"
            raise ModelError(f"the chat template drops {which}", where=_name(tokenizer))
        cuts.append((pos, at))
        pos = at + len(mark)
    fixed = [marked[a:b] for a, b in cuts] + [marked[pos:]]  # the template's text around the turns
    text = _render(tokenizer, template, system, instruction, response, history)
    contents = [history[i]["content"] for i in trained] + [response]
    spans, at = [], 0
    for j, content in enumerate(contents):
        found = _shown(text, at + len(fixed[j]), content, fixed[j + 1]) if text.startswith(fixed[j], at) else None
        if found is None:
            which = "an earlier assistant turn's text; cannot locate its tokens" + hint if j < len(trained) else \
                "the response text; cannot locate response tokens"
            raise ModelError(f"the chat template changes {which}", where=_name(tokenizer))
        start = at + len(fixed[j])
        end = start + found[0]
        spans.append([start, end, found[1], len(text)])
        at = end
    if at + len(fixed[-1]) != len(text):
        raise ModelError("the chat template changes the response text; cannot locate response tokens", where=_name(tokenizer))
    for j, i in enumerate(trained):  # how much of the text after an earlier turn is its end of turn
        upto = [*marked_history[: i + 1]]
        try:
            closing = _render_turns(tokenizer, template, system, upto, False)
        except ModelError:  # a template that wants a user turn last: the turn's text alone is labelled
            closing = ""
        tail = closing[closing.find(marks[j]) + len(marks[j]):] if marks[j] in closing else ""
        between = fixed[j + 1]
        n = 0
        while n < min(len(tail), len(between)) and tail[n] == between[n]:
            n += 1
        spans[j][3] = spans[j][1] + n
    return text, [tuple(span) for span in spans]


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def encode_chat(
    tokenizer, system: str, instruction: str, response: str, *, max_length: int, chat_template: str | None = None,
    history: list[dict] | None = None,
) -> ChatEncoding:
    """Tokenise prompt + response + end-of-turn as the model sees it in a chat, and locate the
    response tokens. Needs a fast tokenizer (offsets). ``history``: the earlier turns
    (``conversation_history``); their labelled assistant turns are labelled too, each with its
    end of turn (``positions``, offsets into ``labelled_text``).

    Truncation cuts tokens from the end (the response, then nothing else); a prompt that leaves
    no room for a single response token raises ``DataError``. BOS is added once: by the template
    if it writes it, else as the tokenizer's own encoding would."""
    if max_length <= 0:
        raise ValueError("max_length must be positive")
    template = template_for(tokenizer, chat_template)
    earlier = _trained(history)
    if earlier:
        text, spans = _turn_spans(tokenizer, template, system, instruction, response, history)
        start, end, lead, _ = spans[-1]
    else:  # the single-turn path, unchanged: earlier turns (if any) are context only
        text, start, end, lead = _response_span(tokenizer, template, system, instruction, response, history)
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
    spans_resp = offsets[response_start:]
    rel = np.clip(spans_resp, start, end) - start + lead
    rel[spans_resp[:, 0] >= end] = len(response)  # end-of-turn and anything after the response text
    truncated = max(0, len(ids) - max_length)
    if response_start >= max_length:
        raise DataError(
            f"the prompt is {response_start} tokens; max_length {max_length} leaves no room for the response",
            where=_name(tokenizer),
        )
    if not earlier:
        ids = ids[:max_length]
        rel = rel[: len(ids) - response_start]
        return ChatEncoding(ids, response_start, rel.astype(np.int32), truncated)

    # earlier labelled turns: the tokens that cover a character of the turn or of its end of turn
    # (zero-width ones inside its end of turn too), offsets into the labelled text
    positions, relative, base, last = [], [], 0, -1
    nonzero = offsets[:, 1] > offsets[:, 0]
    for (t_start, t_end, t_lead, t_stop), i in zip(spans[:-1], earlier):
        content = history[i]["content"]
        inside = np.where(nonzero, (offsets[:, 1] > t_start) & (offsets[:, 0] < t_stop),
                          (offsets[:, 0] >= t_end) & (offsets[:, 0] < t_stop))
        idx = np.flatnonzero(inside[:response_start])
        idx = idx[idx > last]  # a token across two turns' boundary counts once, for the first
        last = int(idx[-1]) if len(idx) else last
        turn_rel = np.clip(offsets[idx], t_start, t_end) - t_start + t_lead
        turn_rel[offsets[idx, 0] >= t_end] = len(content)
        positions.append(idx)
        relative.append(turn_rel + base)
        base += len(content) + len(TURN_SEPARATOR)
    positions.append(np.arange(response_start, len(ids), dtype=np.int64))
    relative.append(rel + base)
    pos = np.concatenate(positions).astype(np.int64)
    offs = np.concatenate(relative).reshape(-1, 2)
    keep = pos < max_length
    return ChatEncoding(ids[:max_length], response_start, offs[keep].astype(np.int32), truncated, pos[keep])


def target_max_length(tokenizer, max_length: int) -> int:
    """The recipe's max length, capped by the target's context (align and build must agree)."""
    limit = getattr(tokenizer, "model_max_length", None) or max_length
    return min(max_length, int(limit))
