"""Chat formatting and response masks on both tiny tokenizer families."""

from __future__ import annotations

import functools
import string

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from profuser.chat import FALLBACK_CHAT_TEMPLATE, encode_chat, format_prompt, prompt_ids, template_for
from profuser.errors import DataError, ModelError
from profuser.testing import CHATML_TEMPLATE, tiny_tokenizer

SYSTEM = "You are a helpful assistant."
INSTRUCTION = "What is the capital of France?"
RESPONSE = "The capital of France is Paris. 🙂"


@functools.cache
def tok(arch: str):
    return tiny_tokenizer(arch)


def check_invariants(tokenizer, enc, response: str, max_length: int = 10_000):
    n = len(enc.input_ids) - enc.response_start
    assert enc.response_offsets.shape == (n, 2) and enc.response_offsets.dtype == np.int32
    assert len(enc.input_ids) <= max_length
    starts, ends = enc.response_offsets[:, 0], enc.response_offsets[:, 1]
    assert np.all((0 <= starts) & (starts <= ends) & (ends <= len(response)))
    assert np.all(np.diff(starts) >= 0) and np.all(np.diff(ends) >= 0)
    assert enc.labels[: enc.response_start] == [-100] * enc.response_start
    assert enc.labels[enc.response_start:] == enc.input_ids[enc.response_start:]


@pytest.mark.parametrize("system", ["", SYSTEM])
def test_llama_chatml(system):
    t = tok("llama")
    prompt = format_prompt(t, system, INSTRUCTION)
    expected_sys = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    assert prompt == f"{expected_sys}<|im_start|>user\n{INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n"

    enc = encode_chat(t, system, INSTRUCTION, RESPONSE, max_length=512)
    check_invariants(t, enc, RESPONSE)
    # the prompt tokens are exactly the generation prompt's tokens (ChatML ends with "\n")
    assert enc.input_ids[: enc.response_start] == t(prompt, add_special_tokens=False)["input_ids"]
    assert t.decode(enc.input_ids[enc.response_start:]) == RESPONSE + "<|im_end|>\n"
    assert enc.input_ids[0] != enc.input_ids[1] or enc.input_ids[0] != t.bos_token_id  # BOS not doubled
    # <|im_end|> and the newline after it are learned and lie after the response text
    tail = enc.response_offsets[-2:].tolist()
    assert tail == [[len(RESPONSE), len(RESPONSE)]] * 2
    assert enc.input_ids[-2] == t.convert_tokens_to_ids("<|im_end|>")
    assert enc.response_offsets[0, 0] == 0 and enc.response_offsets[-3, 1] == len(RESPONSE)
    assert enc.truncated == 0


@pytest.mark.parametrize("system", ["", SYSTEM])
def test_gemma_fallback_template(system):
    t = tok("gemma")
    assert t.chat_template is None and template_for(t) == FALLBACK_CHAT_TEMPLATE
    prompt = format_prompt(t, system, INSTRUCTION)
    expected_sys = f"{system}\n\n" if system else ""
    assert prompt == f"{expected_sys}### Instruction:\n{INSTRUCTION}\n\n### Response:\n"

    enc = encode_chat(t, system, INSTRUCTION, RESPONSE, max_length=512)
    check_invariants(t, enc, RESPONSE)
    # exactly one <bos>, first; the response ends with <eos> (the fallback's end of turn)
    assert enc.input_ids[0] == t.bos_token_id and enc.input_ids.count(t.bos_token_id) == 1
    assert enc.input_ids[-1] == t.eos_token_id
    assert enc.response_offsets[-1].tolist() == [len(RESPONSE), len(RESPONSE)]
    assert enc.input_ids[: enc.response_start] == t(prompt)["input_ids"]  # as generation would see it
    # the emoji falls back to 4 byte tokens, all spanning the one character
    emoji = len(RESPONSE) - 1
    assert [tuple(s) for s in enc.response_offsets.tolist()].count((emoji, emoji + 1)) == 4


