"""The accelerator path end to end: training, the wrappers and SB3 agents on ``KP_RL_TEST_DEVICE`` (default cuda).

Marked ``cuda`` and left out of the default run (``setup.cfg``); on a GPU machine run them with
``scripts/test.sh -m cuda``. ``KP_RL_TEST_DEVICE=cpu scripts/test.sh -m cuda`` runs the same tests on the CPU,
which checks the tests themselves where no GPU is at hand. Every result is compared with the CPU's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3 import PPO, SAC
from stable_baselines3.common.env_checker import check_env as sb3_check_env
from stable_baselines3.common.vec_env import DummyVecEnv

import kp_rl
from kp_rl.data import collect
from kp_rl.model import PerceptionModel, load
from kp_rl.sb3 import CNNExtractor, KeypointExtractor
from kp_rl.train import train_autoencoder, train_dynamics
from kp_rl.wrappers import KeypointObservation, VecKeypointObservation, WorldModel

DEVICE = os.environ.get("KP_RL_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                       reason="no CUDA device here (KP_RL_TEST_DEVICE=cpu runs these tests on the CPU)"),
]
# cuDNN convolutions may use TF32 on recent GPUs (10-bit mantissa): compare features loosely.
ATOL = 5e-3
TINY = kp_rl.get_preset("tiny").replace(train={"steps": 40})  # a clearer fall of the bf16 reconstruction loss
SIZE, K = TINY.keypoints.image_size, TINY.keypoints.num_keypoints


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("device") / "data"
    collect("cartpole-swingup", path, 4, max_steps=15, progress=False, env_kwargs={"image_size": SIZE})
    return path


def _train(data: Path, root: Path, representation: str) -> Path:
    """Autoencoder + dynamics trained on the device (bf16 autocast on CUDA); returns the dynamics checkpoint."""
    config = TINY
    train_autoencoder(data, root / "ae", config, representation, device=DEVICE, progress=False)
    history = json.loads((root / "ae" / "history.json").read_text())["train"]
    assert history[-1]["reconstruction"] < history[0]["reconstruction"]
    return train_dynamics(root / "ae", data, root / "dyn", device=DEVICE, progress=False)


@pytest.fixture(scope="module")
def trained(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(data, tmp_path_factory.mktemp("keypoints"), "keypoints")


@pytest.fixture(scope="module")
def trained_cnn(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(data, tmp_path_factory.mktemp("cnn"), "cnn")


def test_trained_on_the_device_loads_anywhere(trained: Path) -> None:
    on_device, on_cpu = load(trained, DEVICE, require_dynamics=True), load(trained, "cpu", require_dynamics=True)
    assert on_device.device.type == torch.device(DEVICE).type and on_cpu.device.type == "cpu"
    frames = np.random.default_rng(0).integers(0, 256, (5, SIZE, SIZE, 3), np.uint8)
    with torch.inference_mode():
        features = on_device.encode(frames)
        assert features.device.type == torch.device(DEVICE).type and torch.isfinite(features).all()
        np.testing.assert_allclose(features.cpu().numpy(), on_cpu.encode(frames).numpy(), atol=ATOL)


def test_wrappers_on_the_device_match_the_cpu(trained: Path) -> None:
    def rollout(device: str) -> tuple[list[np.ndarray], list[float]]:
        env = WorldModel(KeypointObservation(gym.make("kp_rl/cartpole-swingup-v0", image_size=SIZE), trained,
                                             belief=True, device=device), trained, device=device)
        env.action_space.seed(0)
        observations, predicted = [env.reset(seed=0)[0]], []
        for _ in range(5):
            obs, _, _, _, info = env.step(env.action_space.sample())
            observations.append(obs)
            predicted.append(info["predicted_reward"])
        imagined = env.imagine(np.zeros((2, 6, 1), np.float32), num_samples=3)
        assert imagined["features"].shape == (3, 2, 6, K * 3) and imagined["rewards"].shape == (3, 2, 6)
        env.close()
        return observations, predicted

    (on_device, rewards_device), (on_cpu, rewards_cpu) = rollout(DEVICE), rollout("cpu")
    for a, b in zip(on_device, on_cpu):
        assert a.dtype == np.float32
        np.testing.assert_allclose(a[: K * 3], b[: K * 3], atol=ATOL)  # features; the belief compounds rounding
    np.testing.assert_allclose(rewards_device, rewards_cpu, atol=0.05)
    env = KeypointObservation(gym.make("kp_rl/cartpole-swingup-v0", image_size=SIZE), trained, device=DEVICE)
    sb3_check_env(env)
    env.close()


def test_vector_wrapper_on_the_device(trained: Path) -> None:
    make = [lambda: gym.make("kp_rl/cartpole-swingup-v0", image_size=SIZE)] * 3
    outputs = []
    for device in (DEVICE, "cpu"):
        venv = VecKeypointObservation(DummyVecEnv(make), trained, belief=True, device=device)
        venv.seed(0)
        first = venv.reset()
        stepped = venv.step(np.zeros((3, 1), np.float32))[0]
        assert first.shape == stepped.shape == (3, venv.observation_space.shape[0])
        outputs.append(stepped)
        venv.close()
    np.testing.assert_allclose(outputs[0][:, : K * 3], outputs[1][:, : K * 3], atol=ATOL)


def _assert_round_trip(agent: SAC | PPO, env: gym.Env, tmp_path: Path) -> None:
    """Saved and loaded on the device, the agent acts as before."""
    agent.save(tmp_path / "agent")
    loaded = type(agent).load(tmp_path / "agent", device=DEVICE)
    observations = np.stack([env.reset(seed=s)[0] for s in range(4)])
    np.testing.assert_allclose(agent.predict(observations, deterministic=True)[0],
                               loaded.predict(observations, deterministic=True)[0], atol=1e-5)


def test_sac_with_the_extractor_on_the_device(trained: Path, tmp_path: Path) -> None:
    env = gym.make("kp_rl/cartpole-swingup-v0", image_size=SIZE)
    agent = SAC("CnnPolicy", env, buffer_size=300, learning_starts=30, batch_size=8, seed=0, device=DEVICE,
                policy_kwargs=dict(features_extractor_class=KeypointExtractor, net_arch=[16],
                                   features_extractor_kwargs=dict(model_path=str(trained))))
    assert next(agent.policy.parameters()).device.type == torch.device(DEVICE).type
    agent.learn(80)
    _assert_round_trip(agent, env, tmp_path)
    env.close()


def test_the_unstructured_agent_on_the_device(trained_cnn: Path, tmp_path: Path) -> None:
    """cnn-vrnn observations (the wrapper on a CNN model) match the CPU; PPO with CNNExtractor trains, round-trips."""
    make = [lambda: gym.make("kp_rl/cartpole-swingup-v0", image_size=SIZE)] * 2
    outputs = []
    for device in (DEVICE, "cpu"):
        venv = VecKeypointObservation(DummyVecEnv(make), trained_cnn, belief=True, device=device)
        venv.seed(0)
        venv.reset()
        outputs.append(venv.step(np.zeros((2, 1), np.float32))[0])
        venv.close()
    feature_dim = load(trained_cnn, "cpu").feature_dim
    np.testing.assert_allclose(outputs[0][:, :feature_dim], outputs[1][:, :feature_dim], atol=ATOL)

    env = gym.make("kp_rl/cartpole-swingup-v0", image_size=SIZE)
    agent = PPO("CnnPolicy", env, n_steps=32, batch_size=16, n_epochs=1, seed=0, device=DEVICE,
                policy_kwargs=dict(features_extractor_class=CNNExtractor, net_arch=[16],
                                   features_extractor_kwargs=dict(model_path=str(trained_cnn), fine_tune=True)))
    assert next(agent.policy.parameters()).device.type == torch.device(DEVICE).type
    before = [p.detach().clone() for p in agent.policy.features_extractor.parameters()]
    agent.learn(64)
    after = list(agent.policy.features_extractor.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before))  # fine-tuned on the device
    _assert_round_trip(agent, env, tmp_path)
    env.close()


def test_a_model_object_is_moved_to_the_device() -> None:
    torch.manual_seed(0)
    model = PerceptionModel(TINY, action_dim=1, with_dynamics=True)
    env = KeypointObservation(gym.make("kp_rl/cartpole-swingup-v0", image_size=SIZE), model, device=DEVICE)
    assert env.model.device.type == torch.device(DEVICE).type and not env.model.training
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    env.close()


@pytest.mark.skipif(not DEVICE.startswith("cuda"), reason="CUDA graphs: a CUDA device only")
def test_vrnn_training_replays_a_cuda_graph_with_the_eager_results(trained: Path, data: Path,
                                                                    tmp_path: Path) -> None:
    import warnings

    history = json.loads((trained.parent / "history.json").read_text())["train"]
    assert history[-1]["cuda_graph"] == 1.0  # the fixture's VRNN trained from a graph
    # a deterministic VRNN (no latent, always the true features fed back): graph and eager steps must agree
    deterministic = {"dynamics": {"stochastic": False, "sampling_observed_end": 1.0, "sampling_predicted_end": 1.0}}
    weights = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="CUDA graph capture")  # fail here instead of falling back
        for graphs in (True, False):
            path = train_dynamics(trained.parent.parent / "ae", data, tmp_path / f"graphs-{graphs}",
                                  {**deterministic, "train": {"cuda_graphs": graphs, "amp": False}}, device=DEVICE,
                                  progress=False)
            weights[graphs] = load(path, DEVICE).dynamics.state_dict()
            rows = json.loads((tmp_path / f"graphs-{graphs}" / "history.json").read_text())["train"]
            assert rows[-1].get("cuda_graph", 0.0) == float(graphs) and rows[-1]["loss"] < rows[0]["loss"]
    for name, value in weights[True].items():
        torch.testing.assert_close(value, weights[False][name], atol=1e-4, rtol=1e-3, msg=name)
