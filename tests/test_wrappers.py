"""Tests of kp_rl.wrappers: spaces and bounds, env checkers, beliefs, vectorised encoding, world model, bad input."""

from __future__ import annotations

import doctest
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3.common.vec_env import DummyVecEnv

import kp_rl
import kp_rl.wrappers
from kp_rl.keypoints import gate_by_intensity
from kp_rl.model import CheckpointError, PerceptionModel
from kp_rl.wrappers import KeypointObservation, VecKeypointObservation, WorldModel

SIZE, K = 32, 4
TINY = dict(keypoints={"image_size": SIZE, "num_keypoints": K, "base_filters": 4, "layers_per_scale": 0},
            cnn={"latent_dim": 8},
            dynamics={"rnn_units": 16, "latent_dim": 4, "prior_hidden": 8, "posterior_hidden": 8,
                      "decoder_hidden": 8, "reward_hidden": 8})
BELIEF_DIM = 16 + 4


def tiny_model(representation: str = "keypoints", dynamics: bool = True, size: int = SIZE) -> PerceptionModel:
    torch.manual_seed(0)
    sections = {**TINY, "keypoints": {**TINY["keypoints"], "image_size": size}}
    return PerceptionModel(kp_rl.get_preset("cpu").replace(**sections), representation, action_dim=1,
                           with_dynamics=dynamics).eval()


@pytest.fixture(scope="module")
def model() -> PerceptionModel:
    return tiny_model()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory, model: PerceptionModel) -> Path:
    path = tmp_path_factory.mktemp("model") / "model.pt"
    model.save(path)
    return path


def pixel_env(size: int = SIZE, **kwargs) -> gym.Env:
    return gym.make("kp_rl/cartpole-swingup-v0", image_size=size, **kwargs)


def rollout(env: gym.Env, steps: int, seed: int = 0) -> list[np.ndarray]:
    env.action_space.seed(seed)
    observations = [env.reset(seed=seed)[0]]
    for _ in range(steps):
        observations.append(env.step(env.action_space.sample())[0])
    return observations


# ---------------------------------------------------------------------------------------------- spaces


@pytest.mark.parametrize("representation, belief", [("keypoints", False), ("keypoints", True), ("cnn", False)])
def test_observation_space_and_bounds(representation: str, belief: bool) -> None:
    model = tiny_model(representation)
    env = KeypointObservation(pixel_env(), model, belief=belief)
    feature_dim = K * 3 if representation == "keypoints" else 8
    space = env.observation_space
    assert space.shape == (feature_dim + (BELIEF_DIM if belief else 0),) and space.dtype == np.float32
    if representation == "keypoints":
        np.testing.assert_array_equal(space.low[:3], [-1, -1, 0])
        np.testing.assert_array_equal(space.high[:feature_dim], 1)
    assert np.isinf(space.high[feature_dim:]).all()
    for obs in rollout(env, 5):
        assert obs.shape == space.shape and obs.dtype == np.float32 and space.contains(obs)
    env.close()


@pytest.mark.parametrize("belief", [False, True])
def test_env_checkers_pass(model_path: Path, belief: bool, checker_findings) -> None:
    from conftest import INFINITE_BOX

    env = KeypointObservation(pixel_env(), model_path, belief=belief)
    # the only finding: the belief's dims are unbounded (a GRU state and a Gaussian latent)
    assert checker_findings(env) == (INFINITE_BOX if belief else [])
    env.close()


def test_shimmy_state_env_gets_keypoints_from_renders(model: PerceptionModel) -> None:
    import shimmy  # noqa: F401  (registers dm_control/...)

    env = gym.make("dm_control/cartpole-swingup-v0", render_mode="rgb_array",
                   render_kwargs={"width": SIZE, "height": SIZE})
    assert isinstance(env.observation_space, gym.spaces.Dict)
    wrapped = KeypointObservation(env, model, belief=True)
    observations = rollout(wrapped, 3)
    for obs in observations:
        assert obs.shape == (K * 3 + BELIEF_DIM,) and wrapped.observation_space.contains(obs)
    with torch.inference_mode():  # the features are those of the rendered frame
        frame = np.ascontiguousarray(env.render())  # dm_control's frames have negative strides
        np.testing.assert_allclose(observations[-1][: K * 3], gate_by_intensity(model.encode(frame[None]))[0].numpy(),
                                   atol=1e-6)
    wrapped.close()


