#!/usr/bin/env bash
# Entry points, each on a fresh machine:
#   ./dev.sh demo    build base_model and merged_model with the flow, serve them, ask both for a completion
#   ./dev.sh test    the whole test suite
#   ./dev.sh bench   the benchmarks (writes bench/RESULTS.md); --large: real-size models (bench/large.py)
#   ./dev.sh run CMD any command inside the environment (e.g. ./dev.sh run prefect server start)
# The virtual environment is cached outside the checkout, keyed by a hash of requirements.txt.
set -euo pipefail
cd "$(dirname "$0")"

venv_root="${LORA_VENV_CACHE:-$HOME/.cache/lora-pipeline/venvs}"
key=$( (cat requirements.txt; python3 --version) | sha256sum | cut -c1-16)
venv="$venv_root/$key"
mkdir -p "$venv_root"
(
  flock 9
  if [ ! -f "$venv/.complete" ]; then
    echo "[dev.sh] creating the virtual environment $venv (a few minutes, once per requirements.txt)" >&2
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
    "$venv/bin/pip" install --quiet -r requirements.txt
    touch "$venv/.complete"
  fi
) 9>"$venv_root/.lock"
# shellcheck disable=SC1091
source "$venv/bin/activate"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 HF_HUB_DISABLE_TELEMETRY=1
# OpenVINO's telemetry (sent by optimum-intel's export) forks a process that opens an HTTPS connection;
# forked from a threaded build it can deadlock, and the build then never exits (seen here, with no
# network to reach). Its own opt-out writes ~/intel/openvino_telemetry once.
[ -e "$HOME/intel/openvino_telemetry" ] || opt_in_out --opt_out >/dev/null 2>&1 || true

cmd="${1:-}"
shift || true
case "$cmd" in
  demo) exec python -m demo "$@" ;;
  test) ruff check . && exec python -m pytest "$@" ;;
  bench) exec python -m bench "$@" ;;
  run) exec "$@" ;;
  *) echo "usage: ./dev.sh demo|test|bench [args] | ./dev.sh run CMD [args]" >&2; exit 2 ;;
esac