def test_template_override_applies_to_base_model():
    t = tok("gemma")
    enc = encode_chat(t, SYSTEM, INSTRUCTION, RESPONSE, max_length=512, chat_template=CHATML_TEMPLATE)
    assert format_prompt(t, SYSTEM, INSTRUCTION, chat_template=CHATML_TEMPLATE).startswith("<|im_start|>system\n")
    check_invariants(t, enc, RESPONSE)
    assert enc.input_ids.count(t.bos_token_id) == 1  # template writes no BOS: the tokenizer's one is added


def test_template_writing_bos_is_not_doubled():
    t = tok("gemma")
    template = "{{ bos_token }}" + FALLBACK_CHAT_TEMPLATE
    enc = encode_chat(t, "", INSTRUCTION, RESPONSE, max_length=512, chat_template=template)
    assert enc.input_ids[0] == t.bos_token_id and enc.input_ids.count(t.bos_token_id) == 1


def test_system_role_rejected_is_folded_into_user_turn():
    template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    t = tok("llama")
    prompt = format_prompt(t, SYSTEM, INSTRUCTION, chat_template=template)
    assert prompt == f"<|im_start|>user\n{SYSTEM}\n\n{INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n"
    check_invariants(t, encode_chat(t, SYSTEM, INSTRUCTION, RESPONSE, max_length=512, chat_template=template), RESPONSE)


def test_trimming_template_offsets_point_into_the_untrimmed_response():
    template = CHATML_TEMPLATE.replace("message['content']", "(message['content'] | trim)")
    t = tok("llama")
    response = "  Paris.  "
    enc = encode_chat(t, "", INSTRUCTION, response, max_length=512, chat_template=template)
    check_invariants(t, enc, response)
    assert enc.response_offsets[0, 0] == 2  # "Paris" starts after the two trimmed spaces
    assert t.decode(enc.input_ids[enc.response_start:]).startswith("Paris.<|im_end|>")


def test_merge_across_the_boundary_puts_the_token_in_the_response():
    # the generation prompt ends mid-word ("Answ") and the response completes it ("er: ..."), so
    # BPE merges across the boundary: that token predicts response text and must be a label
    template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] + ' ' }}"
        "{% else %}{{ 'Answ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'Answ' }}{% endif %}"
    )
    t = tok("gemma")
    response = "er: Paris"
    enc = encode_chat(t, "", INSTRUCTION, response, max_length=512, chat_template=template)
    check_invariants(t, enc, response)
    tokens = t.convert_ids_to_tokens(enc.input_ids)
    assert tokens[enc.response_start] == "▁Answer"  # " Answ" + "er" is one token
    assert tokens[enc.response_start - 1] == "?"
    assert enc.response_offsets[0].tolist() == [0, 2]  # it carries the response's "er"


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_truncation_cuts_the_response_from_the_end(arch):
    t = tok(arch)
    full = encode_chat(t, SYSTEM, INSTRUCTION, RESPONSE, max_length=4096)
    limit = full.response_start + 3
    cut = encode_chat(t, SYSTEM, INSTRUCTION, RESPONSE, max_length=limit)
    assert cut.input_ids == full.input_ids[:limit]
    assert cut.response_start == full.response_start
    assert cut.truncated == len(full.input_ids) - limit
    np.testing.assert_array_equal(cut.response_offsets, full.response_offsets[:3])
    check_invariants(t, cut, RESPONSE, max_length=limit)


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_prompt_longer_than_max_length_is_a_data_error(arch):
    t = tok(arch)
    full = encode_chat(t, SYSTEM, INSTRUCTION, RESPONSE, max_length=4096)
    with pytest.raises(DataError, match="no room for the response"):
        encode_chat(t, SYSTEM, INSTRUCTION, RESPONSE, max_length=full.response_start)


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_empty_response_learns_only_the_end_of_turn(arch):
    t = tok(arch)
    enc = encode_chat(t, "", INSTRUCTION, "", max_length=512)
    check_invariants(t, enc, "")
    assert len(enc.input_ids) > enc.response_start
    assert enc.input_ids[enc.response_start:][0] == t.eos_token_id


