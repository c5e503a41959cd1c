#!/usr/bin/env bash
# vast_startup.sh: set up csmcli on a fresh Linux GPU instance (Vast.ai, RunPod, a bare cloud VM).
#
#   git clone <this repo> && cd csmcli && ./vast_startup.sh
#
# Checks the machine, installs the system libraries, a venv, the torch build that matches the NVIDIA driver,
# csmcli itself (editable), downloads sesame/csm-1b when a Hugging Face token is available, then runs
# `csmcli info` and a short `csmcli bench`. Safe to run again: finished steps are detected from the real
# state (venv, importable torch, editable install pointing here) and skipped. Run with --help for flags.
#
# Torch wheel index, picked from the "CUDA Version" that nvidia-smi reports (the newest CUDA the driver runs):
#
#   driver CUDA   index   notes
#   >= 13.2       cu132   default CUDA of torch 2.14+
#   13.0 - 13.1   cu130
#   12.8 - 12.9   cu128   torch 2.11 is the last release built for 12.8; needed for Blackwell on 570/575 drivers
#   12.0 - 12.7   cu126   legacy build (Maxwell..Hopper); below 12.6 it relies on CUDA minor-version compatibility
#   < 12.0        -       stop: torch >= 2.11 has no build for this driver
#
# Exit status: 0 when every requested step worked (a skipped or gated model download is not a failure),
# 1 when a step failed (the summary says which), 2 for a bad command line.

set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
readonly REPO_DIR
readonly MODEL_ID="sesame/csm-1b"
readonly MODEL_URL="https://huggingface.co/${MODEL_ID}"
readonly MIN_PYTHON="3.11"
readonly MIN_TORCH="2.11"
readonly MIN_FREE_GB=20
readonly STEP_TOTAL=9
readonly TORCH_INDEX_BASE="https://download.pytorch.org/whl"
# Shared libraries behind `sounddevice` (playback) and `soundfile` (WAV/FLAC files).
readonly SYSTEM_PACKAGES=(libportaudio2 libsndfile1)

CPU_MODE=0
NO_MODEL=0
SKIP_BENCH=0
VENV_DIR=""
VENV_PY=""
PYTHON_BIN=""
APT_UPDATED=0
DRIVER_CUDA=""
GPU_LINES=""
MODEL_READY=0
FAILED=0
STEP_NO=0
STEP_NAME=""
LOG_FILE=""
TEE_PID=""
ARGS_TEXT=""
TORCH_INDEX=""
DONE=0
SUMMARY=()
EXTRA_APT_PACKAGES=()

