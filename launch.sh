#!/usr/bin/env bash
# ptx launcher.
#   ./launch.sh setup                 create .venv from requirements.txt (PTX_JAX_EXTRA=tpu|cuda12 adds jax[extra])
#   ./launch.sh quickstart [flags]    the embedded default, end to end, into runs/quickstart
#   ./launch.sh test [--fast] [pytest args]
#                                     ruff, then the test suite (--fast: unit tests only, no whole-stage runs)
#   ./launch.sh bench [flags]         the benchmark suite (see bench/main.py)
#   ./launch.sh bench-accelerator     bench + a 1B shape in bfloat16 on a GPU / TPU (bench/accelerator.py)
#   ./launch.sh CONFIG [flags]        one config locally, e.g. configs/sft.py:tiny --workdir=runs/sft
#   ./launch.sh --tpu NAME --zone Z [--project P] CONFIG [flags]
#                                     copy the repo to every worker of a Cloud TPU VM and run there
#   ./launch.sh --slurm [--nodes N] [--gpus-per-node G] CONFIG [flags]
#                                     write runs/slurm/<config>.sbatch (srun on every node) and sbatch it
#   --dry-run (with --tpu or --slurm) prints the commands and the sbatch script instead of running them
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
VENV="$ROOT/.venv"
PY="$VENV/bin/python"

setup() {
  # Each extra has its own marker, so a CPU venv gains the accelerator build when asked.
  local extra="${PTX_JAX_EXTRA:-}"
  local marker="$VENV/.installed${extra:+-$extra}"
  if [ ! -x "$PY" ] || [ requirements.txt -nt "$marker" ]; then
    python3 -m venv "$VENV"
    "$PY" -m pip install --quiet --upgrade pip
    "$PY" -m pip install --quiet -r requirements.txt
    if [ -n "$extra" ]; then
      "$PY" -m pip install --quiet "jax[$extra]==$(sed -n 's/^jax==//p' requirements.txt)"
    fi
    touch "$marker"
  fi
}

die() { echo "launch.sh: $*" >&2; exit 2; }

# A command, or under --dry-run its shell-quoted text.
run() {
  if [ "$DRY_RUN" = 1 ]; then
    quote "$@"; echo
  else
    "$@"
  fi
}

quote() { local sep=""; for a in "$@"; do printf '%s%q' "$sep" "$a"; sep=" "; done; }

# Every worker gets the repo in ~/ptx (not the local venv, runs or git history), builds
# its own venv with jax[tpu] and starts one process; jax.distributed finds the others.
tpu() {
  [ -n "$ZONE" ] || die "--tpu needs --zone"
  local where=(--zone="$ZONE" ${PROJECT:+--project="$PROJECT"} --worker=all)
  local files=() f
  for f in * .[!.]*; do
    [ -e "$f" ] || continue
    case "$f" in .venv|runs|.git|.pytest_cache|__pycache__) ;; *) files+=("$f") ;; esac
  done
  run gcloud compute tpus tpu-vm ssh "$TPU" "${where[@]}" --command="mkdir -p ~/ptx"
  run gcloud compute tpus tpu-vm scp --recurse "${files[@]}" "$TPU:~/ptx/" "${where[@]}"
  run gcloud compute tpus tpu-vm ssh "$TPU" "${where[@]}" --command="cd ~/ptx && export PTX_JAX_EXTRA=tpu && ./launch.sh setup && ./launch.sh $(quote "$@" --config.distributed.auto=True)"
}

# One task per GPU (per node without GPUs): jax.distributed reads SLURM's variables and
# gives each GPU task its own device. The checkout and venv sit on the shared file system.
slurm() {
  local name
  name=$(basename "${1%%:*}" .py)
  local script="runs/slurm/$name.sbatch" tasks=1 extra="${PTX_JAX_EXTRA:-}" gpus=""
  if [ "$GPUS" -gt 0 ]; then
    tasks=$GPUS extra="${extra:-cuda12}" gpus="#SBATCH --gpus-per-node=$GPUS"$'\n'
  fi
  local body
  body="#!/bin/bash
#SBATCH --job-name=ptx-$name
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=$tasks
${gpus}#SBATCH --output=$ROOT/runs/slurm/$name-%j.out
set -euo pipefail
cd $(quote "$ROOT")
# The venv was built with this extra at submission; the tasks only check it.
export PTX_JAX_EXTRA=$extra
srun ./launch.sh $(quote "$@" --config.distributed.auto=True)"
  # Build the shared venv here, once: compute nodes are often offline, and tasks
  # installing side by side would race.
  run env "PTX_JAX_EXTRA=$extra" ./launch.sh setup
  if [ "$DRY_RUN" = 1 ]; then
    printf '# %s\n%s\n' "$script" "$body"
  else
    mkdir -p runs/slurm
    printf '%s\n' "$body" > "$script"
  fi
  run sbatch "$script"
}

