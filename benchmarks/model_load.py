"""How long does a packaged model take to load, cold and from the dequantised cache? Prints JSON.

    .venv/bin/python benchmarks/model_load.py                    # both models, cold + cached
    .venv/bin/python benchmarks/model_load.py --models smollm2 --cached-runs 5

Every measurement runs in a fresh Python process (what a pipeline stage pays), after the imports
(torch, transformers' model loading code, profuser and its plugins: ``import_s``). ``cold_s``: ``load_model`` with an
empty temporary cache directory, so the GGUF is dequantised (tokenizer conversion included) and
written to the cache; ``cached_s``: the same call once the entry exists (median of
``--cached-runs`` processes). Both include one forward pass on a short prompt: weights are
memory-mapped from safetensors, so the first forward is where they are actually read, and a
model is not loaded until it can be used. ``cached_load_s`` is ``load_model`` alone; the ``*_cpu_s``
figures are the CPU time of the same spans (of the child process, the dequantising included), which a
busy shared machine inflates much less than wall time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile

MODELS = {"smollm2": "builtin:smollm2-135m-instruct", "gemma3": "builtin:gemma3-270m"}

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
import transformers.modeling_utils  # transformers imports lazily: pay it here, not in the load
from transformers import AutoModelForCausalLM, AutoTokenizer
from profuser.models import load_model
from profuser.plugins import Engine
engine = Engine()
torch.set_num_threads(int(sys.argv[3]))
t1, c1 = time.perf_counter(), time.process_time()
model, tokenizer = load_model(sys.argv[1], cache_dir=sys.argv[2], engine=engine)
t2 = time.perf_counter()
ids = torch.tensor([tokenizer("What is the capital of France?")["input_ids"]])  # [1, T]
with torch.no_grad():
    model(ids)
t3, c3 = time.perf_counter(), time.process_time()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "ready_s": t3 - t1, "ready_cpu_s": c3 - c1}))
"""


def measure(ref: str, cache_dir: str, threads: int) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-c", CHILD, ref, cache_dir, str(threads)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{ref}: the child process failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS, reverse=True))
    parser.add_argument("--cached-runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in each process (1: on a busy machine, more threads spin-wait)")
    args = parser.parse_args()

    results: dict[str, dict[str, float]] = {}
    for key in args.models:
        cache = tempfile.mkdtemp(prefix="profuser-bench-cache-")
        try:
            cold = measure(MODELS[key], cache, args.threads)
            cached = [measure(MODELS[key], cache, args.threads) for _ in range(args.cached_runs)]
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        results[key] = {
            "cold_s": round(cold["ready_s"], 2),
            "cached_s": round(statistics.median(r["ready_s"] for r in cached), 2),
            "cached_load_s": round(statistics.median(r["load_s"] for r in cached), 2),
            "cold_cpu_s": round(cold["ready_cpu_s"], 2),
            "cached_cpu_s": round(statistics.median(r["ready_cpu_s"] for r in cached), 2),
            "import_s": round(statistics.median(r["import_s"] for r in cached), 2),
        }
        print(f"{key}: {results[key]}", file=sys.stderr)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
