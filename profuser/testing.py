"""Tiny random heterogeneous models for tests: two architectures, two tokenizer families, and
``tiny_recipe``, a whole recipe on them that a plugin's end-to-end test runs in seconds.

``tiny_model_dir("llama", root)`` mimics SmolLM2 (Llama, byte-level BPE, ChatML template, no BOS
added); ``tiny_model_dir("gemma", root)`` mimics Gemma-3 base (Gemma3 text model, SentencePiece-
style BPE with ``▁`` and byte fallback, ``<bos>`` added, no chat template). Tokenizers are trained
here with the ``tokenizers`` library on a built-in corpus, so nothing is downloaded; everything is
seeded, so two calls write identical directories.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Literal

__all__ = ["CHATML_TEMPLATE", "CORPUS", "TINY_RECIPE", "tiny_gguf_file", "tiny_model_dir", "tiny_recipe", "tiny_tokenizer"]

# SmolLM2-Instruct's template, minus its default system prompt (tests want to see exactly what
# they pass in): a system turn only when one is given.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Small, varied text: prose, code, numbers, punctuation, a little non-ASCII (rare enough that the
# gemma tokenizer's limited alphabet leaves some of it to byte fallback).
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Large language models are trained on large amounts of text to predict the next token.",
    "Knowledge fusion combines the strengths of several models into a single target model.",
    "A tokenizer splits text into tokens; different models use different vocabularies.",
    "Please write a short poem about the sea, the wind and the stars at night.",
    "Question: What is the capital of France? Answer: The capital of France is Paris.",
    "Instruction: Summarise the following paragraph in one sentence.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)",
    "The answer is 42. Prices rose by 3.5% in 2023, from $10.00 to $10.35.",
    "You are a helpful assistant. Answer the user's question honestly and concisely.",
    "Hello! How can I help you today? I would like to learn about machine learning.",
    "Gradient descent updates the weights in the direction that lowers the loss.",
    "Cats and dogs are popular pets; many people keep fish, birds or rabbits too.",
    "Café au lait, naïve résumé, jalapeño — über straße.",
    "東京 is the capital of Japan; 北京 is the capital of China.",
    "Emoji are text too: 🙂 🚀 ✨.",
    "First, preheat the oven. Second, mix the flour, sugar and eggs. Third, bake for 30 minutes.",
    "The mitochondria is the powerhouse of the cell.",
    "Translate to French: Good morning, how are you? -> Bonjour, comment allez-vous ?",
    "### Instruction:\nExplain recursion.\n\n### Response:\nRecursion is when a function calls itself.",
    "system: You are a helpful assistant. user: Hi! assistant: Hello, what can I do for you?",
]


def _corpus(repeat: int = 20) -> list[str]:
    return [line for _ in range(repeat) for line in CORPUS]


def _bpe_vocab_and_merges(tok) -> tuple[dict[str, int], list[tuple[str, str]]]:
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return dict(model["vocab"]), merges


def _llama_tokenizer(vocab_size: int):
    """Byte-level BPE like SmolLM2: every byte is in the alphabet, no BOS added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False: a token " word" spans its space too, so offsets tile the text
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>",
        pad_token="<|im_end|>", model_max_length=512,
    )


