"""Tests of kp_rl.sb3: features extractors, SAC/PPO training and save/load, the TensorBoard callback, drawing."""

from __future__ import annotations

import doctest
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces
from stable_baselines3 import PPO, SAC
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import VecFrameStack

import kp_rl
import kp_rl.sb3
from kp_rl.keypoints import gate_by_intensity
from kp_rl.model import CheckpointError, PerceptionModel
from kp_rl.report import draw_keypoints
from kp_rl.sb3 import CNNExtractor, KeypointExtractor, KeypointOverlayCallback
from kp_rl.wrappers import KeypointObservation, WorldModel

SIZE, K, LATENT = 32, 4, 8
TINY = dict(keypoints={"image_size": SIZE, "num_keypoints": K, "base_filters": 4, "layers_per_scale": 0},
            cnn={"latent_dim": LATENT},
            dynamics={"rnn_units": 16, "latent_dim": 4, "prior_hidden": 8, "posterior_hidden": 8,
                      "decoder_hidden": 8, "reward_hidden": 8})


def tiny_model(representation: str = "keypoints") -> PerceptionModel:
    torch.manual_seed(0)
    return PerceptionModel(kp_rl.get_preset("cpu").replace(**TINY), representation, action_dim=1,
                           with_dynamics=True).eval()


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    out = {}
    for representation in ("keypoints", "cnn"):
        out[representation] = root / f"{representation}.pt"
        tiny_model(representation).save(out[representation])
    return out


def pixel_env(**kwargs) -> gym.Env:
    return gym.make("kp_rl/cartpole-swingup-v0", image_size=SIZE, **kwargs)


def image_space(shape: tuple[int, ...]) -> spaces.Box:
    return spaces.Box(0, 255, shape, np.uint8)


# ------------------------------------------------------------------------------------------ extractors


def test_extractor_matches_the_model_in_every_layout(paths: dict[str, Path]) -> None:
    model = kp_rl.load(paths["keypoints"])
    frames = torch.randint(0, 256, (5, 2, SIZE, SIZE, 3), dtype=torch.uint8)  # (B, n_stack, H, W, 3)
    with torch.no_grad():
        expected = gate_by_intensity(model.encode(frames)).flatten(1)  # (B, 2 * K * 3), as the wrappers give them
        channels_first = frames.permute(0, 1, 4, 2, 3).flatten(1, 2).float()  # (B, 6, H, W), as SB3 stacks
        first = KeypointExtractor(image_space((6, SIZE, SIZE)), paths["keypoints"])
        assert first.features_dim == 2 * K * 3
        torch.testing.assert_close(first(channels_first / 255), expected, atol=1e-5, rtol=0)
        raw = KeypointExtractor(image_space((6, SIZE, SIZE)), paths["keypoints"], images_normalized=False)
        torch.testing.assert_close(raw(channels_first), expected, atol=1e-5, rtol=0)
        last = KeypointExtractor(image_space((SIZE, SIZE, 6)), paths["keypoints"])
        torch.testing.assert_close(last(channels_first.permute(0, 2, 3, 1) / 255), expected, atol=1e-5, rtol=0)
        cnn = CNNExtractor(image_space((3, SIZE, SIZE)), paths["cnn"])
        assert cnn.features_dim == LATENT and cnn(channels_first[:, :3] / 255).shape == (5, LATENT)


def test_frozen_by_default_fine_tuned_on_request(paths: dict[str, Path]) -> None:
    frozen = KeypointExtractor(image_space((3, SIZE, SIZE)), paths["keypoints"])
    frozen.train()
    assert not frozen.autoencoder.training and not any(p.requires_grad for p in frozen.parameters())
    assert not frozen(torch.rand(2, 3, SIZE, SIZE)).requires_grad
    tuned = KeypointExtractor(image_space((3, SIZE, SIZE)), paths["keypoints"], fine_tune=True)
    tuned(torch.rand(2, 3, SIZE, SIZE)).sum().backward()
    assert all(p.grad is not None for p in tuned.autoencoder.encoder.parameters())


def test_extractor_bad_input(paths: dict[str, Path]) -> None:
    with pytest.raises(CheckpointError, match="'cnn' model; a 'keypoints' model is needed"):
        KeypointExtractor(image_space((3, SIZE, SIZE)), paths["cnn"])
    with pytest.raises(CheckpointError, match="'keypoints' model; a 'cnn' model is needed"):
        CNNExtractor(image_space((3, SIZE, SIZE)), paths["keypoints"])
    with pytest.raises(ValueError, match="gives 64x64 frames but the model expects 32x32"):
        KeypointExtractor(image_space((3, 64, 64)), paths["keypoints"])
    with pytest.raises(ValueError, match="expects image observations"):
        KeypointExtractor(spaces.Box(-1, 1, (12,), np.float32), paths["keypoints"])
    with pytest.raises(ValueError, match="3 \\* n_stack"):
        KeypointExtractor(image_space((4, SIZE, SIZE)), paths["keypoints"])


# ------------------------------------------------------------------------------------------- training


def extractor_kwargs(path: Path) -> dict:
    return dict(features_extractor_class=KeypointExtractor, features_extractor_kwargs=dict(model_path=str(path)),
                net_arch=[16])


def test_sac_with_extractor_trains_saves_and_loads(paths: dict[str, Path], tmp_path: Path) -> None:
    agent = SAC("CnnPolicy", pixel_env(), buffer_size=500, learning_starts=40, batch_size=8, seed=0,
                policy_kwargs=extractor_kwargs(paths["keypoints"]))
    assert agent.actor.features_extractor.features_dim == K * 3
    agent.learn(150)
    agent.save(tmp_path / "sac")
    loaded = SAC.load(tmp_path / "sac")
    observations = np.stack([o for o in rollout_frames(8)])
    np.testing.assert_allclose(agent.predict(observations, deterministic=True)[0],
                               loaded.predict(observations, deterministic=True)[0], atol=1e-6)


