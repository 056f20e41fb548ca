#!/usr/bin/env bash
# The README's Performance comparison in one command: the PyTorch stack first
# (../shared/anchors/torch_anchor.py in its own virtual environment: Captum, Quantus, Zennit,
# torch's training loop), then `attrax-bench --against` its JSON, back to back on this machine.
#
#   bench/anchor_side_by_side.sh [OUT] [-- extra attrax-bench arguments]
#
# OUT (default results/side-by-side/<time>) receives
#   torch_cpu.json    the anchor's timings (its whole output folder is OUT/torch/)
#   torch.log         the anchor's log
#   attrax/           attrax-bench's output (rows.parquet, run.json, performance.md)
#   attrax_run.json   a copy of attrax/run.json
#   attrax.log        attrax-bench's progress log
#   against.md        the side-by-side table (PyTorch images/s, attrax images/s, ratio)
#   torch_cpu_after.json, torch_after.log, sandwich.md
#                     the anchor run again AFTER attrax (its folder OUT/torch_after/) and the table
#                     re-scored against both anchor runs (`attrax-bench --from-run OUT/attrax
#                     --against-after ...`: geometric mean, each run's ratio, the anchor's drift);
#                     SANDWICH=0 skips it
#
# Environment (all optional):
#   TORCH_PYTHON   the anchor venv's python (default /work/torchvenv/bin/python; set it up as in
#                  ../shared/anchors/README.md)
#   ANCHOR         the anchor script (default <repo>/../shared/anchors/torch_anchor.py)
#   ANCHOR_ARGS    extra anchor arguments, e.g. "--quick --wait-idle-s 0" for a smoke run
#   ATTRAX_BENCH   the benchmark command (default <repo>/.venv/bin/attrax-bench, else on PATH)
#   SANDWICH       1 (default): run the anchor a second time after attrax; 0: only before
#
# Run it on an idle machine: the anchor waits (up to 10 min) for other processes to leave the CPU
# idle and records their load per workload; a ratio holds only for figures of the same run.
# Smoke run: ANCHOR_ARGS="--quick --wait-idle-s 0" bench/anchor_side_by_side.sh /tmp/sbs -- --no-roar
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:-$ROOT/results/side-by-side/$(date +%Y%m%d-%H%M%S)}
[ $# -gt 0 ] && shift
[ "${1:-}" = "--" ] && shift
TORCH_PYTHON=${TORCH_PYTHON:-/work/torchvenv/bin/python}
ANCHOR=${ANCHOR:-$ROOT/../shared/anchors/torch_anchor.py}
if [ -z "${ATTRAX_BENCH:-}" ]; then
  if [ -x "$ROOT/.venv/bin/attrax-bench" ]; then ATTRAX_BENCH=$ROOT/.venv/bin/attrax-bench; else ATTRAX_BENCH=attrax-bench; fi
fi

die() { echo "anchor_side_by_side: error: $*" >&2; exit 2; }
[ -x "$TORCH_PYTHON" ] || die "no python at TORCH_PYTHON=$TORCH_PYTHON (set up the anchor venv as in ../shared/anchors/README.md)"
[ -f "$ANCHOR" ] || die "no anchor script at ANCHOR=$ANCHOR"
command -v "$ATTRAX_BENCH" >/dev/null 2>&1 || die "no benchmark command ATTRAX_BENCH=$ATTRAX_BENCH"
"$TORCH_PYTHON" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ('torch', 'captum', 'quantus', 'zennit')))" || die "$TORCH_PYTHON lacks torch/captum/quantus/zennit"

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
echo "== $(date -u +%FT%TZ) PyTorch stack: $TORCH_PYTHON $ANCHOR" >&2
# shellcheck disable=SC2086  # ANCHOR_ARGS is a list of words
"$TORCH_PYTHON" "$ANCHOR" --out-dir "$OUT/torch" ${ANCHOR_ARGS:-} 2>&1 | tee "$OUT/torch.log" >&2
cp "$OUT/torch/results/torch_cpu.json" "$OUT/torch_cpu.json"

echo "== $(date -u +%FT%TZ) attrax: $ATTRAX_BENCH --against $OUT/torch_cpu.json $*" >&2
"$ATTRAX_BENCH" --against "$OUT/torch_cpu.json" --out "$OUT/attrax" "$@" \
  2> >(tee "$OUT/attrax.log" >&2) > "$OUT/attrax.stdout"
cp "$OUT/attrax/run.json" "$OUT/attrax_run.json"
grep -v "performance.md$" "$OUT/attrax.stdout" > "$OUT/against.md" || true
cat "$OUT/against.md"
if [ "${SANDWICH:-1}" != 0 ]; then
  echo "== $(date -u +%FT%TZ) PyTorch stack again (after attrax): $TORCH_PYTHON $ANCHOR" >&2
  # shellcheck disable=SC2086
  "$TORCH_PYTHON" "$ANCHOR" --out-dir "$OUT/torch_after" ${ANCHOR_ARGS:-} 2>&1 | tee "$OUT/torch_after.log" >&2
  cp "$OUT/torch_after/results/torch_cpu.json" "$OUT/torch_cpu_after.json"
  "$ATTRAX_BENCH" --from-run "$OUT/attrax" --against-after "$OUT/torch_cpu_after.json" > "$OUT/sandwich.stdout"
  grep -v "sandwich.md$" "$OUT/sandwich.stdout" > "$OUT/sandwich.md" || true
  cat "$OUT/sandwich.md"
fi
echo "== $(date -u +%FT%TZ) done: $OUT (against.md, sandwich.md, torch_cpu.json, attrax/performance.md)" >&2
