"""Reliability (issue 14): a training that turns NaN stops or skips, a kill before `train` is sealed
loses nothing, resume unpickles nothing from the runs directory, and bad recipes, model directories,
generations and reward-model inputs get one clear line."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from test_trainer import read_metrics, small_spec, write_examples

from profuser.errors import ProfuserError
from profuser.training import train
from profuser.training.trainer import TrainingError


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    root = tmp_path_factory.mktemp("examples")
    return {"training": write_examples(root / "training" / "examples.parquet", "training", 8, seed=2)}


def nan_teacher(src: Path, dst: Path, ids: set[str] | None = None) -> Path:
    """A copy of examples.parquet whose teacher logits are NaN (for the rows in ``ids``, else all)."""
    rows = pq.read_table(src).to_pylist()
    for row in rows:
        if ids is None or row["id"] in ids:
            row["teacher_logits"] = [[float("nan")] * len(t) for t in row["teacher_logits"]]
    dst.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pq.read_table(src).from_pylist(rows, schema=pq.read_schema(src)), dst)
    return dst


def fit(tiny_llama_dir, examples, registry, out, spec, loss="sft", epochs=2, **kw):
    return train(str(tiny_llama_dir), examples, registry.build("losses", loss), registry.build("curricula", "sft_only", {"epochs": epochs}),
                 spec, out, device="cpu", **kw)


# --- 1. the training guard -------------------------------------------------------------------------


def test_a_nan_target_stops_training_at_step_one_and_saves_nothing(tmp_path, tiny_llama_dir, examples, registry):
    bad = {"training": nan_teacher(examples["training"], tmp_path / "nan.parquet")}
    with pytest.raises(TrainingError) as err:
        fit(tiny_llama_dir, bad, registry, tmp_path / "out", small_spec(max_grad_norm=None), loss="fuse_kl")
    line = err.value.lines()[0]
    assert "\n" not in line and "step 1 (phase 'sft', step 1 of 4)" in line and " is nan; stopped" in line, line
    assert "no checkpoint was written yet" in line
    assert not (tmp_path / "out" / "model").exists() and not (tmp_path / "out" / "summary.json").exists()


def test_a_huge_lr_stops_at_the_first_bad_step_and_keeps_the_last_good_checkpoint(tmp_path, tiny_llama_dir, examples, registry):
    out = tmp_path / "out"
    with pytest.raises(TrainingError) as err:
        fit(tiny_llama_dir, examples, registry, out, small_spec(lr=1e12, max_grad_norm=None, warmup_ratio=0, checkpoint_every=1))
    logged = read_metrics(out)
    good = len(logged)  # every logged step was finite; the next one was not
    assert good >= 1 and all(torch.isfinite(torch.tensor(m["loss"])) for m in logged)
    assert f"step {good + 1} (phase 'sft'" in err.value.message
    assert f"the last good checkpoint (step-{good:08d}) is kept" in err.value.message
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step-{good:08d}"]
    assert not (out / "model").exists() and not (out / "summary.json").exists()


def test_max_bad_steps_skips_and_counts_bad_steps_and_the_model_stays_finite(tmp_path, tiny_llama_dir, examples, registry):
    bad = {"training": nan_teacher(examples["training"], tmp_path / "nan.parquet", ids={"ex3"})}
    summary = fit(tiny_llama_dir, bad, registry, tmp_path / "out", small_spec(max_grad_norm=None, max_bad_steps=8), loss="fuse_kl")
    metrics = read_metrics(tmp_path / "out")
    skipped = [m["step"] for m in metrics if m["skipped"]]
    assert len(skipped) == 2 and summary["bad_steps"] == 2  # ex3 is in one batch of each of the 2 epochs
    assert metrics[-1]["bad_steps"] == 2
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "out" / "model" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    # one bad step over the limit stops the run
    with pytest.raises(TrainingError, match=r"\(2 bad steps, train.max_bad_steps is 1\)"):
        fit(tiny_llama_dir, bad, registry, tmp_path / "strict", small_spec(max_grad_norm=None, max_bad_steps=1), loss="fuse_kl")


def test_the_training_command_prints_the_guard_as_one_line(tmp_path, tiny_llama_dir, examples, capsys):
    from profuser.training.__main__ import main

    bad = nan_teacher(examples["training"], tmp_path / "nan.parquet")
    code = main(["--model", str(tiny_llama_dir), "--examples", f"training={bad}", "--curriculum", "sft_only",
                 "--device", "cpu", "-t", "batch_size=4", "-t", "micro_batch_size=2", "-t", "max_grad_norm=null",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    problems = [line for line in err.splitlines() if "step 1 (phase" in line]
    assert code == 1 and len(problems) == 1 and problems[0].startswith("train: step 1 (phase 'sft'") and "Traceback" not in err


# --- 3. a kill between the final save and the sealing of `train` ------------------------------------


def test_a_finished_training_that_was_not_sealed_is_returned_not_trained_again(tmp_path, tiny_llama_dir, examples, registry):
    out = tmp_path / "train.partial"
    first = fit(tiny_llama_dir, examples, registry, out, small_spec())
    assert not (out / "checkpoints").exists()  # removed only after summary.json was written
    weights = (out / "model" / "model.safetensors").read_bytes()
    steps = []
    # the kill came here: the runner never sealed the stage; the re-run finds the finished training
    again = fit(tiny_llama_dir, examples, registry, out, small_spec(), callbacks=[lambda step, m: steps.append(step)])
    assert steps == [] and again["resumed_from"] == again["steps"] == first["steps"] == 4
    assert again["final_loss"] == first["final_loss"]
    assert (out / "model" / "model.safetensors").read_bytes() == weights
    with pytest.raises(ProfuserError, match="other phases or batches"):
        fit(tiny_llama_dir, examples, registry, out, small_spec(batch_size=8))


# --- 11. resume unpickles nothing ----------------------------------------------------------------


class Payload:
    """Unpickling this creates the marker file: what a hostile pickle in the runs dir would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_resume_reads_no_pickle_from_the_checkpoint(tmp_path, tiny_llama_dir, examples, registry, monkeypatch):
    out, marker = tmp_path / "out", tmp_path / "pwned"

    class Killed(Exception):
        pass

    def kill(step, metrics):
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        fit(tiny_llama_dir, examples, registry, out, small_spec(), callbacks=[kill])  # checkpoint at step 2
    ckpt = out / "checkpoints" / "step-00000002"
    assert sorted(p.name for p in ckpt.iterdir()) == ["model.safetensors", "optimizer.pt", "rng-0.json", "rng-0.safetensors",
                                                      "scheduler.json", "trainer_state.json"]
    # files accelerate's own resume would unpickle (weights_only=False): planted, they must stay unread
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "scheduler.bin"):
        (ckpt / name).write_bytes(pickle.dumps(Payload(marker)))
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: loads.append(kw.get("weights_only")) or real_load(*a, **kw))
    summary = fit(tiny_llama_dir, examples, registry, out, small_spec())
    assert summary["resumed_from"] == 2 and not marker.exists() and loads == [True]

    # a hostile optimizer file is refused by the restricted unpickler: one line, no code run
    with pytest.raises(Killed):
        fit(tiny_llama_dir, examples, registry, tmp_path / "again", small_spec(), callbacks=[kill])
    torch.save({"state": Payload(marker)}, tmp_path / "again" / "checkpoints" / "step-00000002" / "optimizer.pt")
    with pytest.raises(ProfuserError, match="optimizer state is not plain tensors"):
        fit(tiny_llama_dir, examples, registry, tmp_path / "again", small_spec())
    assert not marker.exists()


