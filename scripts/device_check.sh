#!/usr/bin/env bash
# The GPU check in one go, for a CUDA machine that has PyTorch (and pytest, tensorboard, matplotlib, ...) but
# no network, such as the device machines some sessions are lent.
#
#   bash scripts/device_check.sh prepare     here, with network: wheels into .whl/ (../shared/gpu/fetch-wheels.sh)
#                                            and the EGL/GL loader .debs into .gl/, both git-ignored locally
#   bash scripts/device_check.sh run [OUT]   there, carrying .whl and .gl: installs them beside the preinstalled
#                                            PyTorch, then runs tests/test_device.py on cuda and the training,
#                                            wrapper and agent benchmarks on cuda; a log, JSON and PNGs go to OUT
#                                            (default: $OUT, else results/device_check)
#
#   bash scripts/device_check.sh cells [OUT] [MINUTES] [SPEC]
#                                            there, after run (or alone: it installs the same way): the
#                                            reward-prediction grid (experiments/reward_prediction.py, spec gpu by
#                                            default) on the GPU, 8 cells at a time, starting no cell after MINUTES
#                                            (default 6); the finished cells and the autoencoder weights come back
#                                            as two archives in OUT: unpack them into results/reward_prediction/
#                                            <spec>/ and commit, and the grid resumes from them
#
# Every step has its own time limit (510 s in all), so that the run fits one 10-minute device call.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

prepare() {
  set -e
  mkdir -p .git/info
  for path in /.whl/ /.gl/; do grep -qxF "$path" .git/info/exclude 2>/dev/null || echo "$path" >> .git/info/exclude; done
  bash ../shared/gpu/fetch-wheels.sh .whl
  mkdir -p .gl /tmp/kp_rl_apt/partial
  local o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/kp_rl_apt'
  apt-get $o update -qq
  (cd .gl && apt-get $o download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
  du -sh .whl .gl
}

setup() {  # the carried wheels and GL loaders, once per machine
  [ -n "${KP_RL_SETUP_DONE:-}" ] && return 0
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
  else
    export PYTHONPATH=$PWD
  fi
  export MUJOCO_GL=egl PYTHONUNBUFFERED=1
  if [ -d .gl ] && [ "${KP_RL_TEST_DEVICE:-cuda}" != cpu ]; then  # GL/EGL loaders into / (a bare, given-back machine)
    for f in .gl/*.deb; do dpkg -x "$f" /; done
    ldconfig
  fi
  export KP_RL_SETUP_DONE=1
}

cells() {
  local out=${1:-${OUT:-results/device_check}} minutes=${2:-6} spec=${3:-gpu}
  local work=/tmp/kp_rl_cells/reward_prediction_$spec
  setup || return 1
  mkdir -p "$out" "$work"
  timeout $(( minutes * 60 + 240 )) python3 experiments/reward_prediction.py --spec "$spec" --workers 8 \
    --collect-workers 12 --max-hours "$(python3 -c "print($minutes / 60)")" --out "$work" --runs /tmp/kp_rl_runs \
    > "$out/reward_prediction_$spec.log" 2>&1
  # what comes back from a device machine is at most 8 files of <= 16 MiB: the cells' JSON in one archive, the
  # autoencoder weights (a resume's starting point) in another
  tar czf "$out/reward_prediction_${spec}_cells.tgz" -C "$work" --exclude "*.png" --exclude models .
  [ -d "$work/models" ] && tar czf "$out/reward_prediction_${spec}_models.tgz" -C "$work" models
  ls -la "$out"
}

run() {
  local out=${1:-${OUT:-results/device_check}}
  mkdir -p "$out"
  setup || exit 1
  local device=${KP_RL_TEST_DEVICE:-cuda}  # cpu: a dry run of this script where there is no GPU
  local log="$out/device_check.log"  # one log: what comes back from a device machine is at most 8 files
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi"; } | tee "$log"
  local status=0
  step() {  # step SECONDS COMMAND...: run with a time limit, timed, appended to the log
    local limit=$1 start=$SECONDS
    shift
    echo "=== $* (limit ${limit}s)" | tee -a "$log"
    timeout "$limit" "$@" 2>&1 | tee -a "$log" || status=1
    echo "=== took $((SECONDS - start))s" | tee -a "$log"
  }
  step 200 python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_device.py
  # the paper preset's CPU steps take ~20 s each: a dry run on the CPU needs longer than a GPU
  step "$([ "$device" = cpu ] && echo 300 || echo 100)" \
    python3 experiments/bench_train.py --device "$device" --repeats 5 --out "$out/bench_train"
  step 90 python3 experiments/bench_wrapper.py --device "$device" --repeats 5 --out "$out/bench_wrapper"
  step 120 python3 experiments/bench_agent.py --device "$device" --out "$out/bench_agent"
  return $status
}

case "${1:-}" in
  prepare) prepare ;;
  run) shift; run "$@" ;;
  cells) shift; cells "$@" ;;
  *) echo "usage: bash scripts/device_check.sh prepare | run [OUT] | cells [OUT] [MINUTES] [SPEC]" >&2; exit 2 ;;
esac