DRY_RUN=0 TPU="" ZONE="" PROJECT="" SLURM=0 NODES=1 GPUS=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --tpu) TPU="${2:?--tpu needs a TPU VM name}"; shift 2 ;;
    --zone) ZONE="${2:?--zone needs a zone}"; shift 2 ;;
    --project) PROJECT="${2:?--project needs a project}"; shift 2 ;;
    --slurm) SLURM=1; shift ;;
    --nodes) NODES="${2:?--nodes needs a number}"; shift 2 ;;
    --gpus-per-node) GPUS="${2:?--gpus-per-node needs a number}"; shift 2 ;;
    *) break ;;
  esac
done
case "$NODES$GPUS" in *[!0-9]*) die "--nodes and --gpus-per-node take whole numbers" ;; esac

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
# N forced host devices share one thread pool; collectives can block two threads per
# device, so give the pool 2N (a smaller one can deadlock into XLA's rendezvous abort).
host_devices=$(sed -n 's/.*--xla_force_host_platform_device_count=\([0-9]*\).*/\1/p' <<<"${XLA_FLAGS:-}")
if [ -n "$host_devices" ] && [ -z "${PJRT_NPROC:-}" ] && [ $((2 * host_devices)) -gt "$(nproc)" ]; then
  export PJRT_NPROC=$((2 * host_devices))
fi

cmd="${1:-}"
[ $# -gt 0 ] && shift
if [ -n "$TPU" ] || [ "$SLURM" = 1 ]; then
  [ -z "$TPU" ] || [ "$SLURM" = 0 ] || die "--tpu and --slurm exclude each other"
  case "$cmd" in *.py|*.py:*) ;; *) die "--tpu and --slurm run a CONFIG (configs/NAME.py[:arg]), got '$cmd'" ;; esac
  if [ -n "$TPU" ]; then tpu "$cmd" "$@"; else slurm "$cmd" "$@"; fi
  exit 0
fi
[ "$DRY_RUN" = 0 ] || die "--dry-run goes with --tpu or --slurm"
[ -z "$ZONE$PROJECT" ] || die "--zone and --project go with --tpu"
{ [ "$NODES" = 1 ] && [ "$GPUS" = 0 ]; } || die "--nodes and --gpus-per-node go with --slurm"

case "$cmd" in
  setup)
    setup ;;
  quickstart)
    setup
    exec "$PY" -m ptx.main --config=configs/quickstart.py --workdir=runs/quickstart "$@" ;;
  test)
    setup
    # Test-only peers (torch CPU, transformers, trl) for the Hugging Face round trips and bench peers.
    if [ requirements-test.txt -nt "$VENV/.installed-test" ]; then
      "$PY" -m pip install --quiet -r requirements-test.txt
      touch "$VENV/.installed-test"
    fi
    # Style first (pyproject.toml's [tool.ruff]); a finding fails the run before any test.
    "$PY" -m ruff check ptx configs tests bench experiments
    # --fast: the unit tests only, without the whole-stage runs (pytest.mark.stage), in two
    # worker processes (pytest-xdist): compiles are mostly single-threaded, so two use both cores.
    args=()
    for a in "$@"; do
      if [ "$a" = --fast ]; then args+=(-m "not stage" -n 2); else args+=("$a"); fi
    done
    exec "$PY" -m pytest -q tests ${args[@]+"${args[@]}"} ;;
  bench)
    setup
    exec "$PY" -m bench.main "$@" ;;
  bench-accelerator)
    setup
    exec "$PY" -m bench.accelerator "$@" ;;
  ""|-h|--help)
    sed -n '2,/^[^#]/{/^#/p}' "$0" ;;
  *)
    setup
    workdir=()
    case " $* " in *" --workdir"*) ;; *) workdir=(--workdir="runs/$(basename "${cmd%%:*}" .py)") ;; esac
    exec "$PY" -m ptx.main --config="$cmd" "${workdir[@]}" "$@" ;;
esac
