"""Gymnasium and SB3 wrappers that put a trained :class:`~kp_rl.model.PerceptionModel` between pixels and an agent.

Frames come from the observation when it is a uint8 image ``(H, W, 3)``, otherwise from ``env.render()``
(``render_mode="rgb_array"``). Wrappers stacked on one env share one :class:`~kp_rl.perception.Perception`.
Time convention (that of :mod:`kp_rl.dynamics`): ``step(a_t)`` returns observation ``x_t`` and reward ``r_t``;
the belief after that step has seen ``a_t`` and ``x_t``. ``reset()`` observes the first frame with a zero action.

Example:
    >>> import gymnasium as gym, kp_rl
    >>> from stable_baselines3.common.vec_env import DummyVecEnv
    >>> cfg = kp_rl.get_preset("cpu").replace(keypoints={"image_size": 32, "num_keypoints": 4, "base_filters": 4})
    >>> model = kp_rl.PerceptionModel(cfg, action_dim=1, with_dynamics=True)
    >>> make = lambda: gym.make("kp_rl/cartpole-swingup-v0", image_size=32)
    >>> env = KeypointObservation(make(), model, belief=True)
    >>> env.observation_space.shape              # K * 3 + belief_dim (rnn_units + latent_dim)
    (148,)
    >>> env = WorldModel(env, replace_reward=True)   # shares the inner wrapper's model, features and belief
    >>> obs, info = env.reset(seed=0)
    >>> obs.dtype, bool(env.observation_space.contains(obs))
    (dtype('float32'), True)
    >>> obs, reward, *_, info = env.step(env.action_space.sample())
    >>> reward == info["predicted_reward"], "true_reward" in info, info["predicted_features"].shape
    (True, True, (12,))
    >>> out = env.imagine(np.zeros((3, 10, 1), np.float32), num_samples=4)   # N=3 plans of M=10 steps
    >>> out["features"].shape, out["rewards"].shape
    ((4, 3, 10, 12), (4, 3, 10))
    >>> venv = VecKeypointObservation(DummyVecEnv([make] * 2), model)   # an SB3 VecEnv
    >>> venv.reset().shape
    (2, 12)
    >>> envs = VectorKeypointObservation(gym.vector.SyncVectorEnv([make] * 2), model, belief=True)
    >>> envs.reset(seed=0)[0].shape, envs.single_observation_space.shape
    ((2, 148), (148,))
    >>> state_env = StateObservation(make())
    >>> obs, _ = state_env.reset(seed=0)
    >>> obs.shape, obs.dtype
    ((5,), dtype('float32'))
    >>> for e in (env, venv, envs, state_env):
    ...     e.close()
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper
from stable_baselines3.common.vec_env.base_vec_env import VecEnvObs, VecEnvStepReturn

from kp_rl.dynamics import VRNNState
from kp_rl.model import PerceptionModel
from kp_rl.perception import ModelLike, Perception

__all__ = ["KeypointObservation", "StateObservation", "VecKeypointObservation", "VectorKeypointObservation",
           "WorldModel"]


class _Perceiving:
    """What the keypoint observation wrappers share: a :class:`Perception` of their model, with or without belief."""

    perception: Perception
    belief: bool

    def _perceive(self, model: ModelLike, belief: bool, device: str | torch.device, num_threads: int | None,
                  action_space: spaces.Space) -> Perception:
        self.belief = bool(belief)
        self.perception = Perception(model, device, need_dynamics=belief, who=type(self).__name__,
                                     num_threads=num_threads, action_space=action_space)
        return self.perception

    @property
    def model(self) -> PerceptionModel:
        """The perception model (on its device, eval mode)."""
        return self.perception.model

    def _output(self, features: torch.Tensor) -> np.ndarray:
        return self.perception.output(features, self.perception.state if self.belief else None)


# ------------------------------------------------------------------------------- single-env observation


class KeypointObservation(_Perceiving, gym.ObservationWrapper, gym.utils.RecordConstructorArgs):
    """Replace observations with the model's flat features (+ the VRNN belief), as float32 ``(D,)``.

    Keypoint models give ``D = K * 3`` values ``(mu0 x0, mu0 y0, mu0, mu1 x1, ...)`` (``x, y`` in [-1, 1], x right,
    y up; ``mu`` in [0, 1]): each keypoint's coordinates weighted by its intensity, so a keypoint that is off shows
    no position (:func:`kp_rl.keypoints.gate_by_intensity`; the model's ``encode`` gives the raw ``(x, y, mu)``);
    CNN-baseline models a latent in [-1, 1]. With ``belief=True`` the VRNN's ``concat(h, z)``
    follows, reset on ``reset()`` and updated on every ``step`` with the action taken and the frame it produced.

    Args:
        env: the environment.
        model: a :class:`~kp_rl.model.PerceptionModel` or a checkpoint path (loaded with :func:`kp_rl.load`).
        belief: append the VRNN belief (the model needs dynamics).
        device: where the model runs (``cpu``, ``cuda``, ``cuda:N``, ``auto``); a model object is moved there.
        num_threads: torch CPU threads while the wrapper runs the model, restored afterwards (``None``: leave
            torch's global setting). One is fastest for single frames and safe on a loaded machine.

    Raises:
        ValueError: frame size differs from the model's, no frames (neither pixel observations nor ``rgb_array``
            rendering), ``belief=True`` without dynamics, another action size, a bad device or ``num_threads``.
        kp_rl.model.CheckpointError: the checkpoint is missing, foreign, or lacks the dynamics ``belief`` needs.
    """

    def __init__(self, env: gym.Env, model: ModelLike, belief: bool = False, device: str | torch.device = "cpu",
                 num_threads: int | None = 1) -> None:
        gym.utils.RecordConstructorArgs.__init__(self, model=model, belief=belief, device=str(device),
                                                 num_threads=num_threads)
        gym.ObservationWrapper.__init__(self, env)
        perception = self._perceive(model, belief, device, num_threads, env.action_space)
        self._frame = perception.frame_source(env)
        perception.tracks_belief = self.belief
        self.observation_space = perception.observation_space(self.belief)

    def _observe(self, observation: Any, action: Any) -> np.ndarray:
        with self.perception.running():
            return self._output(self.perception.observe(self._frame(observation), self.env.action_space, action))[0]

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None
              ) -> tuple[np.ndarray, dict[str, Any]]:
        """Reset the env and the belief; returns the first frame's features (+ belief)."""
        observation, info = self.env.reset(seed=seed, options=options)
        return self._observe(observation, None), info

    def step(self, action: Any) -> tuple[np.ndarray, SupportsFloat, bool, bool, dict[str, Any]]:
        """Step the env, encode the new frame and (``belief=True``) update the belief with ``action``."""
        observation, reward, terminated, truncated, info = self.env.step(action)
        return self._observe(observation, action), reward, terminated, truncated, info

    def observation(self, observation: Any) -> np.ndarray:
        """Encode one observation without updating the belief (the current belief is appended as is)."""
        if self.belief and self.perception.state is None:
            raise RuntimeError("KeypointObservation: call reset() before using the belief")
        with self.perception.running():
            return self._output(self.perception.encode(self._frame(observation)[None]))[0]


# ------------------------------------------------------------------------------------------ world model


class WorldModel(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Run the model's VRNN alongside the env: reward/feature estimates in ``info`` and imagined rollouts.

    Observations pass through unchanged; the VRNN state follows the env as :class:`KeypointObservation`'s belief
    does. ``info`` gets ``predicted_reward`` (float: the reward head's estimate of the reward just received, from
    the state after observing ``x_t``, not a forecast: see :meth:`imagine`) and ``predicted_features`` (float32
    ``(D,)``: the VRNN's reconstruction of ``x_t``'s features; on ``reset()`` too). ``replace_reward=True``
    returns the predicted reward and keeps the env's in ``info["true_reward"]``. Over a
    :class:`KeypointObservation` of the same model it shares that wrapper's perception (nothing computed twice).

    Args:
        env: the environment (pixels, a :class:`KeypointObservation` of it, or one that renders ``rgb_array``).
        model: a :class:`~kp_rl.model.PerceptionModel` with dynamics, or a checkpoint path; ``None``: the model
            of the :class:`KeypointObservation` below.
        replace_reward: return the predicted reward instead of the env's.
        device: where the model runs.
        num_threads: torch CPU threads while the wrapper runs the model (see :class:`KeypointObservation`).

    Raises:
        ValueError: the model has no dynamics, action size or frame size mismatch, no frames, bad device.
        kp_rl.model.CheckpointError: the checkpoint is missing, foreign, or has no dynamics.
    """

    def __init__(self, env: gym.Env, model: ModelLike | None = None, replace_reward: bool = False,
                 device: str | torch.device = "cpu", num_threads: int | None = 1) -> None:
        gym.utils.RecordConstructorArgs.__init__(self, model=model, replace_reward=replace_reward,
                                                 device=str(device), num_threads=num_threads)
        gym.Wrapper.__init__(self, env)
        inner = env
        while isinstance(inner, gym.Wrapper) and not isinstance(inner, KeypointObservation):
            inner = inner.env
        inner = inner if isinstance(inner, KeypointObservation) else None
        if inner is not None and env.observation_space == inner.observation_space and (
                model is None or model is inner.model
                or (isinstance(model, (str, Path)) and str(model) == inner.perception.model_path)):
            self.perception, self._frame = inner.perception, None
            if self.model.dynamics is None:
                raise ValueError("WorldModel needs a model with dynamics (a trained VRNN); the KeypointObservation "
                                 "below has only an autoencoder")
        elif model is None:
            raise ValueError("WorldModel: pass a model, or wrap a KeypointObservation whose model it shares")
        else:
            self.perception = Perception(model, device, need_dynamics=True, who="WorldModel", num_threads=num_threads)
            try:
                self._frame = self.perception.frame_source(env)
            except ValueError as exc:
                if inner is None:
                    raise
                raise ValueError(f"{exc}; over a KeypointObservation, pass model=None to share its model") from None
        self.perception.check_action_space(env.action_space)
        self.perception.tracks_belief = self.perception.wants_outputs = True
        self.replace_reward = bool(replace_reward)

    @property
    def model(self) -> PerceptionModel:
        return self.perception.model

    @property
    def state(self) -> VRNNState | None:
        """The VRNN state after the last observed step (batch of 1), ``None`` before ``reset()``."""
        return self.perception.state

    @property
    def belief(self) -> np.ndarray:
        """The current belief ``concat(h, z)``, float32 ``(belief_dim,)``."""
        self._check_reset()
        with self.perception.running():
            return self.model.dynamics.belief(self.perception.state)[0].cpu().numpy()

    def _check_reset(self) -> None:
        if self.perception.state is None:
            raise RuntimeError("WorldModel: call reset() first")

    def _observe(self, observation: Any, action: Any) -> None:
        """Own frames: encode and update the belief (a shared perception was updated by the inner wrapper)."""
        if self._frame is not None:
            with self.perception.running():
                self.perception.observe(self._frame(observation), self.env.action_space, action)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        """Reset the env and the VRNN state; ``info["predicted_features"]`` is the first frame's ``x̂_0``."""
        observation, info = self.env.reset(seed=seed, options=options)
        self._observe(observation, None)
        return observation, {**info, "predicted_features": self.perception.last_output.features[0].cpu().numpy()}

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        """Step the env and the VRNN; adds ``predicted_reward`` and ``predicted_features`` to ``info``."""
        self._check_reset()
        observation, reward, terminated, truncated, info = self.env.step(action)
        self._observe(observation, action)
        out = self.perception.last_output
        predicted = torch.cat([out.reward, out.features[0]]).cpu().numpy()  # one device -> host copy
        info = {**info, "predicted_reward": float(predicted[0]), "predicted_features": predicted[1:]}
        if self.replace_reward:
            info["true_reward"] = reward
            reward = info["predicted_reward"]
        return observation, reward, terminated, truncated, info

    def imagine(self, actions: np.ndarray, num_samples: int = 1, sample: bool = True) -> dict[str, np.ndarray]:
        """Open-loop rollouts from the current belief (the env is not touched).

        Args:
            actions: ``(M, A)`` one action sequence, or ``(N, M, A)`` ``N`` sequences that all start from the
                current belief; ``actions[..., m, :]`` is taken before the ``m``-th imagined observation.
            num_samples: ``S`` rollouts per sequence (prior samples).
            sample: sample the prior (``False``: its mean; all ``S`` rollouts then agree).
        Returns:
            ``{"features": (S, N, M, D), "rewards": (S, N, M)}`` float32 (``N = 1`` for ``(M, A)`` input).
        """
        self._check_reset()
        actions = np.asarray(actions, np.float32)
        if actions.ndim == 2:
            actions = actions[None]
        if actions.ndim != 3 or actions.shape[-1] != self.model.action_dim:
            raise ValueError(f"WorldModel.imagine: expected actions (M, {self.model.action_dim}) or "
                             f"(N, M, {self.model.action_dim}), got shape {np.shape(actions)}")
        batch = actions.shape[0]
        with self.perception.running():
            state = VRNNState(*(t.expand(batch, -1) for t in self.perception.state))
            features, rewards = self.model.dynamics.imagine(
                state, torch.from_numpy(actions).to(self.perception.device), num_samples, sample)
            return {"features": features.cpu().numpy(), "rewards": rewards.cpu().numpy()}


# ---------------------------------------------------------------------------------------- vector envs


class VecKeypointObservation(_Perceiving, VecEnvWrapper):
    """:class:`KeypointObservation` for an SB3 ``VecEnv`` of uint8 pixel envs: all frames encoded in one batch.

    The model stays in this process (``SubprocVecEnv`` workers only step and render).
    ``infos[i]["terminal_observation"]`` is encoded in the same batch, with the belief after the terminal frame;
    the sub-env's belief restarts on the frame the auto-reset returned.

    Args:
        venv: the vectorised env (pixels); the other arguments are those of :class:`KeypointObservation`.
    """

    def __init__(self, venv: VecEnv, model: ModelLike, belief: bool = False, device: str | torch.device = "cpu",
                 num_threads: int | None = 1) -> None:
        perception = self._perceive(model, belief, device, num_threads, venv.action_space)
        perception.check_vector_frames(venv.observation_space)
        super().__init__(venv, observation_space=perception.observation_space(self.belief))
        self._actions: np.ndarray | None = None
        # the raw frames of the last reset / step, and of the episodes that just ended (online perception reads them)
        self.last_frames: np.ndarray | None = None
        self.last_terminal_frames: dict[int, np.ndarray] = {}

    def reset(self) -> VecEnvObs:
        observations = self.venv.reset()
        self.last_frames, self.last_terminal_frames = observations, {}
        perception = self.perception
        with perception.running():
            features = perception.encode(observations)
            if self.belief:
                perception.state = perception.advance(None, features, None)
            return self._output(features)

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = actions
        self.venv.step_async(actions)

    def step_wait(self) -> VecEnvStepReturn:
        observations, rewards, dones, infos = self.venv.step_wait()
        perception = self.perception
        n = self.num_envs
        terminal = [int(i) for i in np.flatnonzero(dones) if "terminal_observation" in infos[i]]
        self.last_frames = observations
        self.last_terminal_frames = {i: infos[i]["terminal_observation"] for i in terminal}
        frames = observations
        if terminal:  # one batch: current frames, then the terminal frames
            frames = np.concatenate([observations, np.stack(list(self.last_terminal_frames.values()))])
        with perception.running():
            features = perception.encode(frames)
            state = None
            if self.belief:
                if perception.state is None:
                    raise RuntimeError("VecKeypointObservation: call reset() before step()")
                actions = perception.actions(self.action_space, self._actions, n)
                # rows 0..n-1: the current frames, restarting where the sub-env reset; rows n..: the terminal
                # frames, continuing the episode that just ended
                state = VRNNState(*(torch.cat([t, t[terminal]]) for t in perception.state))
                restart = np.concatenate([np.asarray(dones, bool), np.zeros(len(terminal), bool)])
                state = perception.advance(state, features, torch.cat([actions, actions[terminal]]), restart)
                perception.state = VRNNState(*(t[:n] for t in state))
            out = perception.output(features, state)
        for row, i in enumerate(terminal):
            infos[i]["terminal_observation"] = out[n + row]
        return out[:n], rewards, dones, infos


class VectorKeypointObservation(_Perceiving, gym.vector.VectorWrapper):
    """:class:`KeypointObservation` for a Gymnasium ``VectorEnv``: all sub-envs' frames encoded in one batch.

    Autoreset modes: ``NEXT_STEP`` (the reset frame's belief starts over) and ``DISABLED``
    (``reset(options={"reset_mask": mask})`` restarts the masked sub-envs' beliefs). ``SAME_STEP`` is refused, as
    Gymnasium's own observation wrappers do: its final observations would stay pixels in ``info``.

    Args:
        env: the vector env, with uint8 ``(H, W, 3)`` image observations per sub-env; the other arguments are
            those of :class:`KeypointObservation`.

    Raises:
        ValueError: ``SAME_STEP`` autoreset, and the errors of :class:`KeypointObservation`.
    """

    def __init__(self, env: gym.vector.VectorEnv, model: ModelLike, belief: bool = False,
                 device: str | torch.device = "cpu", num_threads: int | None = 1) -> None:
        super().__init__(env)
        perception = self._perceive(model, belief, device, num_threads, env.single_action_space)
        perception.check_vector_frames(env.single_observation_space)
        self._mode = gym.vector.AutoresetMode(env.metadata.get("autoreset_mode", gym.vector.AutoresetMode.NEXT_STEP))
        if self._mode == gym.vector.AutoresetMode.SAME_STEP:
            raise ValueError("VectorKeypointObservation supports the NEXT_STEP and DISABLED autoreset modes, got "
                             "SAME_STEP (its final observations would stay pixels in info)")
        self.single_observation_space = perception.observation_space(self.belief)
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, self.num_envs)
        self._restart = np.zeros(self.num_envs, bool)  # sub-envs whose next frame is a reset frame (NEXT_STEP)

    def reset(self, *, seed: int | list[int | None] | None = None, options: dict[str, Any] | None = None
              ) -> tuple[np.ndarray, dict[str, Any]]:
        """Reset the sub-envs (all, or ``options["reset_mask"]``) and their beliefs; returns their features."""
        perception = self.perception
        mask = None if options is None else options.get("reset_mask")  # read before the env pops it
        restart = np.ones(self.num_envs, bool) if mask is None or perception.state is None else np.asarray(mask, bool)
        observations, infos = self.env.reset(seed=seed, options=options)
        with perception.running():
            features = perception.encode(observations)
            if self.belief:  # a fresh belief from each reset frame; sub-envs outside the mask keep theirs
                state = perception.advance(perception.state, features, None, restart)
                if not restart.all():
                    rows = torch.from_numpy(restart).to(features.device)[:, None]
                    state = VRNNState(*(torch.where(rows, new, old) for new, old in zip(state, perception.state)))
                perception.state = state
            out = self._output(features)
        self._restart[restart] = False
        return out, infos

    def step(self, actions: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Step the sub-envs, encode their frames and (``belief=True``) update the beliefs with ``actions``."""
        perception = self.perception
        if self.belief and perception.state is None:
            raise RuntimeError("VectorKeypointObservation: call reset() before step()")
        observations, rewards, terminations, truncations, infos = self.env.step(actions)
        with perception.running():
            features = perception.encode(observations)
            if self.belief:
                perception.state = perception.advance(
                    perception.state, features, perception.actions(self.single_action_space, actions, self.num_envs),
                    self._restart)
            out = self._output(features)
        if self._mode == gym.vector.AutoresetMode.NEXT_STEP:
            self._restart = np.logical_or(terminations, truncations)
        return out, rewards, terminations, truncations, infos


class StateObservation(gym.ObservationWrapper, gym.utils.RecordConstructorArgs):
    """The oracle's observation: the low-dimensional state that ``kp_rl`` envs put in ``info["state"]``.

    Args:
        env: a ``kp_rl/<domain>-<task>-v0`` env (any env whose unwrapped env has a ``state_space`` and whose
            ``reset``/``step`` infos carry ``state``).
    """

    def __init__(self, env: gym.Env) -> None:
        gym.utils.RecordConstructorArgs.__init__(self)
        gym.ObservationWrapper.__init__(self, env)
        space = getattr(env.unwrapped, "state_space", None)
        if not isinstance(space, spaces.Box):
            raise ValueError(f"StateObservation needs an env with a state_space whose info carries 'state' "
                             f"(kp_rl envs do); {env.spec.id if env.spec else env} has none")
        self.observation_space = space
        self._state: np.ndarray | None = None

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        frame, info = self.env.reset(seed=seed, options=options)
        self._state = np.array(info["state"], np.float32)
        return self.observation(frame), info

    def step(self, action: Any):
        frame, reward, terminated, truncated, info = self.env.step(action)
        self._state = np.array(info["state"], np.float32)
        return self.observation(frame), reward, terminated, truncated, info

    def observation(self, observation: Any) -> np.ndarray:
        """The state of the last reset or step (the frame is not needed)."""
        if self._state is None:
            raise RuntimeError("StateObservation: call reset() first")
        return self._state.copy()