# ---------------------------------------------------------------------------------------------- belief


def test_belief_follows_the_vrnn_and_resets(model: PerceptionModel) -> None:
    env = KeypointObservation(pixel_env(), model, belief=True)
    raw = pixel_env()
    observations, frames = rollout(env, 4), rollout(raw, 4)
    actions_env = gym.spaces.Box(-1, 1, (1,), np.float32)
    actions_env.seed(0)
    with torch.inference_mode():  # the same chain by hand: zero action first, then the actions taken
        state = model.dynamics.initial_state(1)
        actions = [np.zeros(1, np.float32)] + [actions_env.sample() for _ in range(4)]
        for t, (frame, action) in enumerate(zip(frames, actions)):
            features = model.encode(frame[None])
            state, _ = model.dynamics.observe_step(state, features, torch.as_tensor(action)[None])
            expected = torch.cat([gate_by_intensity(features), model.dynamics.belief(state)], -1)[0].numpy()
            np.testing.assert_allclose(observations[t], expected, atol=1e-5)
    assert not np.allclose(observations[1][K * 3:], observations[4][K * 3:])  # the belief moves
    # same seed -> same first observation, whatever episode came before
    rollout(env, 3, seed=7)
    np.testing.assert_array_equal(env.reset(seed=0)[0], observations[0])
    env.close()
    raw.close()


# ------------------------------------------------------------------------------------------ vector env


def test_vec_wrapper_matches_per_env_wrapping(model: PerceptionModel) -> None:
    n, steps, limit = 3, 6, 4  # episodes of 4 steps: every sub-env auto-resets once
    venv = VecKeypointObservation(DummyVecEnv([lambda: pixel_env(max_episode_steps=limit)] * n), model,
                                  belief=True)
    singles = [KeypointObservation(pixel_env(max_episode_steps=limit), model, belief=True) for _ in range(n)]
    venv.seed(10)
    obs = venv.reset()
    expected = [env.reset(seed=10 + i)[0] for i, env in enumerate(singles)]
    np.testing.assert_allclose(obs, np.stack(expected), atol=1e-5)
    rng = np.random.default_rng(0)
    terminal_seen = 0
    for _ in range(steps):
        actions = rng.uniform(-1, 1, (n, 1)).astype(np.float32)
        obs, _, dones, infos = venv.step(actions)
        assert obs.shape == (n, K * 3 + BELIEF_DIM) and obs.dtype == np.float32
        for i, env in enumerate(singles):
            single, _, terminated, truncated, _ = env.step(actions[i])
            assert dones[i] == (terminated or truncated)
            if dones[i]:
                terminal = infos[i]["terminal_observation"]
                assert terminal.shape == (K * 3 + BELIEF_DIM,)
                np.testing.assert_allclose(terminal, single, atol=1e-5)
                single = env.reset()[0]
                terminal_seen += 1
            np.testing.assert_allclose(obs[i], single, atol=1e-5)
    assert terminal_seen == n
    venv.close()


# ----------------------------------------------------------------------------------------- world model


