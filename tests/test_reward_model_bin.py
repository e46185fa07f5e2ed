"""Reward models whose checkpoint ships only pickled ``.bin`` weights (Starling-RM-7B-alpha, older
classifiers): read with ``torch.load(weights_only=True)`` — tensors only, no object unpickled —
scoring exactly what the same weights score from safetensors."""

from __future__ import annotations

import logging

import pytest
import torch
from profuser_plugins.reward_models.remote_code import RemoteCodeRM
from profuser_plugins.reward_models.sequence_classifier import SequenceClassifierRM
from profuser_plugins.reward_models.starling import StarlingRM
from test_reward_models import ITEMS, MODELING, build, tiny_llama_config

from profuser.errors import ModelError
from profuser.testing import tiny_tokenizer


class Planted:
    """Unpickling this would create ``self.path``: a .bin that carries it must never run it."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _both(tmp_path, model, tok, name):
    """The same model saved twice: safetensors, and pickled .bin only."""
    from safetensors.torch import load_file

    safe, pickled = tmp_path / f"{name}-safe", tmp_path / f"{name}-bin"
    model.save_pretrained(safe)
    tok.save_pretrained(safe)
    pickled.mkdir()
    for f in safe.iterdir():  # transformers 5 writes safetensors only: the .bin as torch.save writes it
        if f.suffix != ".safetensors":
            (pickled / f.name).write_bytes(f.read_bytes())
    torch.save(load_file(safe / "model.safetensors"), pickled / "pytorch_model.bin")
    return safe, pickled


def test_sequence_classifier_reads_a_bin_checkpoint(tmp_path, caplog):
    from transformers import LlamaForSequenceClassification

    tok = tiny_tokenizer("llama")
    torch.manual_seed(3)
    model = LlamaForSequenceClassification(tiny_llama_config(tok, num_labels=1, pad_token_id=None))
    safe, pickled = _both(tmp_path, model, tok, "seq-cls")
    expected = build(SequenceClassifierRM, {"model": str(safe)}).score(ITEMS)
    with caplog.at_level(logging.WARNING):
        got = build(SequenceClassifierRM, {"model": str(pickled)}).score(ITEMS)
    assert got == pytest.approx(expected, abs=1e-6)
    assert "pickled .bin weights: read with torch.load(weights_only=True)" in caplog.text


def test_remote_code_reads_a_bin_checkpoint(tmp_path):
    import importlib.util

    tok = tiny_tokenizer("llama")
    modeling = tmp_path / "modeling_tiny_rm.py"
    modeling.write_text(MODELING)
    spec = importlib.util.spec_from_file_location("modeling_tiny_rm_bin", modeling)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = tiny_llama_config(tok)
    config.auto_map = {"AutoModel": "modeling_tiny_rm.TinyRewardModel"}
    torch.manual_seed(4)
    model = module.TinyRewardModel(config)
    with torch.no_grad():
        model.regression_head.weight.normal_()
    safe, pickled = _both(tmp_path, model, tok, "remote")
    for out in (safe, pickled):
        (out / "modeling_tiny_rm.py").write_text(MODELING)
    params = {"trust_remote_code": True, "template": "[INST] {instruction} [/INST] {response}"}
    expected = build(RemoteCodeRM, {"model": str(safe), **params}).score(ITEMS)
    assert build(RemoteCodeRM, {"model": str(pickled), **params}).score(ITEMS) == pytest.approx(expected, abs=1e-6)


def _starling_state(tok, seed=5):
    from transformers import LlamaModel

    config = tiny_llama_config(tok)
    torch.manual_seed(seed)
    backbone = LlamaModel(config).eval()
    state = {"transformer." + k: v.clone() for k, v in backbone.state_dict().items()}
    state["v_head.weight"] = torch.randn(1, config.hidden_size)
    return config, state


def test_starling_reads_its_pickled_checkpoint(tmp_path):
    from safetensors.torch import save_file

    tok = tiny_tokenizer("llama")
    config, state = _starling_state(tok)
    safe, pickled = tmp_path / "safe", tmp_path / "bin"
    for out in (safe, pickled):
        out.mkdir()
        config.save_pretrained(out)
        tok.save_pretrained(out)
    save_file(state, str(safe / "model.safetensors"))
    torch.save(state, pickled / "pytorch_model.bin")  # as the hub repository ships it
    torch.save({"not": "weights"}, pickled / "training_args.bin")  # left alone
    expected = build(StarlingRM, {"model": str(safe)}).score(ITEMS)
    assert build(StarlingRM, {"model": str(pickled)}).score(ITEMS) == pytest.approx(expected, abs=1e-6)


def test_starling_never_unpickles_an_object(tmp_path):
    tok = tiny_tokenizer("llama")
    config, state = _starling_state(tok)
    ckpt = tmp_path / "planted"
    ckpt.mkdir()
    config.save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    marker = tmp_path / "ran"
    torch.save({**state, "extra": Planted(marker)}, ckpt / "pytorch_model.bin")
    with pytest.raises(ModelError, match=r"cannot read pytorch_model.bin as tensors only .*never unpickled") as err:
        build(StarlingRM, {"model": str(ckpt)})._load()
    assert "starling" in err.value.where and "\n" not in err.value.message
    assert not marker.exists()


def test_sequence_classifier_never_unpickles_an_object(tmp_path):
    from transformers import LlamaForSequenceClassification

    tok = tiny_tokenizer("llama")
    model = LlamaForSequenceClassification(tiny_llama_config(tok, num_labels=1))
    _, pickled = _both(tmp_path, model, tok, "planted")
    marker = tmp_path / "ran"
    state = torch.load(pickled / "pytorch_model.bin", weights_only=True)
    torch.save({**state, "extra": Planted(marker)}, pickled / "pytorch_model.bin")
    with pytest.raises(ModelError, match="cannot load it as a sequence classifier") as err:
        build(SequenceClassifierRM, {"model": str(pickled)}).score(ITEMS[:1])
    assert str(pickled) in err.value.where and "nothing was unpickled" in err.value.message
    assert "\n" not in err.value.message and not marker.exists()