def test_deepspeed_checkpoint_files_are_verified_against_a_key_outside_the_runs_dir(tmp_path):
    from profuser.training.parallel import checkpoint_key, sign_files, verify_files

    key = checkpoint_key(tmp_path / "cache")
    assert checkpoint_key(tmp_path / "cache") == key and len(key) == 32  # made once, then reused
    assert oct((tmp_path / "cache" / "checkpoint.key").stat().st_mode & 0o777) == "0o600"
    ckpt = tmp_path / "step-00000004"
    (ckpt / "deepspeed").mkdir(parents=True)
    for name in ("deepspeed/mp_rank_00_model_states.pt", "deepspeed/zero_pp_rank_0_optim_states.pt",
                 "deepspeed/zero_pp_rank_1_optim_states.pt", "latest"):
        (ckpt / name).write_bytes(os.urandom(64))
    (ckpt / "trainer_state.json").write_text("{}")  # read as JSON, never unpickled: not signed
    for rank in (0, 1):
        sign_files(ckpt, rank, 2, key)
    assert verify_files(ckpt, 0, 2, key) is None and verify_files(ckpt, 1, 2, key) is None
    assert verify_files(ckpt, 0, 2, os.urandom(32)) is not None  # another key: refused
    (ckpt / "deepspeed" / "zero_pp_rank_1_optim_states.pt").write_bytes(pickle.dumps(Payload(tmp_path / "x")))
    problems = [verify_files(ckpt, r, 2, key) for r in (0, 1)]
    assert any(p and "zero_pp_rank_1_optim_states.pt does not match its signature" in p for p in problems)
    (ckpt / "deepspeed" / "extra.pt").write_bytes(b"planted")
    assert verify_files(ckpt, 0, 2, key) == "unsigned file deepspeed/extra.pt"
    json.loads((ckpt / "signatures-rank0.json").read_text())  # the signatures are plain JSON


