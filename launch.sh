#!/usr/bin/env bash
# ptx launcher.
#   ./launch.sh setup                 create .venv from requirements.txt
#   ./launch.sh quickstart [flags]    the embedded default, end to end, into runs/quickstart
#   ./launch.sh test [pytest args]    the test suite
#   ./launch.sh bench [flags]         the benchmark suite (see ptx/bench.py)
#   ./launch.sh CONFIG [flags]        one config locally, e.g. configs/sft.py:tiny --workdir=runs/sft
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
VENV="$ROOT/.venv"
PY="$VENV/bin/python"

setup() {
  if [ ! -x "$PY" ] || [ requirements.txt -nt "$VENV/.installed" ]; then
    python3 -m venv "$VENV"
    "$PY" -m pip install --quiet --upgrade pip
    "$PY" -m pip install --quiet -r requirements.txt
    touch "$VENV/.installed"
  fi
}

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
  setup)
    setup ;;
  quickstart)
    setup
    exec "$PY" -m ptx.main --config=configs/quickstart.py --workdir=runs/quickstart "$@" ;;
  test)
    setup
    # Test-only peers (torch CPU, transformers) for the Hugging Face round trips.
    if [ requirements-test.txt -nt "$VENV/.installed-test" ]; then
      "$PY" -m pip install --quiet -r requirements-test.txt
      touch "$VENV/.installed-test"
    fi
    exec "$PY" -m pytest -q tests "$@" ;;
  bench)
    setup
    exec "$PY" -m ptx.bench "$@" ;;
  ""|-h|--help)
    sed -n '2,7p' "$0" ;;
  *)
    setup
    workdir=()
    case " $* " in *" --workdir"*) ;; *) workdir=(--workdir="runs/$(basename "${cmd%%:*}" .py)") ;; esac
    exec "$PY" -m ptx.main --config="$cmd" "${workdir[@]}" "$@" ;;
esac
