#!/usr/bin/env bash
# The GPU check: every GPU path that needs no vLLM, on the GPU machine as it is (one H100/H200,
# CPython 3.12 with torch, transformers, accelerate, peft; no network). One line per check:
# passed, failed (reason) or not runnable here (why). docs/scaling.md, "The GPU check".
#   bash benchmarks/gpu_wheels.sh       # first, on a CPU machine with network: .whl/ (<= 64 MiB)
#   bash benchmarks/gpu_check.sh        # then on the GPU machine: installs .whl/ offline and runs the checks
#   bash benchmarks/gpu_check.sh --list # the checks, on any machine
set -uo pipefail
cd "$(dirname "$0")/.."

# name | pytest node (tests/...) | what it checks
CHECKS='cpu-mechanisms|tests/test_gpu_paths_cpu.py|the CPU halves: accelerate state across precisions, fp32 master, collective guard (2 gloo ranks), lm-eval vLLM error
hf-generation|tests/test_gpu.py::test_hf_generation_on_the_gpu_answers_as_on_the_cpu|HF generation on the GPU: greedy answers as on the CPU, seeded sampling repeatable
stage-workers|tests/test_gpu.py::test_stage_workers_give_the_gpu_back_between_two_model_stages|two generate stages in worker processes (isolate_stages: true)
bf16-vs-fp32|tests/test_gpu.py::test_bf16_with_gradient_checkpointing_tracks_fp32|bf16 + gradient checkpointing within 2% of fp32, after an fp32 training in the same process
fp32-master|tests/test_gpu.py::test_bf16_weights_train_over_fp32_master_weights_on_the_gpu|dtype bfloat16 trains over fp32 master weights, saved in bf16
lora-bf16|tests/test_gpu.py::test_lora_in_bf16_trains_on_the_gpu|LoRA on a bf16 model: finite, decreasing loss, adapter saved
fsdp|tests/test_gpu.py::test_fsdp_on_every_gpu_matches_one_process|FSDP2 on every GPU: loss, gradient norm and saved weights as one process
zero3|tests/test_gpu.py::test_zero3_on_every_gpu_matches_one_process|DeepSpeed ZeRO-3 on every GPU: loss, gradient norm and gathered weights as one process
lm-eval-hf|tests/test_gpu.py::test_lm_eval_hf_backend_on_the_gpu_answers_as_on_the_cpu|lm-eval hf backend on the GPU: same prompts, answers and score as on the CPU
tiny-run|tests/test_gpu.py::test_a_tiny_run_end_to_end_on_the_gpu_with_isolate_auto|profuser run of the tiny recipe end to end, isolate_stages: auto
vllm-generation|tests/test_gpu.py::test_vllm_generates_repeatably_and_as_hf_greedy|vLLM generation: seeded, and greedy as HF (needs vLLM)
vllm-data-parallel|tests/test_gpu.py::test_vllm_data_parallel_generates_what_one_engine_does|vLLM engines per GPU / per rank as one engine (needs vLLM)
vllm-stage-workers|tests/test_gpu.py::test_stage_workers_free_the_gpu_between_two_vllm_engines|two vLLM engines of 60% GPU memory one after the other (needs vLLM)
lm-eval-vllm|tests/test_gpu.py::test_lm_eval_vllm_backend_answers_as_hf|lm-eval vLLM backend answers as its hf backend (needs vLLM)'

if [ "${1:-}" = "--list" ]; then
    echo "$CHECKS" | while IFS='|' read -r name node what; do printf '%-20s %s\n' "$name" "$what"; done
    exit 0
fi

PY=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/profuser-gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
VENV=$WORK/venv
start=$(date +%s)
say() { echo "[gpu-check] $*"; }

# a venv over the machine's packages (torch & co. stay as they are); pip comes from them too
"$PY" -m venv --system-site-packages --without-pip "$VENV" || { say "cannot make a venv with $PY"; exit 2; }
VPY=$VENV/bin/python
# and over $PY's own packages when $PY is itself a venv (a venv only sees its base interpreter's)
"$PY" -c "import site, sys; print(''.join(f'import site; site.addsitedir({p!r})\n' for p in site.getsitepackages()))" \
    >"$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_profuser_parent.pth"
# the tests launch bin/accelerate and bin/torchrun beside the interpreter
printf '#!/bin/sh\nexec "%s" -m accelerate.commands.accelerate_cli "$@"\n' "$VPY" >"$VENV/bin/accelerate"
printf '#!/bin/sh\nexec "%s" -m torch.distributed.run "$@"\n' "$VPY" >"$VENV/bin/torchrun"
chmod +x "$VENV/bin/accelerate" "$VENV/bin/torchrun"