# --- 7. NaN logits while sampling --------------------------------------------------------------------


def test_nan_logits_while_sampling_name_the_model_and_examples(tmp_path, tiny_llama_dir):
    from profuser_plugins.generators.hf import HFGenerator
    from transformers import AutoModelForCausalLM

    from profuser.components import Prompt
    from profuser.errors import ModelError
    from profuser.pipeline import Runtime

    broken = tmp_path / "nan-llama"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    model.save_pretrained(broken)
    for f in tiny_llama_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            (broken / f.name).write_bytes(f.read_bytes())
    gen = HFGenerator({"do_sample": True, "max_new_tokens": 4, "batch_size": 2})
    gen.runtime = Runtime(device="cpu", progress=False)
    with pytest.raises(ModelError) as err:
        gen.generate(str(broken), [Prompt("q1", "", "Hi"), Prompt("q2", "", "Hello there")], seed=0)
    line = err.value.lines()[0]
    assert line.startswith(f"{broken}") or "nan-llama" in line
    assert "not finite (NaN/inf) while sampling for example(s) q2, q1" in line and "\n" not in line


# --- 10. a reward model's error on a long row names the row ----------------------------------------


def test_a_reward_models_error_on_a_long_row_names_its_id(tiny_llama_dir):
    from profuser_plugins.reward_models.judge import JudgeRM

    from profuser.components import Judged
    from profuser.pipeline import Runtime

    rm = JudgeRM({"model": str(tiny_llama_dir), "max_length": 400})
    rm.runtime = Runtime(device="cpu", progress=False)
    items = [Judged("", "Say something.", "ok", "fine-row"), Judged("", "word " * 5000, "ok", "huge-row")]
    with pytest.raises(ProfuserError) as err:
        rm.score(items)
    assert "row 'huge-row' (25002 characters): the rubric and instruction alone exceed max_length 400" in err.value.lines()[0]


DS_SCRIPT = """
import sys
from pathlib import Path
from test_trainer import small_spec
from profuser.errors import ProfuserError
from profuser.plugins import Engine
from profuser.training import train
mode, out, model, examples, config = sys.argv[1:6]
class Killed(Exception):
    pass
def kill(step, metrics):
    if mode == "kill" and step == 3:
        raise Killed
registry = Engine(entrypoints=False).registry
spec = small_spec(distributed="deepspeed", deepspeed_config=config, checkpoint_every=2)
try:
    summary = train(model, {"training": examples}, registry.build("losses", "sft"),
                    registry.build("curricula", "sft_only", {"epochs": 2}), spec, out, device="cpu", callbacks=[kill],
                    keep_checkpoints=True)
    print("RESUMED_FROM", summary["resumed_from"])
except Killed:
    print("KILLED")
except ProfuserError as exc:
    print("ERROR", exc.lines()[0])
"""


