#!/usr/bin/env bash
# Fresh-clone timing of the embedded study on each instruction set: the numbers behind the README's table.
#
#   benchmarks/time_study.sh [REPO] [REV]     # REPO: path or URL (default: this checkout), REV (default: HEAD)
#   VARIANTS="default avx2" WORK=/tmp/ctpo-timing benchmarks/time_study.sh
#
# For each variant, one after the other (two at once would share the cores): clone REPO at REV into
# $WORK/<variant>, install exactly as the README's first command does, run `snakemake --cores all`, time both.
# Variants:
#   default   what the CPU offers (AVX-512 / AMX where present)
#   avx2      ATEN_CPU_CAPABILITY=avx2: torch's own vectorised kernels limited to AVX2 (the issue's emulation;
#             fp32 matmuls still go to MKL, which keeps using AVX-512)
#   avx2-all  ATen, MKL (MKL_ENABLE_INSTRUCTIONS=AVX2) and oneDNN (ONEDNN_MAX_CPU_ISA=AVX2) limited to AVX2:
#             the closest this machine gets to an AVX2-only host
# Run it on a quiet machine: every other process on the cores shows up in the times. It prints a table and
# leaves each clone's results/tiny/ (tables, logs, sft_summary.json) for the science comparison.
# Trying the script itself: SNAKEMAKE_ARGS="--configfile experiments/smoke.yaml" RESULTS=results/smoke.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REPO="${1:-$HERE}"
REV="${2:-HEAD}"
WORK="${WORK:-${TMPDIR:-/tmp}/ctpo-timing}"
VARIANTS="${VARIANTS:-default avx2 avx2-all}"
PYTHON="${PYTHON:-python3.11}"
RESULTS="${RESULTS:-results/tiny}"          # with SNAKEMAKE_ARGS="--configfile experiments/smoke.yaml": results/smoke
SNAKEMAKE_ARGS="${SNAKEMAKE_ARGS:-}"
if [[ -d "$REPO/.git" || -f "$REPO/.git" ]]; then
  REV="$(git -C "$REPO" rev-parse "$REV")"
fi

env_for() {
  case "$1" in
    default) echo "" ;;
    avx2) echo "ATEN_CPU_CAPABILITY=avx2" ;;
    avx2-all) echo "ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2" ;;
    *) echo "unknown variant $1 (default, avx2, avx2-all)" >&2; exit 2 ;;
  esac
}

clock() { printf '%d:%02d' $(($1 / 60)) $(($1 % 60)); }

mkdir -p "$WORK"
echo "ctpo study timing: $REPO @ $REV, variants: $VARIANTS, in $WORK"
echo "cpu: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; flags: $(grep -o -E 'avx512f|avx512_bf16|amx_tile|avx2' /proc/cpuinfo | sort -u | tr '\n' ' ')"
rows=()
for variant in $VARIANTS; do
  vars="$(env_for "$variant")"
  dir="$WORK/$variant"
  rm -rf "$dir"
  git clone -q "$REPO" "$dir"
  git -C "$dir" checkout -q "$REV"
  t0=$(date +%s)
  (cd "$dir" && "$PYTHON" -m venv .venv && . .venv/bin/activate \
    && pip install -q -c constraints-cpu.txt -e '.[dev]') > "$dir/install.log" 2>&1
  t1=$(date +%s)
  echo "[$variant] installed in $((t1 - t0)) s; running the study ($vars)"
  (cd "$dir" && . .venv/bin/activate && env $vars snakemake --cores all $SNAKEMAKE_ARGS) > "$dir/study.log" 2>&1 \
    || { echo "[$variant] the study failed: see $dir/study.log"; exit 1; }
  t2=$(date +%s)
  tok=$(cd "$dir" && RESULTS="$RESULTS" .venv/bin/python - <<'EOF'
import json, os, pathlib
out = []
for p in sorted(pathlib.Path(os.environ["RESULTS"], "base").glob("*/sft_summary.json")):
    s = json.loads(p.read_text())
    out.append(f"{s['model']} {s['tokens_per_s']:.0f}")
print(", ".join(out))
EOF
)
  rows+=("$(printf '| %-9s | %5s | %6s | %s |' "$variant" "$((t1 - t0)) s" "$(clock $((t2 - t1)))" "$tok")")
  echo "[$variant] study done in $(clock $((t2 - t1)))"
done

echo
echo "| variant   | install | study  | warm-up tokens/s (one thread each) |"
echo "|---|---|---|---|"
printf '%s\n' "${rows[@]}"
echo
for variant in $VARIANTS; do
  echo "== $variant: $WORK/$variant/$RESULTS/analysis/table2.md"
  sed -n '/^| Model/,$p' "$WORK/$variant/$RESULTS/analysis/table2.md"
done
