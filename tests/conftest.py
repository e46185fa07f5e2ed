"""Shared fixtures: tiny random models of two architectures (built once per session), the GPU
skip, and a thread cap (the test machines are shared)."""

from __future__ import annotations

import pytest
import torch

from profuser.testing import tiny_model_dir

torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A LlamaForCausalLM with a byte-level BPE tokenizer and a ChatML template (like SmolLM2)."""
    return tiny_model_dir("llama", tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tiny_gemma_dir(tmp_path_factory):
    """A Gemma3ForCausalLM with a SentencePiece-style tokenizer and no chat template (like Gemma-3 base)."""
    return tiny_model_dir("gemma", tmp_path_factory.mktemp("models"))