@pytest.mark.slow
def test_deepspeed_resume_verifies_signatures_and_matches_a_straight_run(tmp_path, tiny_llama_dir, examples, deepspeed_env):
    import shutil
    import subprocess

    from test_distributed import BIN, CONFIGS, free_port

    script = tmp_path / "ds.py"
    script.write_text(DS_SCRIPT)
    env = {**os.environ, "PROFUSER_DISABLE_ENTRYPOINTS": "1", "OMP_NUM_THREADS": "1", **deepspeed_env,
           "PYTHONPATH": str(Path(__file__).parent), "PROFUSER_CACHE": str(tmp_path / "cache")}

    def launch(mode, out):
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), str(script), mode,
               str(out), str(tiny_llama_dir), str(examples["training"]), str(CONFIGS / "zero2.json")]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False).stdout

    assert "RESUMED_FROM 0" in launch("straight", tmp_path / "straight")
    assert "KILLED" in launch("kill", tmp_path / "killed")  # after the checkpoint at step 2
    shutil.copytree(tmp_path / "killed", tmp_path / "tampered")
    assert "RESUMED_FROM 2" in launch("resume", tmp_path / "killed")
    assert (tmp_path / "killed" / "model" / "model.safetensors").read_bytes() == \
        (tmp_path / "straight" / "model" / "model.safetensors").read_bytes()
    ckpt = tmp_path / "tampered" / "checkpoints" / "step-00000002"
    assert sorted(p.name for p in ckpt.glob("signatures-rank*.json")) == ["signatures-rank0.json", "signatures-rank1.json"]
    (ckpt / "deepspeed" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(pickle.dumps(Payload(tmp_path / "pwned")))
    out = launch("resume", tmp_path / "tampered")
    assert "does not match its signature: not loaded" in out and not (tmp_path / "pwned").exists()


# --- 2. two runs of one recipe on one runs dir at once; 11. a corrupt artifact in --dry-run ---------


def test_two_runs_of_one_recipe_at_once_compute_each_stage_once_and_a_corrupt_one_is_reported(tmp_path):
    import subprocess
    import sys

    from profuser.testing import tiny_recipe

    recipe, runs = tiny_recipe(tmp_path), tmp_path / "runs"
    env = {**os.environ, "PROFUSER_DISABLE_ENTRYPOINTS": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "1000"}
    cmd = [str(Path(sys.executable).parent / "profuser"), "run", str(recipe), "--runs-dir", str(runs)]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    assert not any("Traceback" in err for _, err in outs)
    record = json.loads((runs / "runs" / "tiny" / "run.json").read_text())
    stages = [s["id"] for s in record["stages"]]
    for stage in stages:  # computed by one run, reused by the other (after waiting for it, or later)
        done = [out for out, _ in outs if f"[done]   {stage} in " in out]
        cached = [out for out, _ in outs if f"[cached] {stage}\n" in out]
        assert len(done) == 1 and len(cached) == 1, stage
    assert any("[wait]" in out for out, _ in outs)  # started together: one waited for the other
    assert len(list((runs / "store").glob("*/*/manifest.json"))) == len(stages)
    assert not list((runs / "store").glob("*/*.partial"))

    # a corrupted artifact: --dry-run counts it as to run (and moves nothing), the run says it recomputes it
    select = next(Path(s["path"]) for s in record["stages"] if s["id"] == "select/training")
    table = next(select.glob("*.parquet"))
    data = bytearray(table.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    table.write_bytes(bytes(data))
    plan = subprocess.run([*cmd, "--dry-run", "--json"], env=env, capture_output=True, text=True, timeout=300, check=True)
    assert [s["id"] for s in json.loads(plan.stdout)["stages"] if not s["cached"]] == ["select/training"]
    assert select.is_dir()
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=True).stdout
    corrupt = [line for line in again.splitlines() if line.startswith("[corrupt]")]
    assert len(corrupt) == 1 and str(select) in corrupt[0] and "does not match its checksum" in corrupt[0], again
    assert "[done]   select/training in " in again and again.count("[done]") == 1  # its dependents' keys did not change
    assert len(list(select.parent.glob(f"{select.name}.corrupt-*"))) == 1