def test_template_that_drops_the_response_is_a_model_error():
    t = tok("llama")
    template = "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}{% endif %}{% endfor %}"
    with pytest.raises(ModelError, match="drops the assistant message"):
        encode_chat(t, "", INSTRUCTION, RESPONSE, max_length=512, chat_template=template)


@settings(max_examples=40, deadline=None)
@given(
    arch=st.sampled_from(["llama", "gemma"]),
    response=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=40),
)
def test_response_offsets_tile_the_response(arch, response):
    t = tok(arch)
    enc = encode_chat(t, "", "Say something.", response, max_length=512)
    check_invariants(t, enc, response)
    # offsets of the response tokens cover every response character, in order, without gaps
    covered = np.zeros(len(response), bool)
    for a, b in enc.response_offsets.tolist():
        covered[a:b] = True
    assert covered.all()
    # and the response tokens decode back to the response (then the end of turn)
    text = t.decode(enc.input_ids[enc.response_start:])
    assert text.startswith(response)


@pytest.mark.parametrize("arch", ["llama", "gemma"])
@pytest.mark.parametrize("template", [None, CHATML_TEMPLATE, "{{ bos_token }}" + FALLBACK_CHAT_TEMPLATE])
def test_prompt_ids_are_the_prompt_of_the_conversation(arch, template):
    t = tok(arch)
    ids = prompt_ids(t, SYSTEM, INSTRUCTION, chat_template=template)
    enc = encode_chat(t, SYSTEM, INSTRUCTION, RESPONSE, max_length=512, chat_template=template)
    assert ids == enc.input_ids[: enc.response_start]
    assert ids[0] == t.bos_token_id  # written by the template or added by the tokenizer, either way first
    if arch == "gemma":  # (llama's BOS is <|im_start|>: once per turn)
        assert ids.count(t.bos_token_id) == 1


# --- the paper's models: pinned chat formats, tested with tokenizers built to match -------------