def rollout_frames(steps: int) -> list[np.ndarray]:
    env = pixel_env()
    frames = [env.reset(seed=0)[0]]
    frames += [env.step(env.action_space.sample())[0] for _ in range(steps - 1)]
    env.close()
    return frames


def test_ppo_with_fine_tuned_extractor_on_stacked_frames(paths: dict[str, Path]) -> None:
    venv = VecFrameStack(make_vec_env(pixel_env, n_envs=2, seed=0), n_stack=2)
    kwargs = extractor_kwargs(paths["keypoints"])
    kwargs["features_extractor_kwargs"]["fine_tune"] = True
    agent = PPO("CnnPolicy", venv, n_steps=32, batch_size=32, n_epochs=1, seed=0, policy_kwargs=kwargs)
    extractor = agent.policy.features_extractor
    assert extractor.features_dim == 2 * K * 3
    before = [p.detach().clone() for p in extractor.autoencoder.encoder.parameters()]
    agent.learn(128)
    changed = [not torch.equal(a, b) for a, b in zip(before, extractor.autoencoder.encoder.parameters())]
    assert any(changed)  # the encoder trained with the agent


@pytest.mark.parametrize("algo, belief", [(SAC, True), (PPO, False)])
def test_mlp_agents_on_keypoint_observations(paths: dict[str, Path], algo: type, belief: bool) -> None:
    env = KeypointObservation(pixel_env(), paths["keypoints"], belief=belief)
    kwargs = dict(learning_starts=30, batch_size=16) if algo is SAC else dict(n_steps=64, batch_size=32, n_epochs=1)
    agent = algo("MlpPolicy", env, seed=0, policy_kwargs=dict(net_arch=[16]), **kwargs)
    agent.learn(64)
    action, _ = agent.predict(env.reset(seed=0)[0], deterministic=True)
    assert action.shape == (1,)


# ------------------------------------------------------------------------------------------- callback


def test_overlay_callback_logs_image_and_reward_error(paths: dict[str, Path], tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    env = WorldModel(KeypointObservation(pixel_env(), paths["keypoints"]), paths["keypoints"])
    callback = KeypointOverlayCallback(pixel_env(), paths["keypoints"], log_every=32, num_frames=3, scale=2)
    agent = PPO("MlpPolicy", env, n_steps=32, batch_size=32, n_epochs=1, seed=0, tensorboard_log=str(tmp_path),
                policy_kwargs=dict(net_arch=[16]))
    agent.learn(64, callback=callback)
    runs = list(tmp_path.iterdir())
    assert len(runs) == 1
    events = EventAccumulator(str(runs[0]), size_guidance={"images": 0}).Reload()
    assert "kp/overlay" in events.Tags()["images"]
    image = events.Images("kp/overlay")[-1]
    assert (image.height, image.width) == (SIZE * 2, 3 * SIZE * 2)
    errors = events.Scalars("kp/reward_abs_error")
    assert errors and all(np.isfinite(e.value) and e.value >= 0 for e in errors)


def test_overlay_callback_bad_input(paths: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="a 'keypoints' model is needed"):
        KeypointOverlayCallback(np.zeros((1, SIZE, SIZE, 3), np.uint8), paths["cnn"])
    with pytest.raises(ValueError, match="needs a 'keypoints' model, got a 'cnn' model"):
        KeypointOverlayCallback(np.zeros((1, SIZE, SIZE, 3), np.uint8), kp_rl.load(paths["cnn"]))
    with pytest.raises(ValueError, match=r"expected uint8 frames \(N, 32, 32, 3\)"):
        KeypointOverlayCallback(np.zeros((1, 64, 64, 3), np.uint8), paths["keypoints"])
    with pytest.raises(ValueError, match="needs frames: uint8 \\(H, W, 3\\) image observations or render_mode='rgb_array'"):
        KeypointOverlayCallback(gym.make("Pendulum-v1"), paths["keypoints"])


# -------------------------------------------------------------------------------------------- drawing


def test_draw_keypoints_places_dots_by_coordinates_and_mu() -> None:
    frame = np.full((33, 33, 3), 50, np.uint8)
    keypoints = np.array([[1.0, -1.0, 1.0],   # bottom-right, full intensity
                          [-1.0, 1.0, 0.5],   # top-left, half
                          [0.0, 0.0, 0.0]])   # centre, invisible
    out = draw_keypoints(frame, keypoints)
    assert out.dtype == np.uint8 and out.shape == frame.shape
    assert (out[32, 32] != 50).any() and (out[0, 0] != 50).any() and (out[16, 16] == 50).all()
    assert np.abs(out[32, 32].astype(int) - 50).max() > np.abs(out[0, 0].astype(int) - 50).max()  # mu -> alpha
    np.testing.assert_array_equal(frame, 50)  # input untouched
    with pytest.raises(ValueError, match=r"uint8 \(H, W, 3\)"):
        draw_keypoints(frame.astype(np.float32), keypoints)
    with pytest.raises(ValueError, match=r"keypoints \(K, 3\)"):
        draw_keypoints(frame, keypoints.ravel())


def test_docstring_examples_run() -> None:
    result = doctest.testmod(kp_rl.sb3)
    assert result.attempted > 0 and result.failed == 0
