#!/usr/bin/env bash
# Run on a CPU machine with network: the wheels benchmarks/gpu_check.sh installs, offline, on the
# GPU machine (CPython 3.12, manylinux x86_64; torch 2.11, transformers, accelerate, peft, pyarrow,
# pandas, pluggy, typer, rich and sentence-transformers already there). Into .whl/ (git-ignored):
# profuser's dependencies, lm-eval[hf], pytest and DeepSpeed (built here as a wheel without
# compiled ops: DS_BUILD_OPS=0), with their dependencies, less what the GPU machine has. Prints the
# total size, which must stay within the 64 MiB that travel with the working tree.
#   bash benchmarks/gpu_wheels.sh            # uses .venv/bin/python (it needs torch to build DeepSpeed)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
DEEPSPEED=${DEEPSPEED:-deepspeed==0.19.8}   # gpu-constraints.txt's version
OUT=.whl
mkdir -p "$OUT"

if ! compgen -G "$OUT/deepspeed-*.whl" >/dev/null; then
    echo "[wheels] building $DEEPSPEED as a pure-Python wheel (DS_BUILD_OPS=0)"
    DS_BUILD_OPS=0 DS_SKIP_CUDA_CHECK=1 "$PY" -m pip wheel -q --no-deps --no-build-isolation "$DEEPSPEED" -w "$OUT"
fi

"$PY" - "$OUT" <<'PYEOF'
"""Breadth-first over the requirements: download (no deps) what is missing, read each wheel's
METADATA, queue the requirements its markers keep for CPython 3.12 on Linux x86_64."""
import subprocess
import sys
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

out = Path(sys.argv[1])
ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "os_name": "posix", "implementation_name": "cpython",
       "platform_python_implementation": "CPython"}
# on the GPU machine already (docs/scaling.md, "The GPU check"), with their heavy dependencies
PROVIDED = {canonicalize_name(n) for n in """
    torch triton transformers tokenizers safetensors hf-xet huggingface-hub accelerate peft pyarrow pandas numpy
    pluggy typer typer-slim rich sentence-transformers scikit-learn scipy pillow sympy networkx jinja2 markupsafe
    pyyaml regex psutil packaging filelock fsspec tqdm requests urllib3 certifi idna charset-normalizer
    typing-extensions python-dateutil pytz tzdata six joblib threadpoolctl pygments markdown-it-py mdurl click
    shellingham mpmath httpx httpcore h11 anyio sniffio setuptools""".split()}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64",
             "manylinux_2_5_x86_64", "linux_x86_64"]

project = tomllib.loads(Path("pyproject.toml").read_text())["project"]
wanted = [Requirement(r) for r in project["dependencies"]] + [
    Requirement(r) for r in ("pytest>=8", "pytest-timeout>=2.3", "setuptools>=69", "wheel", "deepspeed")]


def have() -> dict[str, Path]:
    return {canonicalize_name(parse_wheel_filename(p.name)[0]): p for p in out.glob("*.whl")}


def requirements_of(wheel: Path, extras: set[str]) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(z.read(name).decode())
    found = []
    for line in meta.get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is None or any(req.marker.evaluate({**ENV, "extra": e}) for e in extras | {""}):
            found.append(req)
    return found


extras: dict[str, set[str]] = {}
queue, seen = list(wanted), set()
while queue:
    batch = {}
    for req in queue:
        name = canonicalize_name(req.name)
        extras.setdefault(name, set()).update(req.extras)
        if name in PROVIDED or (name, frozenset(req.extras)) in seen:
            continue
        seen.add((name, frozenset(req.extras)))
        batch.setdefault(name, []).append(req)
    missing = {n: rs for n, rs in batch.items() if n not in have()}
    if missing:
        specs = [f"{rs[0].name}{','.join(str(r.specifier) for r in rs if r.specifier)}" for rs in missing.values()]
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
               "3.12", "--implementation", "cp", "--abi", "cp312", "--abi", "abi3", "--abi", "none", "-d", str(out)]
        cmd += [a for p in PLATFORMS for a in ("--platform", p)]
        if subprocess.run(cmd + specs, capture_output=True).returncode:  # one has no wheel: find which
            for spec in specs:
                if subprocess.run(cmd + [spec], capture_output=True).returncode:  # an sdist only (sqlitedict, rouge-score)
                    print(f"[wheels] building {spec} (no wheel published)", file=sys.stderr)
                    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), spec], check=True)
    wheels = have()
    queue = [r for n in batch for r in requirements_of(wheels[n], extras.get(n, set()))]

print("\n".join(sorted(p.name for p in out.glob("*.whl"))))
PYEOF

total=$(du -cb "$OUT"/*.whl | tail -1 | cut -f1)
echo "[wheels] $(ls "$OUT"/*.whl | wc -l) wheels in $OUT/: $((total / 1024 / 1024)) MiB ($total bytes; the limit is 64 MiB)"
[ "$total" -le $((64 * 1024 * 1024)) ] || { echo "[wheels] over 64 MiB: they cannot travel with the working tree"; exit 1; }
