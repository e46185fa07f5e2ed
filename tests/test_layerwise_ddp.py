"""The ``layerwise`` curriculum on two CPU processes (DDP over gloo): frozen parameters do not change
in the shallow phase and do after it, and both ranks end with the same weights (DDP is rewrapped
at each phase start; a reducer that missed the new set would leave the ranks apart, since each
trains on its own half of every batch). And the backends that shard parameters are refused."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_trainer import small_spec

from profuser.errors import ProfuserError
from profuser.training import trainer

REPO = Path(__file__).resolve().parents[1]
CURRICULUM = {"first_blocks": 0.5, "then": "rest"}  # the tiny model has 2 blocks: block 0 first, block 1 after
BOUNDARY = 2  # progressive's inference phase: 8 examples / batch 4 = steps 1-2, then co-fusion

# One rank: train() with the backend captured (trainer.make_backend wrapped), so each rank can
# write its own weights at the phase boundary (on_batch runs on every rank, callbacks on rank 0
# only) and at the end; under DDP only rank 0 saves a model.
RANK_SCRIPT = """
import json, os, sys, torch
from profuser.plugins import Engine
from profuser.recipe import TrainSpec
from profuser.training import trainer

out, model, examples, spec, curriculum, boundary = sys.argv[1:7]
rank = os.environ["RANK"]
backends = []
real = trainer.make_backend
trainer.make_backend = lambda *a, **kw: backends.append(real(*a, **kw)) or backends[-1]

def dump(name):
    state = {k: v.detach().clone() for k, v in backends[0].unwrap().state_dict().items()}
    torch.save(state, os.path.join(out, f"rank{rank}-{name}.pt"))

def at_boundary(step, ids):  # every rank, before step `step`: the weights after the one before
    if step == int(boundary) + 1:
        dump("boundary")

registry = Engine(entrypoints=False).registry
summary = trainer.train(model, json.loads(examples), registry.build("losses", "fuse_kl"),
                        registry.build("curricula", "layerwise", json.loads(curriculum)),
                        TrainSpec(**json.loads(spec)), out, device="cpu", on_batch=at_boundary)
dump("end")
print(json.dumps({"backend": backends[0].name, "world_size": summary["world_size"],
                  "phases": [p["name"] for p in summary["phases"]]}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def split(state: dict) -> tuple[dict, dict]:
    """(embeddings + block 0, the rest): what the shallow phase trains, what it freezes. The tiny
    model ties its head to the embedding: lm_head.weight is the embedding itself."""
    shallow = {k: v for k, v in state.items() if k.startswith(("model.embed_tokens.", "model.layers.0.", "lm_head."))}
    return shallow, {k: v for k, v in state.items() if k not in shallow}


@pytest.mark.slow  # two ranks each load torch, accelerate and transformers: ~40 s on 2 busy cores
def test_layerwise_under_ddp_freezes_by_phase_and_keeps_the_ranks_equal(tmp_path, tiny_llama_dir, examples, launch_ranks):
    from transformers import AutoModelForCausalLM

    spec = small_spec(micro_batch_size=1, weight_decay=0.1).model_dump(mode="json")  # decay: frozen state would still move them
    argv = ["env", "MASTER_ADDR=127.0.0.1", f"MASTER_PORT={free_port()}", "OMP_NUM_THREADS=1",
            sys.executable, "-c", RANK_SCRIPT, str(tmp_path), str(tiny_llama_dir),
            json.dumps({m: str(p) for m, p in examples.items()}), json.dumps(spec), json.dumps(CURRICULUM), str(BOUNDARY)]
    rank0 = json.loads(launch_ranks(argv, timeout=240)[0].strip().splitlines()[-1])
    assert rank0 == {"backend": "ddp", "world_size": 2, "phases": ["shallow/inference", "deep/co-fusion"]}

    initial = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert initial.config.tie_word_embeddings
    initial = initial.state_dict()
    load = lambda name: [torch.load(tmp_path / f"rank{r}-{name}.pt", weights_only=True) for r in (0, 1)]
    boundary, end = load("boundary"), load("end")
    for states in (boundary, end):  # the ranks agree bit for bit
        assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])

    shallow0, deep0 = split(initial)
    shallow1, deep1 = split(boundary[0])
    shallow2, deep2 = split(end[0])
    assert deep0 and all(torch.equal(deep0[k], deep1[k]) for k in deep0)  # frozen in the shallow phase
    assert all(not torch.equal(shallow0[k], shallow1[k]) for k in shallow0)  # trained in it
    assert all(torch.equal(shallow1[k], shallow2[k]) for k in shallow1)  # then: rest freezes them after
    assert all(not torch.equal(deep1[k], deep2[k]) for k in deep1)  # and the deep part trains


def test_a_sharding_backend_is_refused_in_one_line(tmp_path, tiny_llama_dir, examples, registry, monkeypatch):
    # ZeRO needs a DeepSpeed launch (and its CPU comm op compiled, minutes on a busy machine); the
    # refusal is the trainer's, on the backend's name: a one-process backend called ZeRO-2 stands in
    real = trainer.make_backend

    def zero2(*args, **kwargs):
        backend = real(*args, **kwargs)
        backend.name = "deepspeed-zero2"
        return backend

    monkeypatch.setattr(trainer, "make_backend", zero2)
    with pytest.raises(ProfuserError, match="need one process or DDP; the deepspeed-zero2 backend shards") as info:
        trainer.train(str(tiny_llama_dir), examples, registry.build("losses", "fuse_kl"),
                      registry.build("curricula", "layerwise", CURRICULUM), small_spec(), tmp_path, device="cpu")
    assert info.value.where == "train.distributed"


def test_lora_with_layerwise_is_refused_in_one_line(tmp_path, tiny_llama_dir, examples, registry):
    pytest.importorskip("peft")
    spec = small_spec(peft={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    with pytest.raises(ProfuserError, match="train.peft cannot be combined with the per-phase trainable") as info:
        trainer.train(str(tiny_llama_dir), examples, registry.build("losses", "fuse_kl"),
                      registry.build("curricula", "layerwise", CURRICULUM), spec, tmp_path, device="cpu")
    assert info.value.where == "train.peft"


def test_fsdp_with_layerwise_is_refused_in_one_line(tmp_path, tiny_llama_dir, examples):
    # on CPU FSDP is refused before the layerwise check: one line either way, no traceback
    cmd = [sys.executable, "-m", "profuser.training", "--model", str(tiny_llama_dir), "--out", str(tmp_path / "out"),
           "--device", "cpu", "--curriculum", "layerwise", "--curriculum-params", json.dumps(CURRICULUM),
           *[f"--examples={m}={p}" for m, p in examples.items()],
           *[a for f in ("batch_size=4", "micro_batch_size=1", "distributed=fsdp") for a in ("-t", f)]]
    env = {**os.environ, "PROFUSER_DISABLE_ENTRYPOINTS": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].endswith("FSDP needs GPUs; on CPU use DDP or DeepSpeed"), done.stderr
