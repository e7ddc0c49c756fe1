"""The bundles shipped in kp_rl/pretrained: each loads by name, has its model card, and works wherever a model
path does (wrappers, the world model, kp-rl rl --model)."""

import json
import subprocess
import sys

import gymnasium as gym
import numpy as np

import kp_rl
from kp_rl.model import PRETRAINED_DIR, pretrained_models
from kp_rl.wrappers import KeypointObservation, WorldModel


def test_every_shipped_bundle_loads_by_name_and_wraps_its_env():
    names = pretrained_models()
    assert "pretrained:cartpole-swingup" in names
    for name in names:
        model = kp_rl.load(name)
        assert model.has_dynamics and model.representation == "keypoints"
        assert name in (PRETRAINED_DIR / f"{name.split(':', 1)[1]}.md").read_text()  # its model card
        env = WorldModel(KeypointObservation(gym.make(model.data_spec["env_id"]), name, belief=True))
        obs, _ = env.reset(seed=0)
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        assert obs.shape == env.observation_space.shape and np.isfinite(info["predicted_reward"])
        env.close()


def test_kp_rl_rl_takes_a_pretrained_model(tmp_path):
    cmd = [sys.executable, "-m", "kp_rl.cli", "rl", "--env", "cartpole-swingup", "--agent", "sac-keypoints-belief",
           "--model", "pretrained:cartpole-swingup", "--steps", "20", "--eval-every", "20", "--eval-episodes", "1",
           "--out", str(tmp_path / "run"), "--quiet"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    identity = json.loads((tmp_path / "run" / "run.json").read_text())
    assert identity["model"].endswith("pretrained/cartpole-swingup.pt") and len(identity["model_sha256"]) == 12


def test_dynamics_train_on_a_pretrained_autoencoder(tmp_path):
    """kp-rl train dynamics --keypoints pretrained:<task>: new dynamics on the shipped keypoint model."""
    from kp_rl.data import collect
    from kp_rl.train import train_dynamics

    collect("cartpole-swingup", tmp_path / "data", 3, max_steps=17, progress=False)
    path = train_dynamics("pretrained:cartpole-swingup", tmp_path / "data", tmp_path / "dyn",
                          {"train": {"dynamics_steps": 2, "dynamics_batch_size": 2, "log_every": 1}}, progress=False)
    assert kp_rl.load(path).has_dynamics
    identity = json.loads((tmp_path / "dyn" / "run.json").read_text())
    assert identity["model"] == str(PRETRAINED_DIR / "cartpole-swingup.pt") and len(identity["model_sha256"]) == 12
