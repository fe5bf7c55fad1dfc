#!/usr/bin/env bash
# Every GPU measurement of BENCHMARKS.md in one go (issue 4): the CUDA tests, the five benchmarks on
# the GPU, then cifar10-2pct at paper settings with the fast path: scaled down stage by stage and
# extrapolated (benchmarks/stages.py: minutes, not hours), or with FULL=1 the whole run (1000
# teacher epochs, 100 experts, 5000 iterations), each stage's measured time from its manifest.
# Usage (repository root, CIFAR-10 in DATA):
#   DATA=/path/to/cifar10 [FULL=1] [OUT=runs/gpu] bash benchmarks/gpu.sh [extra key=value overrides]
set -euo pipefail
DATA=${DATA:?set DATA to a CIFAR-10 folder or archive}
OUT=${OUT:-runs/gpu}
R=${RESULTS:-benchmarks/results}
mkdir -p "$R"
python -m pytest -q   # includes the CUDA agreement tests that skip on CPU
python benchmarks/distill.py --device cuda --steps 5 10 20 40 --json "$R/distill-cuda.json" | tee "$R/distill-cuda.txt"
python benchmarks/experts.py --device cuda --experts 10 --json "$R/experts-cuda.json" | tee "$R/experts-cuda.txt"
python benchmarks/evaluate.py --device cuda --json "$R/evaluate-cuda.json" | tee "$R/evaluate-cuda.txt"
python benchmarks/teacher.py --device cuda --json "$R/teacher-cuda.json" | tee "$R/teacher-cuda.txt"
python benchmarks/targets.py --device cuda --json "$R/targets-cuda.json" | tee "$R/targets-cuda.txt"
FAST=(device=cuda data.root="$DATA" precision=bf16 channels_last=true)
if [[ -z "${FULL:-}" ]]; then
    python benchmarks/stages.py --preset cifar10-2pct --out "$OUT" --json "$R/stages-cifar10-2pct-cuda.json" \
        "${FAST[@]}" "$@" | tee "$R/stages-cifar10-2pct-cuda.txt"
    exit 0
fi
mkdt run --preset cifar10-2pct --out "$OUT" "${FAST[@]}" "$@"
python - "$OUT/manifest.json" <<'PY'
import json, sys
stages = json.load(open(sys.argv[1]))["stages"]
for name, record in stages.items():
    print(f"{name:10s} {record.get('seconds', 0) or 0:9.1f} s")
print(f"{'total':10s} {sum(r.get('seconds', 0) or 0 for r in stages.values()):9.1f} s")
PY