def test_world_model_info_and_reward_replacement(model: PerceptionModel) -> None:
    env = WorldModel(pixel_env(), model)
    obs, info = env.reset(seed=0)
    assert obs.shape == (SIZE, SIZE, 3) and info["predicted_features"].shape == (K * 3,)
    obs, reward, *_, info = env.step(np.array([0.5], np.float32))
    assert isinstance(info["predicted_reward"], float) and "true_reward" not in info
    assert info["predicted_features"].shape == (K * 3,) and info["predicted_features"].dtype == np.float32
    assert env.belief.shape == (BELIEF_DIM,)
    with torch.inference_mode():  # what the docstring promises: observe_step's outputs
        state = model.dynamics.initial_state(1)
        state, _ = model.dynamics.observe_step(state, model.encode(env.reset(seed=0)[0][None]), torch.zeros(1, 1))
        state, out = model.dynamics.observe_step(state, model.encode(env.step(np.array([0.5], np.float32))[0][None]),
                                                 torch.full((1, 1), 0.5))
    assert info["predicted_reward"] == pytest.approx(out.reward.item(), abs=1e-6)
    np.testing.assert_allclose(info["predicted_features"], out.features[0].numpy(), atol=1e-6)

    replaced = WorldModel(pixel_env(), model, replace_reward=True)
    replaced.reset(seed=0)
    _, reward2, *_, info2 = replaced.step(np.array([0.5], np.float32))
    assert reward2 == info2["predicted_reward"] == pytest.approx(info["predicted_reward"])
    assert info2["true_reward"] == reward
    env.close()
    replaced.close()


def test_world_model_reuses_keypoint_observations(model: PerceptionModel, model_path: Path) -> None:
    on_pixels = WorldModel(pixel_env(), model)
    composed = WorldModel(KeypointObservation(pixel_env(), model_path, belief=True))
    by_path = WorldModel(KeypointObservation(pixel_env(), model_path), model_path)
    for env in (composed, by_path):  # one perception: the inner wrapper's features and belief, not computed again
        assert env.perception is env.env.perception and env._frame is None
    with pytest.raises(ValueError, match="pass model=None to share"):  # another model object, and no frames
        WorldModel(KeypointObservation(pixel_env(), model_path), model)
    separate = WorldModel(KeypointObservation(pixel_env(render_mode="rgb_array"), model_path), model)
    assert separate.perception is not separate.env.perception and separate._frame is not None
    for env in (on_pixels, composed, by_path, separate):
        env.reset(seed=3)
    for _ in range(3):
        action = np.array([0.3], np.float32)
        infos = [env.step(action)[-1] for env in (on_pixels, composed, by_path, separate)]
        for info in infos[1:]:
            assert info["predicted_reward"] == pytest.approx(infos[0]["predicted_reward"], abs=1e-5)
    obs = composed.step(np.array([0.3], np.float32))[0]  # the inner belief is the world model's
    np.testing.assert_allclose(obs[K * 3:], composed.belief, atol=1e-6)
    for env in (on_pixels, composed, by_path, separate):
        env.close()
    with pytest.raises(ValueError, match="pass a model, or wrap a KeypointObservation"):
        WorldModel(pixel_env())


def test_world_model_imagine_shapes(model: PerceptionModel) -> None:
    env = WorldModel(pixel_env(), model)
    with pytest.raises(RuntimeError, match="reset"):
        env.imagine(np.zeros((5, 1)))
    env.reset(seed=0)
    one = env.imagine(np.zeros((5, 1), np.float32))
    assert one["features"].shape == (1, 1, 5, K * 3) and one["rewards"].shape == (1, 1, 5)
    many = env.imagine(np.zeros((3, 5, 1), np.float32), num_samples=2)
    assert many["features"].shape == (2, 3, 5, K * 3) and many["rewards"].shape == (2, 3, 5)
    assert many["features"].dtype == np.float32
    with pytest.raises(ValueError, match=r"\(N, M, 1\)"):
        env.imagine(np.zeros((3, 5, 2)))
    env.close()


# ------------------------------------------------------------------------------------------- bad input


def test_frame_size_mismatch_names_both_sizes(model: PerceptionModel) -> None:
    model64 = tiny_model(size=64)
    with pytest.raises(ValueError, match="32x32.*64x64"):
        KeypointObservation(pixel_env(32), model64)
    with pytest.raises(ValueError, match="32x32.*64x64"):
        VecKeypointObservation(DummyVecEnv([lambda: pixel_env(32)]), model64)
    with pytest.raises(ValueError, match="32x32.*64x64"):
        WorldModel(pixel_env(32), model64)
    import shimmy  # noqa: F401

    rendering = KeypointObservation(gym.make("dm_control/cartpole-swingup-v0", render_mode="rgb_array",
                                             render_kwargs={"width": 48, "height": 48}), model)
    with pytest.raises(ValueError, match="48x48.*32x32"):  # rendered size is known at the first frame
        rendering.reset(seed=0)


