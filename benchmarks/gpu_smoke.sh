#!/usr/bin/env bash
# The first GPU run, one command: every gpu-marked test (tests/test_gpu.py), one PASS/FAIL line per
# check and a JSON summary. Wheels in the repo's ignored .whl/ folder (vllm, a CUDA torch, ray...)
# are installed first, offline, when present. Budget: under 8 minutes on one H200.
#   bash benchmarks/gpu_smoke.sh            # uses .venv/bin/python, else python3
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
if compgen -G ".whl/*.whl" >/dev/null; then
    echo "[smoke] installing $(ls .whl/*.whl | wc -l) wheel(s) from .whl/ (offline)"
    "$PY" -m pip install -q --no-index --find-links .whl .whl/*.whl || echo "[smoke] wheel install failed; going on"
fi
"$PY" -c "import sys, torch; torch.cuda.is_available() or sys.exit('[smoke] no CUDA device: nothing to check'); print('[smoke]', torch.cuda.device_count(), 'x', torch.cuda.get_device_name(0))" || exit 2
out=$(mktemp -d)
start=$(date +%s)
PROFUSER_DISABLE_ENTRYPOINTS=1 HF_HUB_OFFLINE=1 timeout 470 "$PY" -m pytest tests/test_gpu.py -m gpu -p no:cacheprovider \
    -q -rA --junitxml "$out/junit.xml" >"$out/log.txt" 2>&1
rc=$?
tail -40 "$out/log.txt"
"$PY" - "$out/junit.xml" "$(( $(date +%s) - start ))" "$rc" <<'PYEOF'
import json, sys
import xml.etree.ElementTree as ET
path, seconds, rc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
results = {}
try:
    for case in ET.parse(path).iter("testcase"):
        name = case.get("name")
        kids = {child.tag for child in case}
        status = "FAIL" if kids & {"failure", "error"} else "SKIP" if "skipped" in kids else "PASS"
        results[name] = {"status": status, "seconds": round(float(case.get("time", 0)), 1)}
        print(f"{status:4}  {name}  ({results[name]['seconds']} s)")
except (FileNotFoundError, ET.ParseError):
    print("FAIL  pytest produced no report (timed out or crashed); see the log above")
counts = {s: sum(r["status"] == s for r in results.values()) for s in ("PASS", "FAIL", "SKIP")}
print(json.dumps({"passed": counts["PASS"], "failed": counts["FAIL"], "skipped": counts["SKIP"], "seconds": seconds,
                  "pytest_exit": rc, "checks": results}))
sys.exit(0 if rc == 0 and counts["FAIL"] == 0 else 1)
PYEOF