usage() {
  cat <<EOF
Usage: ./vast_startup.sh [--cpu] [--no-model] [--venv PATH] [--skip-bench] [--help]

Sets up csmcli on this machine: checks, system libraries, venv, torch for your driver, csmcli, the
${MODEL_ID} weights (if your Hugging Face token has access), then \`csmcli info\` and a short benchmark.
Running it again is fast and changes nothing that is already in place.

Flags:
  --cpu          no GPU needed: install the CPU build of torch (slow generation; fine for trying the CLI)
  --no-model     do not download ${MODEL_ID} (csmcli still works with --random-weights)
  --venv PATH    where to create the venv (default: /workspace/csmcli-venv if /workspace exists, else .venv
                 in the repo)
  --skip-bench   do not run the short benchmark at the end
  -h, --help     show this help

Environment:
  HF_TOKEN           Hugging Face token with access to ${MODEL_ID} (or log in once: hf auth login)
  HF_HOME            Hugging Face cache (default: <workspace>/hf when the workspace dir exists)
  TORCH_SPEC         torch requirement to install (default: "torch>=${MIN_TORCH}"), e.g. torch==2.13.0
  TORCH_INDEX_URL    wheel index for torch (default: picked from the driver's CUDA version, or the CPU index
                     with --cpu); "default" means pip's own configured sources (PyPI, pip.conf): with --cpu,
                     pin a CPU wheel in TORCH_SPEC then, or PyPI's multi-GB CUDA build comes instead
  CSMCLI_PYTHON      Python >= ${MIN_PYTHON} to build the venv with (default: first found on PATH)
  CSMCLI_WORKSPACE   the large-disk directory (default: /workspace)
  CSMCLI_LOG         log file (default: <repo>/vast_startup.log)
  CSMCLI_SKIP_APT=1  never call apt-get; only print which system packages are missing
  CSMCLI_BENCH_FRAMES  frames for the short benchmark (default: 50 on a GPU; 10 with --cpu, on a tiny model)
EOF
}

# ---- output helpers ------------------------------------------------------------------------------------------------

say() { printf '    %s\n' "$*"; }
warn() { printf '    WARNING: %s\n' "$*"; }
die() {
  printf '\nERROR: %s\n' "$1"
  shift
  local line
  for line in "$@"; do printf '       %s\n' "$line"; done
  exit 1
}

# Summary lines: "ok", "skip", "warn", "FAIL" and a short text.
record() { SUMMARY+=("$(printf '%-5s %s' "$1" "$2")"); }

run_step() {
  local title=$1 start=$SECONDS
  shift
  STEP_NO=$((STEP_NO + 1))
  STEP_NAME=$title
  printf '\n==> [%d/%d] %s\n' "$STEP_NO" "$STEP_TOTAL" "$title"
  "$@"
  printf '    (%s: %ds)\n' "$title" $((SECONDS - start))
}

parse_args() {
  while (($# > 0)); do
    case $1 in
      --cpu) CPU_MODE=1 ;;
      --no-model) NO_MODEL=1 ;;
      --skip-bench) SKIP_BENCH=1 ;;
      --venv)
        [[ $# -ge 2 && -n $2 ]] || { echo "--venv needs a path" >&2; exit 2; }
        VENV_DIR=$2
        shift
        ;;
      --venv=*) VENV_DIR=${1#--venv=} ;;
      -h | --help) usage; exit 0 ;;
      *) printf 'Unknown argument: %s\n\n' "$1" >&2; usage >&2; exit 2 ;;
    esac
    shift
  done
}

setup_log() {
  LOG_FILE=${CSMCLI_LOG:-$REPO_DIR/vast_startup.log}
  if mkdir -p "$(dirname "$LOG_FILE")" 2>/dev/null && touch "$LOG_FILE" 2>/dev/null; then
    exec > >(tee -a "$LOG_FILE") 2>&1
    TEE_PID=$!
  else
    echo "WARNING: cannot write the log file $LOG_FILE; output goes to the terminal only" >&2
    LOG_FILE=""
  fi
  printf '\n=== vast_startup.sh %s | %s | args: %s\n' "$(date '+%Y-%m-%d %H:%M:%S')" "$REPO_DIR" "${ARGS_TEXT:-none}"
}

on_exit() {
  local rc=$?
  if ((rc != 0 && !DONE)); then
    printf '\nvast_startup.sh stopped in step "%s" (exit %d).\n' "${STEP_NAME:-start}" "$rc"
    [[ -n $LOG_FILE ]] && printf 'Full log: %s\n' "$LOG_FILE"
    printf 'Fix the cause and run it again: finished steps are skipped.\n'
  fi
  if [[ -n $TEE_PID ]]; then
    # Let tee write the last lines before the shell prompt comes back.
    exec 1>&- 2>&-
    wait "$TEE_PID" 2>/dev/null || true
  fi
}

# ---- step 1: checks ------------------------------------------------------------------------------------------------

# The newest CUDA version the driver supports, as "MAJOR.MINOR", from the nvidia-smi banner.
driver_cuda_version() {
  nvidia-smi 2>/dev/null | sed -n '/CUDA Version:/{s/.*CUDA Version: *\([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p;q;}'
}

# "12.8" -> 1208, so versions compare as integers.
cuda_number() {
  [[ $1 =~ ^([0-9]+)\.([0-9]+) ]] || return 1
  echo $((10#${BASH_REMATCH[1]} * 100 + 10#${BASH_REMATCH[2]}))
}

# Torch wheel tag for a driver CUDA version (see the table at the top); fails below 12.0.
torch_cuda_tag() {
  local n
  n=$(cuda_number "$1") || return 1
  if ((n >= 1302)); then echo cu132
  elif ((n >= 1300)); then echo cu130
  elif ((n >= 1208)); then echo cu128
  elif ((n >= 1200)); then echo cu126
  else return 1
  fi
}

python_ok() { "$1" -c "import sys; sys.exit(sys.version_info < (${MIN_PYTHON/./, }))" >/dev/null 2>&1; }

# First Python >= MIN_PYTHON: $CSMCLI_PYTHON if set, else python3, then newer versions first.
find_python() {
  local candidate
  if [[ -n ${CSMCLI_PYTHON:-} ]]; then
    python_ok "$CSMCLI_PYTHON" && { command -v "$CSMCLI_PYTHON"; return 0; }
    return 1
  fi
  for candidate in python3 python3.14 python3.13 python3.12 python3.11; do
    if command -v "$candidate" >/dev/null 2>&1 && python_ok "$candidate"; then
      command -v "$candidate"
      return 0
    fi
  done
  return 1
}

check_platform() {
  local os arch
  os=$(uname -s)
  arch=$(uname -m)
  [[ $os == Linux ]] || die "This script is for Linux (found $os)." \
    "On macOS or Windows install by hand: pip install torch && pip install -e ."
  [[ $arch == x86_64 ]] || die "This script is for x86-64 Linux (found $arch)." \
    "Install by hand: python3 -m venv .venv && .venv/bin/pip install torch && .venv/bin/pip install -e ."
  say "Linux $arch, $(nproc) CPU cores"
}

check_gpu() {
  local smi_out
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    no_gpu "nvidia-smi is not installed, so there is no usable NVIDIA driver."
    return
  fi
  if ! smi_out=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1) \
    || [[ -z $smi_out ]]; then
    no_gpu "nvidia-smi found no GPU: $(head -n 1 <<<"$smi_out")"
    return
  fi
  GPU_LINES=$smi_out
  DRIVER_CUDA=$(driver_cuda_version || true)
  local line
  while IFS= read -r line; do say "GPU: $line"; done <<<"$GPU_LINES"
  if ((CPU_MODE)); then
    say "CPU mode (--cpu): the GPU is ignored and the CPU build of torch is installed."
    record ok "CPU mode (--cpu), GPU ignored"
    return
  fi
  [[ -n $DRIVER_CUDA ]] || die "nvidia-smi does not report a 'CUDA Version'; cannot pick a torch build." \
    "Set TORCH_INDEX_URL (e.g. ${TORCH_INDEX_BASE}/cu130) and run again."
  say "Driver supports CUDA up to $DRIVER_CUDA"
  record ok "GPU: $(head -n 1 <<<"$GPU_LINES"); driver CUDA $DRIVER_CUDA"
}

no_gpu() {
  local reason=$1
  if ((CPU_MODE)); then
    say "No NVIDIA GPU: $reason"
    say "CPU mode (--cpu): installing the CPU build of torch. Generation is far slower than real time;"
    say "good for trying the CLI, tests and --random-weights. Use a GPU instance for real speech."
    record ok "CPU mode (--cpu): no NVIDIA GPU on this machine"
    return
  fi
  die "No NVIDIA GPU: $reason" \
    "csmcli is built for CUDA GPUs. On Vast.ai, rent a GPU instance (the template must expose the GPU" \
    "to the container; nvidia-smi should list it). Nothing has been installed." \
    "To install anyway for CPU only (slow, for trying the CLI): $0 --cpu"
}

# PATH itself, or its nearest ancestor that exists.
existing_parent() {
  local path=$1
  while [[ ! -e $path && $path != / ]]; do path=$(dirname "$path"); done
  printf '%s\n' "$path"
}

# "FREE_GB MOUNT_POINT" for the filesystem that holds PATH (or would, once created).
disk_free() {
  df -Pk "$(existing_parent "$1")" | awk 'NR == 2 { printf "%.1f %s\n", $4 / 1048576, $6 }'
}

check_disk() {
  local dir gb mount_key seen=" "
  for dir in "$VENV_DIR" "$(hf_home_target)"; do
    [[ -n $dir ]] || continue
    read -r gb mount_key < <(disk_free "$dir") || continue
    [[ $seen == *" $mount_key "* ]] && continue
    seen+="$mount_key "
    if awk -v gb="$gb" -v min="$MIN_FREE_GB" 'BEGIN { exit !(gb < min) }'; then
      warn "only ${gb} GB free on $mount_key (for $dir); csmcli needs about ${MIN_FREE_GB} GB:" \
        "torch with CUDA libraries ~7 GB, ${MODEL_ID} ~6 GB, plus pip's downloads. Continuing."
      record warn "low disk: ${gb} GB free on $mount_key (want >= ${MIN_FREE_GB} GB)"
    else
      say "Disk: ${gb} GB free on $mount_key (for $dir)"
    fi
  done
}

check_python() {
  if PYTHON_BIN=$(find_python); then
    say "Python: $PYTHON_BIN ($("$PYTHON_BIN" -c 'import platform; print(platform.python_version())'))"
    if ! "$PYTHON_BIN" -c 'import ensurepip, venv' >/dev/null 2>&1; then
      local pkg
      pkg="python$("$PYTHON_BIN" -c 'import sys; print("%d.%d" % sys.version_info[:2])')-venv"
      say "$PYTHON_BIN cannot create venvs yet (Debian/Ubuntu package $pkg missing)"
      EXTRA_APT_PACKAGES+=("$pkg")
    fi
    return
  fi
  local pkg
  if [[ -z ${CSMCLI_PYTHON:-} ]] && apt_runner >/dev/null && pkg=$(apt_python_package); then
    say "No Python >= $MIN_PYTHON on PATH; $pkg will be installed with apt."
    EXTRA_APT_PACKAGES+=("$pkg" "$pkg-venv")
    return
  fi
  die "No Python >= $MIN_PYTHON found${CSMCLI_PYTHON:+ (CSMCLI_PYTHON=$CSMCLI_PYTHON is older or missing)}." \
    "Install one, e.g. 'apt-get install python3.11 python3.11-venv' (Ubuntu 22.04: universe;" \
    "or the deadsnakes PPA), or 'uv python install 3.12', then run again with CSMCLI_PYTHON=/path/to/python3."
}

check_machine() {
  check_platform
  check_gpu
  check_python
  resolve_venv_dir
  check_disk
}

# ---- step 2: system packages ---------------------------------------------------------------------------------------

# How to run apt-get as root: prints "root", "sudo", or fails when neither works without a password.
apt_runner() {
  command -v apt-get >/dev/null 2>&1 || return 1
  if [[ $(id -u) == 0 ]]; then echo root
  elif command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1; then echo sudo
  else return 1
  fi
}

apt_candidate() {
  local candidate
  candidate=$(apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ { print $2 }')
  [[ -n $candidate && $candidate != "(none)" ]] && printf '%s\n' "$candidate"
}

# apt-get with these arguments as root (directly, or through passwordless sudo), never asking questions.
apt_as_root() {
  local runner
  runner=$(apt_runner) || return 1
  if [[ $runner == sudo ]]; then
    sudo -n env DEBIAN_FRONTEND=noninteractive apt-get "$@"
  else
    DEBIAN_FRONTEND=noninteractive apt-get "$@"
  fi
}

# apt-get update once (images ship without package lists: no package has a candidate before it).
apt_update() {
  [[ $APT_UPDATED == 1 ]] && return 0
  apt_as_root update -qq && APT_UPDATED=1
}

# The apt package of a Python >= MIN_PYTHON: python3 where it is new enough (Debian 12, Ubuntu 24.04), else
# python3.11 (Ubuntu 22.04, universe); fails when neither is available.
apt_python_package() {
  apt_update || return 1
  local version
  if version=$(apt_candidate python3); then
    version=${version#*:}  # an epoch, if any
    version=$(printf '%s' "${version%%-*}" | cut -d. -f1,2)
    if printf '%s\n%s\n' "$MIN_PYTHON" "$version" | sort -V -C; then
      echo python3
      return 0
    fi
  fi
  apt_candidate python3.11 >/dev/null && echo python3.11
}

# The Debian packages among the arguments that are not installed.
missing_packages() {
  local pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || printf '%s\n' "$pkg"
  done
}

install_system_packages() {
  if ! command -v dpkg-query >/dev/null 2>&1; then
    warn "not a Debian/Ubuntu system: install PortAudio and libsndfile with your package manager"
    record warn "system libraries not checked (no dpkg): install PortAudio and libsndfile yourself"
    return
  fi
  local missing=() runner
  mapfile -t missing < <(missing_packages "${SYSTEM_PACKAGES[@]}" "${EXTRA_APT_PACKAGES[@]}")
  if ((${#missing[@]} == 0)); then
    say "already installed: ${SYSTEM_PACKAGES[*]}"
    record ok "system libraries present"
    return
  fi
  if [[ ${CSMCLI_SKIP_APT:-0} == 1 ]]; then
    say "CSMCLI_SKIP_APT=1: not installing ${missing[*]}"
    record warn "missing system packages (not installed, CSMCLI_SKIP_APT=1): ${missing[*]}"
    return
  fi
  if ! runner=$(apt_runner); then
    warn "missing ${missing[*]} and no root or passwordless sudo to install them."
    say "Ask an admin to run: sudo apt-get install -y ${missing[*]}"
    record warn "missing system packages: ${missing[*]} (sudo apt-get install -y ${missing[*]})"
    return
  fi
  say "installing ${missing[*]} (apt-get as $runner)"
  if apt_update && apt_as_root install -y -qq --no-install-recommends "${missing[@]}"; then
    record ok "installed system packages: ${missing[*]}"
  else
    warn "apt-get failed; playback (PortAudio) or audio files may not work until ${missing[*]} are installed"
    record warn "apt-get install ${missing[*]} failed"
  fi
}

# ---- step 3: venv --------------------------------------------------------------------------------------------------

workspace_dir() {
  local ws=${CSMCLI_WORKSPACE:-/workspace}
  [[ -d $ws && -w $ws ]] && printf '%s\n' "$ws"
}

resolve_venv_dir() {
  if [[ -z $VENV_DIR ]]; then
    local ws
    if ws=$(workspace_dir); then VENV_DIR="$ws/csmcli-venv"; else VENV_DIR="$REPO_DIR/.venv"; fi
  fi
  VENV_DIR=$(realpath -m -- "$VENV_DIR")
  VENV_PY="$VENV_DIR/bin/python"
  say "venv: $VENV_DIR"
}

venv_works() { [[ -x $VENV_PY ]] && "$VENV_PY" -m pip --version >/dev/null 2>&1; }

setup_venv() {
  if venv_works; then
    python_ok "$VENV_PY" || die "$VENV_DIR holds a venv with Python older than $MIN_PYTHON." \
      "Remove it or choose another place with --venv PATH."
    say "venv already exists at $VENV_DIR ($("$VENV_PY" -V 2>&1))"
    record ok "venv $VENV_DIR ($("$VENV_PY" -V 2>&1))"
    return
  fi
  local clear=()
  if [[ -f $VENV_DIR/pyvenv.cfg ]]; then
    say "$VENV_DIR is a broken venv (no working pip): recreating it"
    clear=(--clear)
  elif [[ -e $VENV_DIR && -n $(ls -A "$VENV_DIR" 2>/dev/null) ]]; then
    die "$VENV_DIR exists and is not a venv; choose another place with --venv PATH."
  fi
  [[ -n $PYTHON_BIN ]] || PYTHON_BIN=$(find_python) || die "No Python >= $MIN_PYTHON after installing packages."
  say "creating venv with $PYTHON_BIN"
  "$PYTHON_BIN" -m venv "${clear[@]}" "$VENV_DIR" || die "could not create the venv at $VENV_DIR." \
    "On Debian/Ubuntu install the venv module: apt-get install python3-venv (or python3.X-venv)."
  record ok "created venv $VENV_DIR ($("$VENV_PY" -V 2>&1))"
}

# ---- step 4: Hugging Face cache ------------------------------------------------------------------------------------

# Where HF_HOME should live: the user's choice, else <workspace>/hf, else empty (huggingface_hub's default).
hf_home_target() {
  local ws
  if [[ -n ${HF_HOME:-} ]]; then printf '%s\n' "$HF_HOME"
  elif ws=$(workspace_dir); then printf '%s\n' "$ws/hf"
  fi
}

setup_hf_home() {
  local target marker="# csmcli: Hugging Face cache on the large disk (added by vast_startup.sh)"
  target=$(hf_home_target)
  if [[ -z $target ]]; then
    say "HF_HOME not set and no workspace dir: using huggingface_hub's default (~/.cache/huggingface)"
    record ok "Hugging Face cache: ~/.cache/huggingface (default)"
    return
  fi
  export HF_HOME=$target
  mkdir -p "$HF_HOME"
  # A token saved by `hf auth login` before HF_HOME moved would otherwise be invisible.
  local old_token="$HOME/.cache/huggingface/token"
  if [[ ! -e $HF_HOME/token && -f $old_token && $old_token != "$HF_HOME/token" ]]; then
    install -m 600 "$old_token" "$HF_HOME/token"
    say "copied your saved Hugging Face token to $HF_HOME/token"
  fi
  local line activate="$VENV_DIR/bin/activate"
  line=$(printf 'export HF_HOME=%q' "$HF_HOME")
  if grep -qxF "$line" "$activate" 2>/dev/null; then
    say "HF_HOME=$HF_HOME already set in $activate"
  else
    if grep -qxF "$marker" "$activate" 2>/dev/null; then  # an earlier run chose another cache: its lines go
      local kept
      kept=$(awk -v marker="$marker" '$0 == marker { drop = 1; next } drop { drop = 0; next } { print }' "$activate")
      printf '%s\n' "$kept" >"$activate"
    fi
    printf '\n%s\n%s\n' "$marker" "$line" >>"$activate"
    say "HF_HOME=$HF_HOME (set in $activate)"
  fi
  record ok "Hugging Face cache: HF_HOME=$HF_HOME"
}

# ---- step 5: torch -------------------------------------------------------------------------------------------------

torch_spec() { printf '%s\n' "${TORCH_SPEC:-torch>=$MIN_TORCH}"; }

# Sets TORCH_INDEX, the index to install torch from; empty = pip's configured sources (TORCH_INDEX_URL=default).
pick_torch_index() {
  local tag
  case ${TORCH_INDEX_URL:-} in
    default) TORCH_INDEX=""; return ;;
    "") ;;
    *) TORCH_INDEX=$TORCH_INDEX_URL; return ;;
  esac
  if ((CPU_MODE)); then
    TORCH_INDEX="$TORCH_INDEX_BASE/cpu"
    return
  fi
  tag=$(torch_cuda_tag "$DRIVER_CUDA") || die "The driver supports only CUDA $DRIVER_CUDA;" \
    "torch >= $MIN_TORCH needs a driver for CUDA 12.x or newer (driver >= 525; 580+ for CUDA 13)." \
    "Pick an instance with a newer driver, or run with --cpu."
  if (($(cuda_number "$DRIVER_CUDA") < 1206)); then
    warn "driver CUDA $DRIVER_CUDA is older than torch's oldest build (12.6); trying cu126 through CUDA" \
      "minor-version compatibility. If the GPU check below fails, use an instance with a newer driver."
  fi
  TORCH_INDEX="$TORCH_INDEX_BASE/$tag"
}

# Exit 0 and print a description when the venv's torch is good enough; else exit 1 with the reason.
torch_status() {
  # -W ignore: torch warns on import when numpy is not installed yet (first run, before csmcli).
  "$VENV_PY" -W ignore - "$(torch_spec)" "$MIN_TORCH" "$((1 - CPU_MODE))" <<'PY' 2>&1
import sys
from importlib.metadata import PackageNotFoundError, version

spec, min_torch, need_cuda = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
try:
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.version import Version
except ImportError:  # a fresh venv has only pip's vendored copy
    from pip._vendor.packaging.requirements import InvalidRequirement, Requirement
    from pip._vendor.packaging.version import Version
try:
    installed = Version(version("torch"))
except PackageNotFoundError:
    sys.exit("torch is not installed")
if installed.release < Version(min_torch).release:
    sys.exit(f"torch {installed} is older than {min_torch}")
try:
    if not Requirement(spec).specifier.contains(installed, prereleases=True):
        sys.exit(f"torch {installed} does not match TORCH_SPEC={spec}")
except InvalidRequirement:
    pass  # a wheel path or URL: trust what is installed
import torch

if need_cuda and torch.version.cuda is None:
    sys.exit(f"torch {installed} is a CPU-only build")
if need_cuda and not torch.cuda.is_available():
    sys.exit(f"torch {installed} (CUDA {torch.version.cuda}) cannot use the GPU")
print(f"torch {torch.__version__}, " + (f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"))
PY
}

# After installing: can torch run a kernel on the GPU? Prints torch facts, or the error on failure.
torch_gpu_probe() {
  "$VENV_PY" - <<'PY' 2>&1
import torch

print(f"torch {torch.__version__} built for CUDA {torch.version.cuda}")
if not torch.cuda.is_available():
    raise SystemExit("torch.cuda.is_available() is False")
torch.ones(1, device="cuda").add_(1)  # "no kernel image" shows up here when the GPU is newer than the wheel
print(f"GPU ok: {torch.cuda.get_device_name(0)}")
PY
}

install_torch() {
  local status spec
  if status=$(torch_status); then
    say "torch already installed: $status"
    record ok "$status"
    return
  fi
  say "$status"
  if "$VENV_PY" -m pip show torch >/dev/null 2>&1; then
    say "removing the unsuitable torch first"
    "$VENV_PY" -m pip uninstall -y -q torch
  fi
  spec=$(torch_spec)
  pick_torch_index
  local args=(install --no-cache-dir "$spec") from="pip's configured sources"  # no 2nd multi-GB copy in the cache
  if [[ -n $TORCH_INDEX ]]; then
    args+=(--index-url "$TORCH_INDEX")
    from=$TORCH_INDEX
  fi
  say "Installing $spec from $from"
  "$VENV_PY" -m pip "${args[@]}" || die "pip could not install $spec from $from." \
    "Check the network and disk space, or choose a build with TORCH_INDEX_URL / TORCH_SPEC."
  verify_torch
}

verify_torch() {
  local out
  if ((CPU_MODE)); then
    out=$("$VENV_PY" -W ignore -c 'import torch; print(f"torch {torch.__version__}, CPU")' 2>&1) \
      || die "torch was installed but does not import: $out"
    say "$out"
    record ok "$out"
    return
  fi
  if out=$(torch_gpu_probe); then
    say "$out"
    record ok "$(head -n 1 <<<"$out"), $(tail -n 1 <<<"$out")"
    return
  fi
  die "torch cannot use the GPU. $(tail -n 1 <<<"$out")." \
    "torch: $(head -n 1 <<<"$out"); driver: $(head -n 1 <<<"$GPU_LINES" | cut -d, -f3 | xargs)," \
    "supports CUDA $DRIVER_CUDA. Usually the wheel's CUDA is newer than the driver, or the GPU is newer than" \
    "the wheel. Fix: run again with TORCH_INDEX_URL=$TORCH_INDEX_BASE/cuXYZ matching nvidia-smi's 'CUDA" \
    "Version' (see the table at the top of this script), or rent a host with a newer driver."
}

# ---- step 6: csmcli ------------------------------------------------------------------------------------------------

pyproject_hash() { sha256sum "$REPO_DIR/pyproject.toml" | cut -d' ' -f1; }

# Real state, not a stamp alone: editable install pointing at this repo, importable, entry point present,
# and installed from the current pyproject.toml (a pull that adds a dependency triggers a reinstall).
csmcli_installed() {
  local location
  location=$("$VENV_PY" -m pip show csmcli 2>/dev/null | sed -n 's/^Editable project location: //p')
  [[ -n $location && $(realpath -m -- "$location") == "$REPO_DIR" ]] || return 1
  [[ -x $VENV_DIR/bin/csmcli ]] || return 1
  [[ $(cat "$VENV_DIR/.csmcli-pyproject.sha256" 2>/dev/null) == "$(pyproject_hash)" ]] || return 1
  "$VENV_PY" -c 'import csmcli' >/dev/null 2>&1
}

install_csmcli() {
  [[ -f $REPO_DIR/pyproject.toml ]] || die "$REPO_DIR/pyproject.toml is missing: is this a csmcli checkout?"
  if csmcli_installed; then
    say "csmcli already installed (editable, from $REPO_DIR)"
  else
    say "pip install -e $REPO_DIR"
    "$VENV_PY" -m pip install -e "$REPO_DIR" || die "pip install -e $REPO_DIR failed (see the pip output above)."
    pyproject_hash >"$VENV_DIR/.csmcli-pyproject.sha256"
  fi
  # transformers breaks when a torchaudio built for another CUDA sits beside torch; csmcli does not use it.
  if "$VENV_PY" -m pip show torchaudio >/dev/null 2>&1; then
    say "removing torchaudio (not used by csmcli; a mismatched build breaks transformers imports)"
    "$VENV_PY" -m pip uninstall -y -q torchaudio
  fi
  record ok "csmcli $("$VENV_PY" -c 'import csmcli; print(csmcli.__version__)') (editable, $VENV_DIR/bin/csmcli)"
}

# ---- step 7: model -------------------------------------------------------------------------------------------------

# The same test as `csmcli info`: config.json and weights in the local cache. Never touches the network.
model_cached() {
  HF_HUB_OFFLINE=1 "$VENV_PY" - "$MODEL_ID" <<'PY' >/dev/null 2>&1
import sys

from huggingface_hub import try_to_load_from_cache

repo = sys.argv[1]
found = [try_to_load_from_cache(repo, f) for f in ("config.json", "model.safetensors", "model.safetensors.index.json")]
sys.exit(0 if isinstance(found[0], str) and any(isinstance(f, str) for f in found[1:]) else 1)
PY
}

hf_cli() {
  if [[ -x $VENV_DIR/bin/hf ]]; then "$VENV_DIR/bin/hf" "$@"; else "$VENV_DIR/bin/huggingface-cli" "$@"; fi
}

token_source() {
  if [[ -n ${HF_TOKEN:-} ]]; then echo "HF_TOKEN"
  elif hf_cli auth whoami >/dev/null 2>&1; then echo "saved login (hf auth login)"
  else return 1
  fi
}

fetch_model() {
  if model_cached; then
    MODEL_READY=1
    say "$MODEL_ID already in the cache"
    record ok "model $MODEL_ID cached"
    return
  fi
  if ((NO_MODEL)); then
    say "--no-model: not downloading $MODEL_ID; csmcli works with --random-weights meanwhile"
    record skip "model download (--no-model)"
    return
  fi
  local from
  if ! from=$(token_source); then
    say "No Hugging Face token: skipping $MODEL_ID (it is gated). To get it:"
    license_help
    record skip "model: no Hugging Face token (accept the license, then hf auth login and run again)"
    return
  fi
  say "downloading $MODEL_ID with the token from $from (~6 GB)"
  download_model
}

license_help() {
  say "  1. accept the license at $MODEL_URL (logged in to Hugging Face)"
  say "  2. hf auth login   (or: export HF_TOKEN=hf_...)"
  say "  3. run ./vast_startup.sh again (finished steps are skipped)"
}

download_model() {
  local out rc
  out=$(mktemp)
  # ckpt.pt is the original-format duplicate of model.safetensors; csmcli loads the HF format.
  set +e
  hf_cli download "$MODEL_ID" --exclude '*.pt' 2>&1 | tee "$out"
  rc=${PIPESTATUS[0]}
  set -e
  # 401 first: an unauthenticated request to a gated repo also mentions "gated" and "restricted".
  if ((rc == 0)); then
    MODEL_READY=1
    record ok "model $MODEL_ID downloaded"
  elif grep -qiE '\b401\b|unauthorized|invalid (user )?token|invalid credentials|not logged in' "$out"; then
    warn "Hugging Face rejected the token (expired or mistyped). Create one at" \
      "https://huggingface.co/settings/tokens, then: hf auth login (or export HF_TOKEN=...)"
    record warn "model: token rejected (401)"
  elif grep -qiE '\b403\b|forbidden|gated|awaiting|not in the authorized list|restricted' "$out"; then
    warn "Hugging Face refused the download: your account has not been granted access to $MODEL_ID."
    license_help
    say "  (a fine-grained token also needs 'Read access to contents of all public gated repos')"
    record warn "model: access to $MODEL_ID not granted yet (accept the license at $MODEL_URL)"
  else
    warn "the download of $MODEL_ID failed (exit $rc; see above). Network or disk? Run again to resume."
    record warn "model: download failed (exit $rc); run again to resume"
  fi
  rm -f "$out"
}

# ---- steps 8-9: info and bench -------------------------------------------------------------------------------------

run_info() {
  if "$VENV_DIR/bin/csmcli" info; then
    record ok "csmcli info works"
  else
    FAILED=1
    record FAIL "csmcli info failed (see above)"
  fi
}

run_bench() {
  if ((SKIP_BENCH)); then
    say "--skip-bench: skipped"
    record skip "benchmark (--skip-bench)"
    return
  fi
  local frames args
  frames=${CSMCLI_BENCH_FRAMES:-$((CPU_MODE ? 10 : 50))}
  args=(bench --frames "$frames")
  # On a CPU the full-size model takes minutes per run and its numbers mean nothing: --tiny checks the path.
  if ((CPU_MODE)); then args+=(--tiny)
  elif ((!MODEL_READY)); then args+=(--random-weights)
  fi
  say "csmcli ${args[*]}"
  if "$VENV_DIR/bin/csmcli" "${args[@]}"; then
    record ok "benchmark: csmcli ${args[*]}"
  else
    FAILED=1
    record FAIL "benchmark failed: csmcli ${args[*]} (see above)"
  fi
}

print_summary() {
  local line weights=""
  # random weights come without a tokenizer: say / stream need --tokenizer DIR (a Llama-3 tokenizer.json) too
  ((MODEL_READY)) || weights=" --random-weights --tokenizer DIR"
  printf '\n==> Summary (%ds%s)\n' "$SECONDS" "${LOG_FILE:+, log: $LOG_FILE}"
  for line in "${SUMMARY[@]}"; do printf '    %s\n' "$line"; done
  printf '\nNext (in a new shell, activate the venv first):\n'
  printf '    source %q\n' "$VENV_DIR/bin/activate"
  printf '    csmcli say "Hello there."%s -o hello.wav\n' "$weights"
  printf '    csmcli stream "Hello there."%s   # plays as it is made; headless: --no-play -o out.wav\n' "$weights"
  printf '    csmcli bench%s\n' "${weights% --tokenizer DIR}"
  if ((!MODEL_READY)); then
    printf '\nReal speech needs the %s weights: accept the license at %s,\n' "$MODEL_ID" "$MODEL_URL"
    printf '%s\n' "run 'hf auth login' (or export HF_TOKEN=...), then ./vast_startup.sh again."
  fi
  if ((FAILED)); then printf '\nSome steps FAILED (see above).\n'; else printf '\nAll done.\n'; fi
}

main() {
  parse_args "$@"
  ARGS_TEXT="$*"
  trap on_exit EXIT
  setup_log
  run_step "Checking the machine" check_machine
  run_step "System packages" install_system_packages
  run_step "Python venv" setup_venv
  run_step "Hugging Face cache" setup_hf_home
  run_step "PyTorch" install_torch
  run_step "csmcli" install_csmcli
  run_step "Model weights ($MODEL_ID)" fetch_model
  run_step "csmcli info" run_info
  run_step "Benchmark" run_bench
  STEP_NAME="summary"
  print_summary
  DONE=1
  return "$FAILED"
}

# Sourcing the file (the tests do) defines the functions without running anything.
if ! (return 0 2>/dev/null); then
  main "$@"
fi