def test_env_without_frames_is_rejected(model: PerceptionModel) -> None:
    with pytest.raises(ValueError, match="render_mode='rgb_array'"):
        KeypointObservation(gym.make("Pendulum-v1"), model)
    with pytest.raises(ValueError, match="render_mode='rgb_array'"):
        WorldModel(gym.make("Pendulum-v1"), model)
    with pytest.raises(ValueError, match="AddRenderObservation"):
        VecKeypointObservation(DummyVecEnv([lambda: gym.make("Pendulum-v1")]), model)


@pytest.mark.parametrize("device", ["cuda:7", "tpu"])
def test_unknown_device_is_rejected(model_path: Path, device: str) -> None:
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    for make in (lambda: KeypointObservation(pixel_env(), model_path, device=device),
                 lambda: WorldModel(pixel_env(), model_path, device=device)):
        with pytest.raises(ValueError, match=device):
            make()


def test_wrong_models_are_rejected(tmp_path: Path, model: PerceptionModel) -> None:
    no_dynamics = tmp_path / "autoencoder.pt"
    tiny_model(dynamics=False).save(no_dynamics)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(1)}, foreign)
    with pytest.raises(CheckpointError, match="not a kp_rl model"):
        KeypointObservation(pixel_env(), foreign)
    with pytest.raises(CheckpointError, match="not found"):
        KeypointObservation(pixel_env(), tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="without dynamics"):
        KeypointObservation(pixel_env(), no_dynamics, belief=True)
    with pytest.raises(CheckpointError, match="without dynamics"):
        WorldModel(pixel_env(), no_dynamics)
    with pytest.raises(ValueError, match="needs a model with dynamics"):
        WorldModel(pixel_env(), tiny_model(dynamics=False))
    with pytest.raises(ValueError, match="needs a model with dynamics"):
        VecKeypointObservation(DummyVecEnv([pixel_env]), tiny_model(dynamics=False), belief=True)
    with pytest.raises(TypeError, match="PerceptionModel or a checkpoint path"):
        KeypointObservation(pixel_env(), object())
    wide = kp_rl.make_env("reacher-easy", image_size=SIZE)  # 2-dim actions, the model's dynamics take 1
    with pytest.raises(ValueError, match="1-dim actions.*has 2"):
        WorldModel(wide, model)
    KeypointObservation(wide, model)  # without the belief the action size does not matter


def test_thread_count_is_set_while_encoding_and_restored(model: PerceptionModel,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    previous = torch.get_num_threads()
    env = KeypointObservation(pixel_env(), model, num_threads=1)
    seen, encode = [], PerceptionModel.encode  # the wrappers' CPU path: the model's own encode
    monkeypatch.setattr(PerceptionModel, "encode",
                        lambda self, frames: seen.append(torch.get_num_threads()) or encode(self, frames))
    env.reset(seed=0)
    assert seen == [1] and torch.get_num_threads() == previous
    with pytest.raises(ValueError, match="num_threads must be a positive integer or None, got 0"):
        KeypointObservation(pixel_env(), model, num_threads=0)


class DiscretePixels(gym.Env):
    """Random frames and 3 discrete actions: the belief sees them one-hot."""

    observation_space = gym.spaces.Box(0, 255, (SIZE, SIZE, 3), np.uint8)
    action_space = gym.spaces.Discrete(3)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), 0.0, False, False, {}


