"""Shared fixtures: tiny random models of two architectures (built once per session), DeepSpeed's
CPU ops for launched DeepSpeed tests (built once, in the test venv), the GPU skip, and a thread cap
(the test machines are shared)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


@pytest.fixture(scope="session")
def deepspeed_env():
    """What a launched DeepSpeed rank on the CPU needs: its accelerator, and DeepSpeed's JIT-built
    CPU ops (CPU Adam for an offloaded optimizer, the shm comm op) built once, in one process (~80 s
    on 2 cores the first time, then cached), before two ranks would build them side by side. They
    live in the test environment's own folder: ~/.cache/torch_extensions is shared with everything
    else on the machine, and a build killed there (a timeout, a stopped run) leaves a lock on which
    every later build waits forever."""
    from profuser.workers import stale_extension_locks

    env = {"DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(Path(sys.executable).parent.parent / "torch_extensions")}
    for lock in stale_extension_locks(env["TORCH_EXTENSIONS_DIR"]):  # the suite's own folder: a killed build's lock goes
        lock.unlink()
    build = ("from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load(); "
             "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load()")
    done = subprocess.run([sys.executable, "-c", build], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return env


@pytest.fixture(scope="module")
def registry():
    from profuser.plugins import Engine

    return Engine(entrypoints=False).registry


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    """Built examples of both modes for the trainer's tests (tests/test_trainer.py's writer)."""
    from test_trainer import write_examples

    root = tmp_path_factory.mktemp("examples")
    return {"inference": write_examples(root / "inference" / "examples.parquet", "inference", 8, seed=1),
            "training": write_examples(root / "training" / "examples.parquet", "training", 8, seed=2)}


@pytest.fixture
def launch_ranks():
    """``launch(argv)`` runs ``argv`` as the ranks of a multi-process launch (RANK and WORLD_SIZE
    set, as torchrun sets them) and returns each rank's stdout once every rank exited 0."""

    def launch(argv: list[str], *, world: int = 2, timeout: float = 300) -> list[str]:
        procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, "PROFUSER_DISABLE_ENTRYPOINTS": "1", "RANK": str(r), "WORLD_SIZE": str(world)})
                 for r in range(world)]
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
        assert [p.returncode for p in procs] == [0] * world, outputs
        return outputs

    return launch


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory, tiny_llama_dir, tiny_gemma_dir):
    """A folder whose models/ already holds the session's tiny models (tiny_recipe reuses them)."""
    root = tmp_path_factory.mktemp("tiny")
    (root / "models").mkdir()
    for path in (tiny_llama_dir, tiny_gemma_dir):
        (root / "models" / path.name).symlink_to(path)
    return root
