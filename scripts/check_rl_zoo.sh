#!/usr/bin/env bash
# The README's rl-baselines3-zoo snippet, run by the zoo itself (not a kp_rl dependency, so not in CI):
# a scratch venv with kp_rl + rl_zoo3, a random-weight `cpu` model, 400 SAC steps through `rl_zoo3.train`.
#   bash scripts/check_rl_zoo.sh [WORKDIR]      (~1.5 min; WORKDIR defaults to a new temporary directory)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=${1:-$(mktemp -d)}
mkdir -p "$work"
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q -c "$repo/constraints.txt" "$repo" rl_zoo3
"$work/venv/bin/python" - "$work" <<'PY'
import sys, kp_rl
kp_rl.PerceptionModel(kp_rl.get_preset("cpu"), "keypoints", action_dim=1, with_dynamics=True).save(f"{sys.argv[1]}/model.pt")
PY
# the README block, with this model and a short warm-up
sed -n '/^```yaml$/,/^```$/p' "$repo/README.md" | sed '1d;$d' \
  | sed "s#runs/cartpole-dyn/model.pt#$work/model.pt#" > "$work/kp_rl_sac.yml"
echo "  learning_starts: 100" >> "$work/kp_rl_sac.yml"
cd "$work"
venv/bin/python -m rl_zoo3.train --algo sac --env kp_rl/cartpole-swingup-v0 --gym-packages kp_rl \
  --conf-file kp_rl_sac.yml -n 400 --log-folder logs --eval-freq -1
ls logs/sac/kp_rl-cartpole-swingup-v0_1/kp_rl-cartpole-swingup-v0.zip && echo "rl_zoo3 trained and saved the agent"