def test_discrete_actions_enter_the_belief_one_hot() -> None:
    torch.manual_seed(0)
    model = PerceptionModel(kp_rl.get_preset("cpu").replace(**TINY), action_dim=3, with_dynamics=True).eval()
    env = WorldModel(DiscretePixels(), model)
    obs, _ = env.reset(seed=0)
    state = env.state
    obs, *_ = env.step(2)
    with torch.inference_mode():
        expected, _ = model.dynamics.observe_step(state, model.encode(obs[None]), torch.tensor([[0.0, 0.0, 1.0]]))
        np.testing.assert_allclose(env.belief, model.dynamics.belief(expected)[0].numpy(), atol=1e-6)


def test_docstring_examples_run() -> None:
    import kp_rl.perception

    for module in (kp_rl.wrappers, kp_rl.perception):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0 and result.failed == 0


def test_state_observation_is_the_low_dimensional_state(checker_findings) -> None:
    from conftest import INFINITE_BOX

    from kp_rl.wrappers import StateObservation

    env = StateObservation(gym.make("kp_rl/cartpole-swingup-v0", image_size=16))
    with pytest.raises(RuntimeError, match="call reset"):
        env.observation(None)
    obs, info = env.reset(seed=0)
    np.testing.assert_array_equal(obs, info["state"])
    np.testing.assert_array_equal(env.observation(None), obs)  # the last state, whatever frame is given
    obs, *_, info = env.step(env.action_space.sample())
    np.testing.assert_array_equal(obs, info["state"])
    assert checker_findings(env) == INFINITE_BOX  # dm_control's state is unbounded
    env.close()
    with pytest.raises(ValueError, match="info carries 'state'"):
        StateObservation(gym.make("Pendulum-v1"))


# ------------------------------------------------------------------------------------ gymnasium vector


def short_episodes() -> gym.Env:
    return gym.wrappers.TimeLimit(pixel_env(), max_episode_steps=3)


def test_gymnasium_vector_wrapper_matches_single_env_wrappers_across_autoresets(model: PerceptionModel) -> None:
    n, steps = 2, 8
    envs = kp_rl.wrappers.VectorKeypointObservation(gym.vector.SyncVectorEnv([short_episodes] * n), model,
                                                    belief=True)
    assert envs.single_observation_space.shape == (K * 3 + BELIEF_DIM,)
    assert envs.observation_space.shape == (n, K * 3 + BELIEF_DIM)
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, (steps, n, 1)).astype(np.float32)
    observations = [envs.reset(seed=10)[0]]
    dones = []
    for a in actions:
        obs, _, terminated, truncated, _ = envs.step(a)
        observations.append(obs)
        dones.append(terminated | truncated)
    assert all(envs.observation_space.contains(o) for o in observations)
    assert np.asarray(dones).any()  # the run crosses episode ends
    # each row is what a single-env wrapper sees, resetting where Gymnasium's NEXT_STEP autoreset does
    for i in range(n):
        single = KeypointObservation(short_episodes(), model, belief=True)
        expected, done = [single.reset(seed=10 + i)[0]], False
        for t, a in enumerate(actions):
            if done:
                expected.append(single.reset()[0])
                done = False
            else:
                obs, _, terminated, truncated, _ = single.step(a[i])
                expected.append(obs)
                done = terminated or truncated
        np.testing.assert_allclose(np.stack([o[i] for o in observations]), np.stack(expected), atol=1e-5)
        single.close()
    envs.close()


def test_gymnasium_vector_reset_mask_restarts_only_the_masked_beliefs(model: PerceptionModel) -> None:
    make = lambda: pixel_env()  # noqa: E731
    envs = kp_rl.wrappers.VectorKeypointObservation(
        gym.vector.SyncVectorEnv([make] * 2, autoreset_mode=gym.vector.AutoresetMode.DISABLED), model, belief=True)
    first, _ = envs.reset(seed=0)
    stepped, *_ = envs.step(np.full((2, 1), 0.5, np.float32))
    again, _ = envs.reset(seed=0, options={"reset_mask": np.array([True, False])})
    np.testing.assert_allclose(again[0], first[0], atol=1e-6)  # sub-env 0: reset frame, fresh belief
    np.testing.assert_allclose(again[1], stepped[1], atol=1e-6)  # sub-env 1: untouched
    envs.close()