if compgen -G ".whl/*.whl" >/dev/null; then
    # by name, without dependencies: what the machine has already stays (gpu_wheels.sh left it out)
    names=$(ls .whl/*.whl | xargs -n1 basename | cut -d- -f1 | sort -u)
    say "installing $(echo "$names" | wc -l) wheels from .whl/ (offline)"
    "$VPY" -m pip install -q --no-index --no-deps --find-links .whl $names || say "some wheels did not install; going on"
else
    say "no .whl/ (run benchmarks/gpu_wheels.sh on a machine with network first); using what is installed"
fi
"$VPY" -m pip install -q --no-index --no-deps --no-build-isolation -e . || { say "cannot install profuser itself"; exit 2; }

cuda=$("$VPY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null || echo 0)
has_vllm=$("$VPY" -c "import importlib.util as u; print(int(u.find_spec('vllm') is not None))" 2>/dev/null || echo 0)
"$VPY" -c "import torch, transformers, accelerate; print('[gpu-check] torch', torch.__version__, '| transformers', transformers.__version__, '| accelerate', accelerate.__version__, '|', torch.cuda.device_count(), 'x', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"

nodes=()
while IFS='|' read -r name node what; do
    case "$name" in vllm-*|lm-eval-vllm) [ "$has_vllm" = 1 ] || continue ;; esac
    [ "$cuda" -gt 0 ] || [ "$name" = cpu-mechanisms ] || continue
    nodes+=("$node")
done <<<"$CHECKS"

budget=$(( 470 - ($(date +%s) - start) ))  # 8 minutes in all, the installs included
say "running ${#nodes[@]} check(s), at most ${budget} s"
PROFUSER_DISABLE_ENTRYPOINTS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false DS_ACCELERATOR=cuda \
PROFUSER_CACHE=$WORK/cache timeout "$budget" "$VPY" -m pytest "${nodes[@]}" -p no:cacheprovider -q -rA \
    -o "timeout=$budget" --junitxml "$WORK/junit.xml" >"$WORK/log.txt" 2>&1
rc=$?
[ "$rc" = 124 ] && say "the checks ran past ${budget} s and were stopped"
cp "$WORK/log.txt" "${GPU_CHECK_LOG:-gpu-check.log}" 2>/dev/null && say "pytest's log: ${GPU_CHECK_LOG:-gpu-check.log}"

CHECKS="$CHECKS" "$VPY" - "$WORK/junit.xml" "$cuda" "$has_vllm" "$(( $(date +%s) - start ))" <<'PYEOF'
import os
import sys
import xml.etree.ElementTree as ET

junit, cuda, has_vllm, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
checks = [line.split("|") for line in os.environ["CHECKS"].splitlines()]
cases = {}
try:
    for case in ET.parse(junit).iter("testcase"):
        cases.setdefault(case.get("classname", "").replace(".", "/") + ".py::" + case.get("name"), []).append(case)
except (FileNotFoundError, ET.ParseError):
    pass
counts = {"passed": 0, "failed": 0, "not runnable here": 0}


def first_line(text):
    lines = [l.strip() for l in (text or "").splitlines() if l.strip()]
    picked = next((l for l in lines if l.startswith("E ")), lines[0] if lines else "no message")
    return picked.removeprefix("E ").strip()[:200]


for name, node, what in checks:
    if name.startswith(("vllm-", "lm-eval-vllm")) and not has_vllm:
        status = "not runnable here (no vLLM: its CUDA wheels, several hundred MB, exceed the 64 MiB that travel)"
    elif not cuda and name != "cpu-mechanisms":
        status = "not runnable here (no CUDA GPU visible)"
    else:
        if "::" in node:  # one test (parametrized: every parameter)
            found = [c for key, cs in cases.items() if key.split("[")[0] == node for c in cs]
        else:  # a whole file
            found = [c for key, cs in cases.items() if key.startswith(node + "::") for c in cs]
        problems = [(c, k) for c in found for k in c if k.tag in ("failure", "error")]
        skipped = [k for c in found for k in c if k.tag == "skipped"]
        if not found:
            status = "failed (no result: the run stopped before it; see the log)"
        elif problems:
            case, kind = problems[0]
            status = f"failed ({first_line(kind.get('message') or kind.text)})"
        elif skipped and len(skipped) == len(found):
            status = f"not runnable here ({skipped[0].get('message', 'skipped')})"
        else:
            status = "passed"
        seconds_of = sum(float(c.get("time", 0)) for c in found)
        status += f"  [{seconds_of:.0f} s]" if found else ""
    key = "passed" if status.startswith("passed") else "failed" if status.startswith("failed") else "not runnable here"
    counts[key] += 1
    print(f"{name:20} {status}")
print(f"[gpu-check] {counts['passed']} passed, {counts['failed']} failed, {counts['not runnable here']} not runnable here; "
      f"{seconds} s in all")
sys.exit(1 if counts["failed"] else 0)
PYEOF
