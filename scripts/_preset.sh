# Shared by scripts/<benchmark>.sh (sourced, not run): turns the options into the VLTUNE_* variables that
# presets/<benchmark>.py reads (vltune/runner/presets.py documents them), then runs parallel_runner.py on the preset.
# The sourcing script sets PRESET (the presets/ file name), DESCRIPTION and, optionally, EXTRA_HELP.
set -euo pipefail

usage() {
  cat <<HELP
usage: scripts/${PRESET}.sh [options] [-- parallel_runner.py options]

${DESCRIPTION}

Options (each can also be set by the environment variable in brackets):
  --data DIR              data root holding the CoOp dataset folders      [VLTUNE_DATA; default: data]
  --weights FILE          local CLIP weights file                         [VLTUNE_WEIGHTS; default: ~/.cache/clip]
  --backbone NAME         MODEL.BACKBONE.NAME                             [VLTUNE_BACKBONE; default: ViT-B/16]
  --gpus "IDS"            GPU ids, or cpu                                 [VLTUNE_GPUS; default: 0]
  --slots N               jobs at once per GPU                            [VLTUNE_SLOTS; default: 1]
  --methods "NAMES"       methods to run                                  [VLTUNE_METHODS; default: all with a config]
  --seeds "SEEDS"         seeds                                           [VLTUNE_SEEDS; default: 1 2 3]
  --shots "K ..."         shots per class                                 [VLTUNE_SHOTS]
  --datasets "NAMES"      only these datasets of the benchmark            [VLTUNE_DATASETS]
  --output DIR            output root (job folders, tables, report)       [VLTUNE_OUTPUT; default: output/<protocol>]
  --opts "KEY VALUE ..."  config overrides for every job                  [VLTUNE_OPTS]
${EXTRA_HELP:-}  --smoke                 a few minutes' check of the setup, offline on the CPU: the same methods
                          and configs on MiniBench stand-ins with the mini CLIP (generated under
                          --data on first use), one epoch, 1 seed; output/smoke/<protocol>  [VLTUNE_SMOKE=1]
  --dry-run               list the jobs without running them
  -h, --help              this help
Anything after -- is passed to parallel_runner.py (e.g. -- --rerun-failed, -- --plain).
HELP
}

need_value() {
  if [[ $# -lt 2 ]]; then
    echo "error: $1 needs a value" >&2
    usage >&2
    exit 2
  fi
}

runner_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --data) need_value "$@"; export VLTUNE_DATA="$2"; shift 2 ;;
    --weights) need_value "$@"; export VLTUNE_WEIGHTS="$2"; shift 2 ;;
    --backbone) need_value "$@"; export VLTUNE_BACKBONE="$2"; shift 2 ;;
    --gpus) need_value "$@"; export VLTUNE_GPUS="$2"; shift 2 ;;
    --slots) need_value "$@"; export VLTUNE_SLOTS="$2"; shift 2 ;;
    --methods) need_value "$@"; export VLTUNE_METHODS="$2"; shift 2 ;;
    --seeds) need_value "$@"; export VLTUNE_SEEDS="$2"; shift 2 ;;
    --shots) need_value "$@"; export VLTUNE_SHOTS="$2"; shift 2 ;;
    --datasets) need_value "$@"; export VLTUNE_DATASETS="$2"; shift 2 ;;
    --output) need_value "$@"; export VLTUNE_OUTPUT="$2"; shift 2 ;;
    --opts) need_value "$@"; export VLTUNE_OPTS="$2"; shift 2 ;;
    --start-layers) need_value "$@"; export VLTUNE_START_LAYERS="$2"; shift 2 ;;
    --top-ratios) need_value "$@"; export VLTUNE_TOP_RATIOS="$2"; shift 2 ;;
    --lambdas) need_value "$@"; export VLTUNE_LAMBDAS="$2"; shift 2 ;;
    --smoke) export VLTUNE_SMOKE=1; shift ;;
    --dry-run) runner_args+=(--dry-run); shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; runner_args+=("$@"); break ;;
    *) echo "error: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  PYTHON=python3
  if [[ -x "$REPO/.venv/bin/python" ]]; then
    PYTHON="$REPO/.venv/bin/python"
  fi
fi
exec "$PYTHON" "$REPO/parallel_runner.py" --config "$REPO/presets/${PRESET}.py" ${runner_args[@]+"${runner_args[@]}"}