def test_gymnasium_vector_bad_input(model: PerceptionModel) -> None:
    same_step = gym.vector.SyncVectorEnv([pixel_env], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    with pytest.raises(ValueError, match="NEXT_STEP and DISABLED autoreset modes, got SAME_STEP"):
        kp_rl.wrappers.VectorKeypointObservation(same_step, model)
    same_step.close()
    states = gym.vector.SyncVectorEnv([lambda: gym.make("CartPole-v1")])
    with pytest.raises(ValueError, match="needs uint8 \\(H, W, 3\\) image observations"):
        kp_rl.wrappers.VectorKeypointObservation(states, model)
    states.close()
    wide = gym.vector.SyncVectorEnv([lambda: pixel_env(size=64)])
    with pytest.raises(ValueError, match="gives 64x64 frames but the model expects 32x32"):
        kp_rl.wrappers.VectorKeypointObservation(wide, model)
    wide.close()
    envs = kp_rl.wrappers.VectorKeypointObservation(gym.vector.SyncVectorEnv([pixel_env]), model, belief=True)
    with pytest.raises(RuntimeError, match="call reset\\(\\) before step\\(\\)"):
        envs.step(np.zeros((1, 1), np.float32))
    envs.close()


@pytest.mark.timeout(120, method="thread")  # a hang is a blocked C call: kill, not signal
def test_gymnasium_async_vector_env(model: PerceptionModel) -> None:
    def run(envs: gym.vector.VectorEnv) -> list[np.ndarray]:
        envs = kp_rl.wrappers.VectorKeypointObservation(envs, model, belief=True)
        out = [envs.reset(seed=3)[0]] + [envs.step(np.full((2, 1), 0.3, np.float32))[0] for _ in range(3)]
        envs.close()
        return out

    np.testing.assert_allclose(np.stack(run(gym.vector.AsyncVectorEnv([pixel_env] * 2, context="spawn"))),
                               np.stack(run(gym.vector.SyncVectorEnv([pixel_env] * 2))), atol=1e-6)
    # Workers forked after this process rendered would hang in EGL: they fail with a message that says what to do
    rendered = pixel_env()
    rendered.reset(seed=0)
    forked = gym.vector.AsyncVectorEnv([pixel_env], context="fork")
    with pytest.raises(RuntimeError, match="forked from one that had already rendered.*context='spawn'"):
        forked.reset(seed=0)
    forked.close(terminate=True)
    rendered.close()


def test_wrapped_env_pickles(model: PerceptionModel) -> None:
    # SubprocVecEnv / Ray ship envs between processes: the copy is rebuilt from the constructor arguments
    import pickle

    env = WorldModel(KeypointObservation(pixel_env(), model, belief=True), model)
    first = rollout(env, 3)
    copy = pickle.loads(pickle.dumps(env))
    np.testing.assert_allclose(np.stack(rollout(copy, 3)), np.stack(first), atol=1e-6)
    env.close()
    copy.close()


def test_the_readme_rl_zoo_snippet_builds_the_wrapped_env(tmp_path: Path, checker_findings) -> None:
    """The rl-baselines3-zoo YAML in the README, applied as the zoo applies ``env_wrapper`` entries."""
    import importlib
    import re

    import yaml

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", readme, re.S) if "env_wrapper" in b)
    (env_id, hyperparams), = yaml.safe_load(block).items()
    path = tmp_path / "model.pt"
    tiny_model(size=64).save(path)  # the snippet's model, at the env's default 64x64 frames
    env = gym.make(env_id)
    for entry in hyperparams["env_wrapper"]:  # each "module.Class: {kwargs}", wrapped in order
        (name, kwargs), = entry.items()
        module, cls = name.rsplit(".", 1)
        env = getattr(importlib.import_module(module), cls)(env, **{**kwargs, "model": str(path)})
    assert isinstance(env, KeypointObservation) and env.belief
    assert env.observation_space.shape == (K * 3 + BELIEF_DIM,)
    from conftest import INFINITE_BOX

    assert checker_findings(env) == INFINITE_BOX
    env.close()