def _gemma_tokenizer(vocab_size: int):
    """SentencePiece-style BPE like Gemma: spaces become ``▁``, unknown characters fall back to
    ``<0xNN>`` byte tokens, ``<bos>`` is prepended by the post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    draft = Tokenizer(models.BPE(unk_token="<unk>"))
    draft.pre_tokenizer = metaspace
    # the byte tokens take ids 6..261 (as in SentencePiece models); listing them as trainer
    # specials reserves the ids, the final tokenizer keeps them as plain vocabulary entries
    # a fixed alphabet (ASCII of the corpus, ``▁``, ``é``): the rest of the non-ASCII goes to byte
    # fallback, and no tie among rare characters decides what is in (which would be run-dependent)
    alphabet = sorted({c for c in "".join(CORPUS) if ord(c) < 128 and c != " "} | {"▁", "é"})
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials + byte_tokens, initial_alphabet=alphabet,
        limit_alphabet=len(alphabet), show_progress=False,
    )
    draft.train_from_iterator(_corpus(), trainer)
    vocab, merges = _bpe_vocab_and_merges(draft)

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = metaspace
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"], model_max_length=512,
    )


_VOCAB = {"llama": 500, "gemma": 700}  # different sizes on purpose: vocabulary maps are not identity


def tiny_tokenizer(arch: Literal["llama", "gemma"]):
    """The tokenizer of ``tiny_model_dir(arch, ...)`` alone (a fast tokenizer, offsets available)."""
    if arch == "llama":
        tok = _llama_tokenizer(_VOCAB["llama"])
        tok.chat_template = CHATML_TEMPLATE
        return tok
    if arch == "gemma":
        return _gemma_tokenizer(_VOCAB["gemma"])
    raise ValueError(f"unknown tiny architecture {arch!r} (llama or gemma)")


def _config(arch: str, tok):
    from transformers import Gemma3TextConfig, LlamaConfig

    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    if arch == "llama":
        return LlamaConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, **ids,
        )
    return Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=24, max_position_embeddings=512, sliding_window=16,
        layer_types=["sliding_attention", "full_attention"], **ids,
    )


def tiny_model_dir(arch: Literal["llama", "gemma"], root: Path, *, seed: int = 0) -> Path:
    """Write ``root/tiny-<arch>`` (config, safetensors weights, fast tokenizer) and return it."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer(arch)
    config = _config(arch, tok)
    out = Path(root) / f"tiny-{arch}"
    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):  # seeded weights without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _permute_qk(weight, n_head: int):
    """llama.cpp's rotary layout for q/k rows (what its HF->GGUF converter writes; transformers
    undoes it when reading). weight: [n_head * head_dim, hidden]."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def tiny_gguf_file(root: Path, *, seed: int = 0) -> Path:
    """The tiny llama model (``tiny_model_dir("llama", ...)``) written as an F32 GGUF file with
    its byte-level BPE tokenizer and chat template, as llama.cpp's converter lays it out."""
    import gguf
    from safetensors.numpy import load_file

    src = tiny_model_dir("llama", Path(root) / "src", seed=seed)
    config = json.loads((src / "config.json").read_text())
    weights = load_file(src / "model.safetensors")
    tok = json.loads((src / "tokenizer.json").read_text())
    out = Path(root) / "tiny-llama.gguf"

    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_dimension_count(config["hidden_size"] // config["num_attention_heads"])
    writer.add_rope_freq_base(float(config.get("rope_parameters", {}).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    special = {t["content"] for t in tok["added_tokens"] if t["special"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t, _ in vocab])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_pad_token_id(config["pad_token_id"])
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)

    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        writer.add_tensor(f"blk.{i}.attn_q.weight", _permute_qk(weights[p + "self_attn.q_proj.weight"], n_head))
        writer.add_tensor(f"blk.{i}.attn_k.weight", _permute_qk(weights[p + "self_attn.k_proj.weight"], n_kv))
        for hf, gg in names.items():
            writer.add_tensor(f"blk.{i}.{gg}.weight", weights[f"{p}{hf}.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


# --- a whole recipe on the tiny models ------------------------------------------------------------

# {llama} and {gemma} become the tiny models' directories. Every component is a mapping, so any
# dotted override (``curriculum.name``, ``loss.params.beta``) has somewhere to go. Sized for
# seconds: 12 built-in tasks (8 to train, 4 held out), 8 new tokens per answer, one reward
# model, 4 examples per step (the default curriculum makes 10 steps), the held-out evaluation
# of the fused model only, 8 tokens per answer.
TINY_RECIPE: dict[str, Any] = {
    "name": "tiny",
    "target": {"ref": "{llama}", "label": "llama"},
    "sources": [{"ref": "{llama}", "label": "llama"}, {"ref": "{gemma}", "label": "gemma"}],
    "data": {"source": {"name": "builtin_tasks", "params": {"n": 12, "seed": 0}}, "heldout": 4},
    "distill": {"top_k": 4, "batch_size": 4, "max_length": 256},
    "inference_mode": {
        "generator": {"name": "hf", "params": {"max_new_tokens": 8, "batch_size": 4}},
        "reward_models": [{"name": "judge", "label": "judge", "params": {"model": "{llama}"}}],
        "evaluator": {"name": "rm_vote", "params": {}},
    },
    "training_mode": {"evaluator": {"name": "min_ce", "params": {}}},
    "aligner": {"name": "offsets", "params": {}},
    "loss": {"name": "fuse_kl", "params": {}},
    "curriculum": {"name": "progressive", "params": {}},
    "train": {"lr": 1.0e-3, "batch_size": 4, "micro_batch_size": 4, "max_length": 256, "checkpoint_every": 100},
    "evaluate": {"tasks": ["profuser_heldout"], "batch_size": 4, "max_gen_toks": 8, "baselines": False},
}


def tiny_recipe(tmp_path: Path, overrides: dict[str, Any] | None = None, /, **more: Any) -> Path:
    """Write ``tmp_path/tiny.yaml``, the whole method on two tiny heterogeneous sources (the
    models are written under ``tmp_path/models`` unless already there), and return its path:
    ``profuser run`` on it takes seconds, offline, on a CPU.

    ``overrides`` (a dict) and keyword arguments are dotted like ``-o``:
    ``tiny_recipe(tmp_path, {"curriculum.name": "mine", "curriculum.params.warmup_epochs": 1})``
    or ``tiny_recipe(tmp_path, **{"loss.name": "soft_ce"})``. Naming another component
    (``<path>.name``) drops the default component's params, as ``extends:`` does.
    """
    root = Path(tmp_path)
    models = root / "models"
    dirs = {arch: models / f"tiny-{arch}" for arch in ("llama", "gemma")}
    for arch, path in dirs.items():
        if not (path / "config.json").exists():
            tiny_model_dir(arch, models)
    recipe = _fill(copy.deepcopy(TINY_RECIPE), {arch: str(path) for arch, path in dirs.items()})
    items = {**(overrides or {}), **more}
    # name changes first, so "x.name" with "x.params.p" keeps p whatever the order given
    for path, value in sorted(items.items(), key=lambda kv: not kv[0].endswith(".name")):
        _set(recipe, path, value)
    import yaml

    root.mkdir(parents=True, exist_ok=True)
    out = root / "tiny.yaml"
    out.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return out


def _fill(node: Any, dirs: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {k: _fill(v, dirs) for k, v in node.items()}
    if isinstance(node, list):
        return [_fill(v, dirs) for v in node]
    return node.format(**dirs) if isinstance(node, str) and node.startswith("{") else node


def _set(recipe: dict, path: str, value: Any) -> None:
    """``a.b.0.c = value``, creating mappings on the way; ``x.name`` replaces component ``x``."""
    from .errors import RecipeError

    parts = path.split(".")
    node: Any = recipe
    for part in parts[:-1]:
        if isinstance(node, list):
            if not (part.isdigit() and int(part) < len(node)):
                raise RecipeError([(path, f"{part!r} is not an index of a list of {len(node)}")], file="tiny_recipe")
            node = node[int(part)]
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            raise RecipeError([(path, "cannot override inside a non-mapping value")], file="tiny_recipe")
    last = parts[-1]
    if isinstance(node, list) and last.isdigit() and int(last) < len(node):
        node[int(last)] = value
    elif isinstance(node, dict):
        if last == "name" and len(parts) > 1 and node.get("name") not in (None, value):  # not the recipe's own name
            node["params"] = {}  # another component: the default's params mean nothing to it
        node[last] = value
    else:
        raise RecipeError([(path, "cannot override inside a non-mapping value")], file="tiny_recipe")