def _sentencepiece_llama():
    """Like vicuna-7b-v1.5 / Llama-2-7b-chat: <unk>=0, <s>=1, </s>=2, ``▁`` metaspace with a
    prefix space on the first word, BOS added by the tokenizer, EOS not."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from profuser.testing import CORPUS

    specials = ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    alphabet = sorted(set("".join(CORPUS) + string.ascii_letters + string.digits + "<>[]/_:'") - {" "}) + ["▁"]
    tok.train_from_iterator(CORPUS * 10, trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                                             initial_alphabet=alphabet, show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _gpt_neox_chatml():
    """Like mpt-7b-8k-chat (GPT-NeoX BPE): <|endoftext|> is BOS, EOS and UNK (id 0); <|im_start|>
    and <|im_end|> are added tokens; no BOS is added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from profuser.testing import CORPUS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(CORPUS * 10, trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")
    fast.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    return fast


PAPER_Q, PAPER_A, PAPER_SYS = "What is the capital of France?", "The capital of France is Paris.", "Answer briefly."


@pytest.mark.parametrize("system", ["", PAPER_SYS])
def test_vicuna_v11_format(system):
    from profuser.chat import CHAT_FORMATS, VICUNA_SYSTEM

    t = _sentencepiece_llama()
    shown = system or VICUNA_SYSTEM  # FastChat's default system prompt when the row has none
    assert format_prompt(t, system, PAPER_Q, chat_template="vicuna_v1.1") == f"{shown} USER: {PAPER_Q} ASSISTANT:"
    enc = encode_chat(t, system, PAPER_Q, PAPER_A, max_length=512, chat_template="vicuna_v1.1")
    check_invariants(t, enc, PAPER_A)
    assert enc.input_ids.count(t.bos_token_id) == 1 and enc.input_ids[0] == t.bos_token_id
    assert enc.input_ids[-1] == t.eos_token_id  # the answer ends with </s>, which is learned
    assert t.decode(enc.input_ids, skip_special_tokens=False) == f"<s> {shown} USER: {PAPER_Q} ASSISTANT: {PAPER_A}</s>"
    assert t.decode(enc.input_ids[enc.response_start:]).strip() == PAPER_A + "</s>"
    assert CHAT_FORMATS["vicuna_v1.1"].stop == ("</s>",)


@pytest.mark.parametrize("system", ["", PAPER_SYS])
def test_llama2_chat_format(system):
    t = _sentencepiece_llama()
    sys_block = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if system else ""
    assert format_prompt(t, system, PAPER_Q, chat_template="llama2_chat") == f"<s>[INST] {sys_block}{PAPER_Q} [/INST]"
    enc = encode_chat(t, system, PAPER_Q, PAPER_A, max_length=512, chat_template="llama2_chat")
    check_invariants(t, enc, PAPER_A)
    assert enc.input_ids.count(t.bos_token_id) == 1 and enc.input_ids[0] == t.bos_token_id  # the template's <s>, not doubled
    assert enc.input_ids[-1] == t.eos_token_id
    assert prompt_ids(t, system, PAPER_Q, chat_template="llama2_chat").count(t.bos_token_id) == 1
    sys_text = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if system else ""
    assert t.decode(enc.input_ids[1:]).lstrip() == f"[INST] {sys_text}{PAPER_Q} [/INST] {PAPER_A} </s>"
    assert t.decode(enc.input_ids[enc.response_start:], skip_special_tokens=True).strip() == PAPER_A


@pytest.mark.parametrize("system", ["", PAPER_SYS])
def test_mpt_chatml_format(system):
    from profuser.chat import CHAT_FORMATS, MPT_SYSTEM

    t = _gpt_neox_chatml()
    shown = system or MPT_SYSTEM
    prompt = format_prompt(t, system, PAPER_Q, chat_template="mpt_chatml")
    assert prompt == f"<|im_start|>system\n{shown}\n<|im_start|>user\n{PAPER_Q}<|im_end|>\n<|im_start|>assistant\n"
    enc = encode_chat(t, system, PAPER_Q, PAPER_A, max_length=512, chat_template="mpt_chatml")
    check_invariants(t, enc, PAPER_A)
    im_end = t.convert_tokens_to_ids("<|im_end|>")
    # <|im_end|> ends the turn and is learned; <|endoftext|> (the EOS) is not written after it
    assert enc.input_ids[-1] == im_end and t.eos_token_id not in enc.input_ids
    assert enc.input_ids[: enc.response_start] == prompt_ids(t, system, PAPER_Q, chat_template="mpt_chatml")
    assert t.decode(enc.input_ids[enc.response_start:]) == PAPER_A + "<|im_end|>"
    assert CHAT_FORMATS["mpt_chatml"].stop[0] == "<|im_end|>"


def test_named_formats_resolve_and_unknown_names_fail(tmp_path):
    from profuser.chat import CHAT_FORMATS, resolve_chat_template
    from profuser.models.loading import _read_chat_template

    for name, fmt in CHAT_FORMATS.items():
        assert resolve_chat_template(name) == fmt.template == _read_chat_template(name, "ref")
    jinja = tmp_path / "t.jinja"
    jinja.write_text(CHATML_TEMPLATE)
    assert resolve_chat_template(str(jinja)) == CHATML_TEMPLATE  # a file, as the model spec allows
    with pytest.raises(ModelError, match="named format"):
        resolve_chat_template("vicuna_v1.0")


def test_eurus_scoring_template_renders_the_card_input():
    from profuser_plugins.reward_models._common import fill_template, text_ids

    from profuser.chat import SCORING_TEMPLATES
    from profuser.components import Judged

    t = _sentencepiece_llama()
    item = Judged(system="", instruction=PAPER_Q, response=PAPER_A)
    text = fill_template(SCORING_TEMPLATES["eurus_rm"], item)
    assert text == f"[INST] {PAPER_Q} [/INST] {PAPER_A}"
    ids, _ = text_ids(t, text, 2048)
    assert ids[0] == t.bos_token_id and ids.count(t.bos_token_id) == 1  # the card tokenises with BOS
