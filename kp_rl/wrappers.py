"""Gymnasium and SB3 wrappers that put a trained :class:`~kp_rl.model.PerceptionModel` between pixels and an agent.

* :class:`KeypointObservation` — observation wrapper: pixels -> flat float32 keypoints ``(K*3,)`` (or the
  CNN baseline's latent), optionally followed by the VRNN belief ``concat(h, z)``.
* :class:`WorldModel` — adds the VRNN's reward and feature estimates to ``info``, can replace the reward with
  the predicted one, and imagines rollouts from the current belief (:meth:`WorldModel.imagine`).
* :class:`VecKeypointObservation` — the observation wrapper for an SB3 ``VecEnv``: all sub-envs' frames are
  encoded in one batch, in the main process.
* :class:`VectorKeypointObservation` — the same for a Gymnasium ``VectorEnv`` (``SyncVectorEnv``, ``AsyncVectorEnv``).

Frames come from the observation when it is a uint8 image ``(H, W, 3)`` (the ``kp_rl/<domain>-<task>-v0``
envs), otherwise from ``env.render()`` (``render_mode="rgb_array"``, e.g. Shimmy's
``dm_control/cartpole-swingup-v0`` with ``render_kwargs={"width": 64, "height": 64}``). The model runs in eval
mode under ``torch.inference_mode`` on the chosen device; each step makes one host -> device copy of the frame
batch and one device -> host copy of the result.

Time convention (that of :mod:`kp_rl.dynamics`): ``step(a_t)`` returns observation ``x_t`` and reward
``r_t``; the belief after that step has seen ``a_t`` and ``x_t``. ``reset()`` observes the first frame with
a zero action.

Example:
    >>> import gymnasium as gym, kp_rl
    >>> cfg = kp_rl.get_preset("cpu").replace(keypoints={"image_size": 32, "num_keypoints": 4, "base_filters": 4})
    >>> model = kp_rl.PerceptionModel(cfg, action_dim=1, with_dynamics=True)
    >>> env = gym.make("kp_rl/cartpole-swingup-v0", image_size=32)
    >>> env = WorldModel(KeypointObservation(env, model), model)
    >>> obs, info = env.reset(seed=0)
    >>> obs.shape, obs.dtype
    ((12,), dtype('float32'))
    >>> obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    >>> sorted(k for k in info if k.startswith("predicted"))
    ['predicted_features', 'predicted_reward']
    >>> env.imagine(np.zeros((5, 1), np.float32), num_samples=2)["features"].shape   # (S, N, M, D)
    (2, 1, 5, 12)
    >>> env.close()
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper
from stable_baselines3.common.vec_env.base_vec_env import VecEnvObs, VecEnvStepReturn

from kp_rl.dynamics import StepOutput, VRNNState
from kp_rl.inference import FastBelief, FastEncoder, GraphedCall, GraphedEncoder
from kp_rl.model import PerceptionModel, load, resolve_device

__all__ = ["KeypointObservation", "StateObservation", "VecKeypointObservation", "VectorKeypointObservation",
           "WorldModel", "feature_bounds"]

ModelLike = PerceptionModel | str | Path


# ---------------------------------------------------------------------------------------------- helpers


def feature_bounds(model: PerceptionModel) -> tuple[np.ndarray, np.ndarray]:
    """Bounds of :meth:`PerceptionModel.encode`'s output.

    Keypoints: ``x, y`` in [-1, 1] and ``mu`` in [0, 1], ordered ``(x0, y0, mu0, x1, ...)``; the CNN
    baseline's latent is tanh-bounded to [-1, 1].

    Returns:
        ``(low, high)``, float32 arrays of shape ``(feature_dim,)``.
    """
    if model.representation == "keypoints":
        low = np.tile(np.array([-1.0, -1.0, 0.0], np.float32), model.feature_dim // 3)
    else:
        low = np.full(model.feature_dim, -1.0, np.float32)
    return low, np.ones(model.feature_dim, np.float32)


def _is_pixel_space(space: spaces.Space) -> bool:
    return (isinstance(space, spaces.Box) and space.dtype == np.uint8 and len(space.shape) == 3
            and space.shape[-1] == 3)


def _same_model(a: PerceptionModel, b: PerceptionModel) -> bool:
    """Same object, or same config and representation with equal weights."""
    if a is b:
        return True
    if a.representation != b.representation or a.config != b.config:
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


def _observe_flat(model: PerceptionModel, h: torch.Tensor, z: torch.Tensor, x: torch.Tensor,
                  features: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``observe_step`` on and to flat tensors (what a CUDA graph captures)."""
    state, out = model.dynamics.observe_step(VRNNState(h, z, x), features, actions)
    return (*state, *out)


class _Running:
    """The context of :meth:`_Perception.running` (a small class: a generator-based context manager costs a
    wrapper step several microseconds more)."""

    __slots__ = ("threads", "previous", "mode")

    def __init__(self, threads: int | None) -> None:
        self.threads = threads

    def __enter__(self) -> None:
        self.mode = torch.inference_mode()
        self.mode.__enter__()
        self.previous = torch.get_num_threads()
        if self.threads is not None and self.previous != self.threads:
            torch.set_num_threads(self.threads)

    def __exit__(self, *exc: object) -> None:
        if self.threads is not None and self.previous != self.threads:
            torch.set_num_threads(self.previous)
        self.mode.__exit__(*exc)


class _Perception:
    """What the wrappers share: the model on its device, frames -> features, belief updates, conversions.

    Args:
        model: a :class:`PerceptionModel` (moved to ``device``, set to eval mode) or a checkpoint path.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        need_dynamics: the caller uses the VRNN (belief or world model).
        who: the wrapper's name, for error messages.
        num_threads: torch intra-op threads while the model runs on the CPU (``None``: torch's global setting).
    """

    def __init__(self, model: ModelLike, device: str | torch.device, need_dynamics: bool, who: str,
                 num_threads: int | None = 1) -> None:
        if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, int)
                                        or num_threads < 1):
            raise ValueError(f"{who}: num_threads must be a positive integer or None, got {num_threads!r}")
        self.num_threads = num_threads
        self.device = resolve_device(device)
        self.model_path: str | None = None
        if isinstance(model, (str, Path)):
            self.model_path = str(model)
            model = load(model, self.device, require_dynamics=need_dynamics)
        elif isinstance(model, PerceptionModel):
            if need_dynamics and model.dynamics is None:
                raise ValueError(f"{who} needs a model with dynamics (a trained VRNN); this "
                                 f"{model.representation!r} model has only an autoencoder")
            model = model.to(self.device).eval()
        else:
            raise TypeError(f"{who}: model must be a kp_rl.PerceptionModel or a checkpoint path, "
                            f"got {type(model).__name__}")
        self.model = model
        # the fast paths (resolve_device gives cpu or cuda): oneDNN on the CPU, CUDA graphs on a GPU, where a
        # step is launch-bound at these sizes
        self._fast: Callable[[np.ndarray], torch.Tensor] = FastEncoder(model) if self.device.type == "cpu" \
            else GraphedEncoder(model)
        self._graphed_observe: GraphedCall | None = None
        self._fast_belief = FastBelief(model) if self.device.type == "cpu" and model.dynamics is not None else None
        if self.device.type == "cuda" and model.dynamics is not None:
            self._graphed_observe = GraphedCall(functools.partial(_observe_flat, model),
                                                functools.partial(getattr, model, "dynamics"))
        self.feature_dim = model.feature_dim
        self.belief_dim = model.dynamics.belief_dim if model.dynamics is not None else 0
        self.who = who

    # -- spaces and checks ---------------------------------------------------------------------------------
    def observation_space(self, belief: bool) -> spaces.Box:
        low, high = feature_bounds(self.model)
        if belief:
            inf = np.full(self.belief_dim, np.inf, np.float32)
            low, high = np.concatenate([low, -inf]), np.concatenate([high, inf])
        return spaces.Box(low, high, dtype=np.float32)

    def check_frame_shape(self, shape: tuple[int, ...], source: str) -> None:
        size = self.model.image_size
        if len(shape) != 3 or shape[-1] != 3:
            raise ValueError(f"{self.who}: expected RGB frames (H, W, 3) from {source}, got shape {shape}")
        if shape[:2] != (size, size):
            raise ValueError(f"{self.who}: {source} gives {shape[0]}x{shape[1]} frames but the model expects "
                             f"{size}x{size}; make the env render at {size}x{size} (e.g. image_size={size} or "
                             f"render_kwargs={{'width': {size}, 'height': {size}}})")

    def check_action_space(self, space: spaces.Space) -> None:
        action_dim = spaces.flatdim(space)
        if action_dim != self.model.action_dim:
            raise ValueError(f"{self.who}: the model's dynamics were trained with {self.model.action_dim}-dim "
                             f"actions but the env's action space {space} has {action_dim}")

    # -- computation (callers hold running()) --------------------------------------------------------------
    def running(self) -> "_Running":
        """``torch.inference_mode`` with torch's CPU thread count set to ``num_threads`` (restored on exit).

        A handful of small frames gains nothing from intra-op threads, and on a loaded machine each parallel
        region waits for a descheduled thread: with 2 threads on 2 busy cores one ``encode`` took ~100 ms
        instead of ~1 ms (experiments/bench_wrapper.py). Setting the count costs well under a microsecond.
        """
        return _Running(self.num_threads if self.device.type == "cpu" else None)

    def encode(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 ``(B, H, W, 3)`` -> features ``(B, D)`` on the device: one host -> device copy.

        On the CPU through :class:`~kp_rl.inference.FastEncoder` (the same features, ~2.9x faster for one
        frame), on CUDA through :class:`~kp_rl.inference.GraphedEncoder` (CUDA graphs, frames copied in from
        a pinned buffer).
        """
        return self._fast(frames)

    def actions(self, space: spaces.Space, actions: Any, batch: int | None = None) -> torch.Tensor:
        """Actions as the dynamics see them: flattened (one-hot if discrete), clipped to a Box, ``(B, A)``.

        Args:
            space: the env's action space.
            actions: one action (``batch=None``) or ``batch`` of them stacked (a VecEnv's).
            batch: ``None`` for one unbatched action.
        """
        if isinstance(space, spaces.Box):
            flat = np.array(actions, np.float32).reshape(1 if batch is None else batch, -1)  # a copy: clipped in place
            # (minimum/maximum into the float32 array: Shimmy's bounds are float64; np.clip costs more here)
            np.maximum(np.minimum(flat, space.high.reshape(-1), out=flat), space.low.reshape(-1), out=flat)
        else:
            rows = [actions] if batch is None else list(actions)
            flat = np.stack([spaces.flatten(space, a) for a in rows]).astype(np.float32)
        tensor = torch.from_numpy(flat)
        return tensor if self.device.type == "cpu" else tensor.to(self.device)

    def initial_state(self, batch: int) -> VRNNState:
        return self.model.dynamics.initial_state(batch, self.device)

    def observe(self, state: VRNNState, features: torch.Tensor,
                actions: torch.Tensor | None) -> tuple[VRNNState, StepOutput]:
        if actions is None:
            actions = features.new_zeros(features.shape[0], self.model.action_dim)
        if self._graphed_observe is not None:
            self.model.dynamics._check_step(state, actions, features)  # shape errors, before any copy
            outputs = self._graphed_observe(*state, features, actions)
            return VRNNState(*outputs[:3]), StepOutput(*outputs[3:])
        return self.model.dynamics.observe_step(state, features, actions)

    def update(self, state: VRNNState, features: torch.Tensor, actions: torch.Tensor | None) -> VRNNState:
        """The belief after observing ``features`` (``observe`` without the predictions the caller would drop)."""
        if actions is None:
            actions = features.new_zeros(features.shape[0], self.model.action_dim)
        if self._graphed_observe is not None:  # one graph replay either way
            return self.observe(state, features, actions)[0]
        # the CPU (resolve_device gives cpu or cuda): update_belief's state, 21 vs 35 us at one env's batch
        assert self._fast_belief is not None
        return self._fast_belief(state, features, actions)

    def observe_restarting(self, state: VRNNState, features: torch.Tensor, actions: torch.Tensor,
                           restart: np.ndarray) -> VRNNState:
        """One belief update of a batch of sub-envs, where the rows in ``restart`` (bool ``(B,)``) start over.

        A restarting row sees its frame from a zero state with a zero action, as after ``reset()``; the others
        continue their episode with the action taken.
        """
        keep = torch.from_numpy(~np.asarray(restart, bool)).to(features)[:, None]
        return self.update(VRNNState(*(t * keep for t in state)), features, actions * keep)

    def output(self, features: torch.Tensor, state: VRNNState | None, space: spaces.Box) -> np.ndarray:
        """``(B, D [+ belief_dim])`` float32 numpy within ``space`` (one device -> host copy)."""
        if state is None:
            out = features.cpu().numpy()
        elif features.device.type == "cpu":  # KeypointVRNN.belief's concat(h, z), in numpy (cheaper call)
            out = np.concatenate([features.numpy(), state.h.numpy(), state.z.numpy()], axis=-1)
        else:
            out = torch.cat([features, self.model.dynamics.belief(state)], dim=-1).cpu().numpy()
        # float rounding can leave x = 1 + 1e-7 (minimum/maximum: np.clip costs several times more here)
        return np.maximum(np.minimum(out, space.high, out=out), space.low, out=out)


def _find_wrapper(env: gym.Env, kind: type) -> Any:
    while isinstance(env, gym.Wrapper):
        if isinstance(env, kind):
            return env
        env = env.env
    return None


# ------------------------------------------------------------------------------- single-env observation


class KeypointObservation(gym.ObservationWrapper, gym.utils.RecordConstructorArgs):
    """Replace observations with the model's flat features (+ the VRNN belief), as float32 ``(D,)``.

    Keypoint models give ``D = K * 3`` values ordered ``(x0, y0, mu0, x1, ...)`` with ``x, y`` in [-1, 1]
    (x right, y up) and ``mu`` in [0, 1]; CNN-baseline models a latent in [-1, 1]. With ``belief=True`` the
    VRNN's ``concat(h, z)`` (unbounded) follows: reset on ``reset()`` (zero state, then the first frame with a
    zero action), updated on every ``step`` with the action taken and the frame it produced.

    Frames: the observation when it is a uint8 ``(H, W, 3)`` image, else ``env.render()`` (needs
    ``render_mode="rgb_array"``; the frame size is then checked on the first ``reset``).

    Args:
        env: the environment.
        model: a :class:`~kp_rl.model.PerceptionModel` or a checkpoint path (loaded with :func:`kp_rl.load`).
        belief: append the VRNN belief (the model needs dynamics).
        device: where the model runs (``cpu``, ``cuda``, ``cuda:N``, ``auto``); a model object is moved there.
        num_threads: torch CPU threads while the wrapper runs the model, restored afterwards (``None``: leave
            torch's global setting). One is fastest for single frames and safe on a loaded machine.

    Raises:
        ValueError: frame size differs from the model's, no frames to be had (non-pixel observations and no
            ``rgb_array`` rendering), ``belief=True`` without dynamics, action size differs from the
            dynamics', an unknown/absent device, or a bad ``num_threads``.
        kp_rl.model.CheckpointError: the checkpoint is missing, foreign, or lacks the dynamics ``belief`` needs.

    Example:
        >>> import gymnasium as gym, kp_rl
        >>> from kp_rl.wrappers import KeypointObservation
        >>> cfg = kp_rl.get_preset("cpu").replace(keypoints={"image_size": 32, "num_keypoints": 4,
        ...                                                  "base_filters": 4})
        >>> model = kp_rl.PerceptionModel(cfg, action_dim=1, with_dynamics=True)
        >>> env = KeypointObservation(gym.make("kp_rl/cartpole-swingup-v0", image_size=32), model, belief=True)
        >>> env.observation_space.shape              # K * 3 + belief_dim (rnn_units + latent_dim)
        (148,)
        >>> obs, info = env.reset(seed=0)
        >>> obs.dtype, bool(env.observation_space.contains(obs))
        (dtype('float32'), True)
        >>> env.close()
    """

    def __init__(self, env: gym.Env, model: ModelLike, belief: bool = False, device: str | torch.device = "cpu",
                 num_threads: int | None = 1) -> None:
        gym.utils.RecordConstructorArgs.__init__(self, model=model, belief=belief, device=str(device),
                                                 num_threads=num_threads)
        gym.ObservationWrapper.__init__(self, env)
        self._perception = _Perception(model, device, need_dynamics=belief, who="KeypointObservation",
                                       num_threads=num_threads)
        self.belief = bool(belief)
        self._from_obs = _is_pixel_space(env.observation_space)
        if self._from_obs:
            self._perception.check_frame_shape(env.observation_space.shape, "the observation space")
        elif env.render_mode != "rgb_array":
            raise ValueError(f"KeypointObservation needs frames: uint8 (H, W, 3) image observations or "
                             f"render_mode='rgb_array', got observation space {env.observation_space} and "
                             f"render_mode={env.render_mode!r}")
        if belief:
            self._perception.check_action_space(env.action_space)
        self._frame_checked = self._from_obs
        self._state: VRNNState | None = None
        self.observation_space = self._perception.observation_space(self.belief)

    @property
    def model(self) -> PerceptionModel:
        """The perception model (on :attr:`device`, eval mode)."""
        return self._perception.model

    @property
    def device(self) -> torch.device:
        return self._perception.device

    def _frame(self, observation: Any) -> np.ndarray:
        frame = observation if self._from_obs else self.env.render()
        if not self._frame_checked:
            if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8:
                raise ValueError(f"KeypointObservation: env.render() must return a uint8 (H, W, 3) array, got "
                                 f"{type(frame).__name__} {getattr(frame, 'dtype', '')}")
            self._perception.check_frame_shape(frame.shape, "env.render()")
            self._frame_checked = True
        return frame

    def _encode(self, observation: Any, action: Any, update: bool, first: bool) -> np.ndarray:
        perception = self._perception
        with perception.running():
            features = perception.encode(self._frame(observation)[None])
            if not self.belief:
                return perception.output(features, None, self.observation_space)[0]
            if update:
                if first:
                    self._state = perception.initial_state(1)
                    actions = None
                else:
                    actions = perception.actions(self.env.action_space, action)
                self._state = perception.update(self._state, features, actions)
            if self._state is None:
                raise RuntimeError("KeypointObservation: call reset() before using the belief")
            return perception.output(features, self._state, self.observation_space)[0]

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None
              ) -> tuple[np.ndarray, dict[str, Any]]:
        """Reset the env and the belief; returns the first frame's features (+ belief)."""
        observation, info = self.env.reset(seed=seed, options=options)
        return self._encode(observation, None, update=True, first=True), info

    def step(self, action: Any) -> tuple[np.ndarray, SupportsFloat, bool, bool, dict[str, Any]]:
        """Step the env, encode the new frame and (``belief=True``) update the belief with ``action``."""
        observation, reward, terminated, truncated, info = self.env.step(action)
        return self._encode(observation, action, update=True, first=False), reward, terminated, truncated, info

    def observation(self, observation: Any) -> np.ndarray:
        """Encode one observation without updating the belief (the current belief is appended as is)."""
        return self._encode(observation, None, update=False, first=False)


# ------------------------------------------------------------------------------------------ world model


class WorldModel(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Run the model's VRNN alongside the env: reward/feature estimates in ``info`` and imagined rollouts.

    Observations pass through unchanged. The VRNN state is reset on ``reset()`` (zero state, first frame with
    a zero action) and updated on every ``step(a_t)`` with ``a_t`` and the new frame ``x_t``. Each step's
    ``info`` gets:

    * ``predicted_reward`` (float): the reward head's estimate ``r̂_t`` of the reward just received, computed
      from the state *after* observing ``x_t`` (GRU input ``a_t``, posterior mean ``z_t`` given ``x_t``),
      i.e. ``observe_step(...).reward``. It is a filtered estimate, not a forecast made before seeing ``x_t``
      (use :meth:`imagine` for forecasts).
    * ``predicted_features`` (float32 ``(D,)``): the VRNN's reconstruction ``x̂_t`` of the current frame's
      features (decoded from the same ``(h_t, z_t)``), to compare with the encoder's features of ``x_t``.

    ``reset()`` puts ``predicted_features`` in ``info`` too. With ``replace_reward=True`` ``step`` returns
    ``predicted_reward`` as the reward and keeps the env's in ``info["true_reward"]``.

    Frames come from pixel observations, from a :class:`KeypointObservation` directly below that uses the
    same model (its features are reused, not recomputed), or from ``env.render()`` (``rgb_array``).

    Args:
        env: the environment (pixels, a :class:`KeypointObservation` of it, or one that renders ``rgb_array``).
        model: a :class:`~kp_rl.model.PerceptionModel` with dynamics, or a checkpoint path.
        replace_reward: return the predicted reward instead of the env's.
        device: where the model runs.
        num_threads: torch CPU threads while the wrapper runs the model (see :class:`KeypointObservation`).

    Raises:
        ValueError: the model has no dynamics, action size or frame size mismatch, no frames, bad device.
        kp_rl.model.CheckpointError: the checkpoint is missing, foreign, or has no dynamics.

    Example:
        >>> import gymnasium as gym, kp_rl
        >>> from kp_rl.wrappers import WorldModel
        >>> cfg = kp_rl.get_preset("cpu").replace(keypoints={"image_size": 32, "num_keypoints": 4,
        ...                                                  "base_filters": 4})
        >>> model = kp_rl.PerceptionModel(cfg, action_dim=1, with_dynamics=True)
        >>> env = WorldModel(gym.make("kp_rl/cartpole-swingup-v0", image_size=32), model, replace_reward=True)
        >>> obs, info = env.reset(seed=0)
        >>> obs.shape                                  # pixels, unchanged
        (32, 32, 3)
        >>> obs, reward, *_, info = env.step(env.action_space.sample())
        >>> reward == info["predicted_reward"], "true_reward" in info
        (True, True)
        >>> out = env.imagine(np.zeros((3, 10, 1), np.float32), num_samples=4)   # N=3 plans of M=10 steps
        >>> out["features"].shape, out["rewards"].shape
        ((4, 3, 10, 12), (4, 3, 10))
        >>> env.close()
    """

    def __init__(self, env: gym.Env, model: ModelLike, replace_reward: bool = False,
                 device: str | torch.device = "cpu", num_threads: int | None = 1) -> None:
        gym.utils.RecordConstructorArgs.__init__(self, model=model, replace_reward=replace_reward,
                                                 device=str(device), num_threads=num_threads)
        gym.Wrapper.__init__(self, env)
        self._perception = _Perception(model, device, need_dynamics=True, who="WorldModel",
                                       num_threads=num_threads)
        self._perception.check_action_space(env.action_space)
        self.replace_reward = bool(replace_reward)
        self._source = self._frame_source(env)
        self._state: VRNNState | None = None

    def _frame_source(self, env: gym.Env) -> str:
        if _is_pixel_space(env.observation_space):
            self._perception.check_frame_shape(env.observation_space.shape, "the observation space")
            return "pixels"
        inner = _find_wrapper(env, KeypointObservation)
        if (inner is not None and env.observation_space == inner.observation_space
                and _same_model(inner.model, self._perception.model)):
            return "features"
        if env.render_mode == "rgb_array":
            return "render"
        raise ValueError(f"WorldModel needs frames: uint8 (H, W, 3) image observations, the observations of a "
                         f"KeypointObservation with the same model, or render_mode='rgb_array'; got observation "
                         f"space {env.observation_space} and render_mode={env.render_mode!r}")

    @property
    def model(self) -> PerceptionModel:
        return self._perception.model

    @property
    def state(self) -> VRNNState | None:
        """The VRNN state after the last observed step (batch of 1), ``None`` before ``reset()``."""
        return self._state

    @property
    def belief(self) -> np.ndarray:
        """The current belief ``concat(h, z)``, float32 ``(belief_dim,)``."""
        self._check_reset()
        with self._perception.running():
            return self._perception.model.dynamics.belief(self._state)[0].cpu().numpy()

    def _check_reset(self) -> None:
        if self._state is None:
            raise RuntimeError("WorldModel: call reset() first")

    def _features(self, observation: Any) -> torch.Tensor:
        perception = self._perception
        if self._source == "features":
            obs = np.asarray(observation, np.float32)[: perception.feature_dim]
            return torch.from_numpy(obs[None].copy()).to(perception.device)
        frame = observation if self._source == "pixels" else self.env.render()
        perception.check_frame_shape(np.shape(frame), "the env")
        return perception.encode(np.asarray(frame)[None])

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        """Reset the env and the VRNN state; ``info["predicted_features"]`` is the first frame's ``x̂_0``."""
        observation, info = self.env.reset(seed=seed, options=options)
        with self._perception.running():
            features = self._features(observation)
            self._state = self._perception.initial_state(1)
            self._state, out = self._perception.observe(self._state, features, None)
            info = {**info, "predicted_features": out.features[0].cpu().numpy()}
        return observation, info

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        """Step the env and the VRNN; adds ``predicted_reward`` and ``predicted_features`` to ``info``."""
        self._check_reset()
        observation, reward, terminated, truncated, info = self.env.step(action)
        perception = self._perception
        with self._perception.running():
            features = self._features(observation)
            actions = perception.actions(self.env.action_space, action)
            self._state, out = perception.observe(self._state, features, actions)
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
        with self._perception.running():
            state = VRNNState(*(t.expand(batch, -1) for t in self._state))
            features, rewards = self.model.dynamics.imagine(
                state, torch.from_numpy(actions).to(self._perception.device), num_samples, sample)
            return {"features": features.cpu().numpy(), "rewards": rewards.cpu().numpy()}


# ---------------------------------------------------------------------------------------- vector envs


class VecKeypointObservation(VecEnvWrapper):
    """:class:`KeypointObservation` for an SB3 ``VecEnv``: every sub-env's frame encoded in one batch.

    The sub-envs must return uint8 ``(H, W, 3)`` pixel observations (wrap envs that only render with
    ``gymnasium.wrappers.AddRenderObservation(env, render_only=True)``). The model stays in this (the main)
    process, so ``SubprocVecEnv`` workers only step and render. ``infos[i]["terminal_observation"]`` is
    encoded in the same batch; with ``belief=True`` it carries the belief after the terminal frame, and the
    sub-env's belief restarts on the frame the auto-reset returned.

    Args:
        venv: the vectorised env (pixels).
        model: a :class:`~kp_rl.model.PerceptionModel` or a checkpoint path.
        belief: append the VRNN belief (the model needs dynamics).
        device: where the model runs.
        num_threads: torch CPU threads while the wrapper runs the model (see :class:`KeypointObservation`).

    Example:
        >>> import gymnasium as gym, kp_rl
        >>> from stable_baselines3.common.vec_env import DummyVecEnv
        >>> from kp_rl.wrappers import VecKeypointObservation
        >>> cfg = kp_rl.get_preset("cpu").replace(keypoints={"image_size": 32, "num_keypoints": 4,
        ...                                                  "base_filters": 4})
        >>> model = kp_rl.PerceptionModel(cfg, action_dim=1)
        >>> venv = DummyVecEnv([lambda: gym.make("kp_rl/cartpole-swingup-v0", image_size=32)] * 2)
        >>> venv = VecKeypointObservation(venv, model)
        >>> venv.reset().shape
        (2, 12)
        >>> venv.close()
    """

    def __init__(self, venv: VecEnv, model: ModelLike, belief: bool = False, device: str | torch.device = "cpu",
                 num_threads: int | None = 1) -> None:
        self._perception = _Perception(model, device, need_dynamics=belief, who="VecKeypointObservation",
                                       num_threads=num_threads)
        if not _is_pixel_space(venv.observation_space):
            raise ValueError(f"VecKeypointObservation needs uint8 (H, W, 3) image observations, got "
                             f"{venv.observation_space}; wrap each env that only renders with "
                             f"gymnasium.wrappers.AddRenderObservation(env, render_only=True)")
        self._perception.check_frame_shape(venv.observation_space.shape, "the observation space")
        if belief:
            self._perception.check_action_space(venv.action_space)
        self.belief = bool(belief)
        super().__init__(venv, observation_space=self._perception.observation_space(self.belief))
        self._state: VRNNState | None = None
        self._actions: np.ndarray | None = None

    @property
    def model(self) -> PerceptionModel:
        return self._perception.model

    def reset(self) -> VecEnvObs:
        observations = self.venv.reset()
        perception = self._perception
        with self._perception.running():
            features = perception.encode(observations)
            if self.belief:
                self._state = perception.update(perception.initial_state(self.num_envs), features, None)
            return perception.output(features, self._state if self.belief else None, self.observation_space)

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = actions
        self.venv.step_async(actions)

    def step_wait(self) -> VecEnvStepReturn:
        observations, rewards, dones, infos = self.venv.step_wait()
        perception = self._perception
        n = self.num_envs
        terminal = [int(i) for i in np.flatnonzero(dones) if "terminal_observation" in infos[i]]
        frames = observations
        if terminal:  # one batch: current frames, then the terminal frames
            frames = np.concatenate([observations, np.stack([infos[i]["terminal_observation"] for i in terminal])])
        with self._perception.running():
            features = perception.encode(frames)
            state = None
            if self.belief:
                if self._state is None:
                    raise RuntimeError("VecKeypointObservation: call reset() before step()")
                actions = perception.actions(self.action_space, self._actions, n)
                # rows 0..n-1: the current frames, restarting where the sub-env reset; rows n..: the terminal
                # frames, continuing the episode that just ended
                state = VRNNState(*(torch.cat([t, t[terminal]]) for t in self._state))
                restart = np.concatenate([np.asarray(dones, bool), np.zeros(len(terminal), bool)])
                state = perception.observe_restarting(state, features, torch.cat([actions, actions[terminal]]),
                                                      restart)
                self._state = VRNNState(*(t[:n] for t in state))
            out = perception.output(features, state, self.observation_space)
        for row, i in enumerate(terminal):
            infos[i]["terminal_observation"] = out[n + row]
        return out[:n], rewards, dones, infos


class VectorKeypointObservation(gym.vector.VectorWrapper):
    """The observation wrapper for a Gymnasium ``VectorEnv`` (``SyncVectorEnv``, ``AsyncVectorEnv``, CleanRL-style
    scripts): all sub-envs' frames are encoded in one batch, in the main process.

    Observations are float32 ``(num_envs, D [+ belief_dim])``, each row as :class:`KeypointObservation` gives it.
    Autoreset modes: ``NEXT_STEP`` (Gymnasium's default: the step after an episode ends returns the reset frame,
    whose belief starts over) and ``DISABLED`` (``reset(options={"reset_mask": mask})`` restarts the masked
    sub-envs' beliefs; the others keep theirs). ``SAME_STEP`` is refused, as Gymnasium's own observation
    wrappers do: its final observations stay pixels in ``info``.

    Args:
        env: the vector env, with uint8 ``(H, W, 3)`` image observations per sub-env.
        model: a :class:`~kp_rl.model.PerceptionModel` or a checkpoint path.
        belief: append the VRNN belief (the model needs dynamics).
        device: where the model runs.
        num_threads: torch CPU threads while the wrapper runs the model (see :class:`KeypointObservation`).

    Raises:
        ValueError: no image observations, another frame size than the model's, ``SAME_STEP`` autoreset, and
            the errors of :class:`KeypointObservation`.

    Example:
        >>> import gymnasium as gym, kp_rl
        >>> from kp_rl.wrappers import VectorKeypointObservation
        >>> cfg = kp_rl.get_preset("cpu").replace(keypoints={"image_size": 32, "num_keypoints": 4,
        ...                                                  "base_filters": 4})
        >>> model = kp_rl.PerceptionModel(cfg, action_dim=1, with_dynamics=True)
        >>> envs = gym.vector.SyncVectorEnv([lambda: gym.make("kp_rl/cartpole-swingup-v0", image_size=32)] * 2)
        >>> envs = VectorKeypointObservation(envs, model, belief=True)
        >>> obs, info = envs.reset(seed=0)
        >>> obs.shape, envs.single_observation_space.shape
        ((2, 148), (148,))
        >>> envs.close()
    """

    def __init__(self, env: gym.vector.VectorEnv, model: ModelLike, belief: bool = False,
                 device: str | torch.device = "cpu", num_threads: int | None = 1) -> None:
        super().__init__(env)
        who = "VectorKeypointObservation"
        self._perception = _Perception(model, device, need_dynamics=belief, who=who, num_threads=num_threads)
        if not _is_pixel_space(env.single_observation_space):
            raise ValueError(f"{who} needs uint8 (H, W, 3) image observations, got {env.single_observation_space}; "
                             f"wrap each env that only renders with "
                             f"gymnasium.wrappers.AddRenderObservation(env, render_only=True)")
        self._perception.check_frame_shape(env.single_observation_space.shape, "the observation space")
        self._mode = gym.vector.AutoresetMode(env.metadata.get("autoreset_mode", gym.vector.AutoresetMode.NEXT_STEP))
        if self._mode == gym.vector.AutoresetMode.SAME_STEP:
            raise ValueError(f"{who} supports the NEXT_STEP and DISABLED autoreset modes, got SAME_STEP (its final "
                             f"observations would stay pixels in info)")
        if belief:
            self._perception.check_action_space(env.single_action_space)
        self.belief = bool(belief)
        self.single_observation_space = self._perception.observation_space(self.belief)
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, self.num_envs)
        self._state: VRNNState | None = None
        self._restart = np.zeros(self.num_envs, bool)  # sub-envs whose next frame is a reset frame (NEXT_STEP)

    @property
    def model(self) -> PerceptionModel:
        return self._perception.model

    def reset(self, *, seed: int | list[int | None] | None = None, options: dict[str, Any] | None = None
              ) -> tuple[np.ndarray, dict[str, Any]]:
        """Reset the sub-envs (all, or ``options["reset_mask"]``) and their beliefs; returns their features."""
        mask = None if options is None else options.get("reset_mask")  # read before the env pops it
        restart = np.ones(self.num_envs, bool) if mask is None or self._state is None else np.asarray(mask, bool)
        observations, infos = self.env.reset(seed=seed, options=options)
        perception = self._perception
        with perception.running():
            features = perception.encode(observations)
            if self.belief:  # a fresh belief from each reset frame, as after a full reset
                fresh = perception.update(perception.initial_state(self.num_envs), features, None)
                if restart.all():
                    self._state = fresh
                else:  # sub-envs outside the mask keep their belief
                    reset_rows = torch.from_numpy(restart).to(features.device)[:, None]
                    self._state = VRNNState(*(torch.where(reset_rows, new, old)
                                              for new, old in zip(fresh, self._state)))
            out = perception.output(features, self._state if self.belief else None, self.single_observation_space)
        self._restart[restart] = False
        return out, infos

    def step(self, actions: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Step the sub-envs, encode their frames and (``belief=True``) update the beliefs with ``actions``."""
        if self.belief and self._state is None:
            raise RuntimeError("VectorKeypointObservation: call reset() before step()")
        observations, rewards, terminations, truncations, infos = self.env.step(actions)
        perception = self._perception
        with perception.running():
            features = perception.encode(observations)
            if self.belief:
                self._state = perception.observe_restarting(
                    self._state, features, perception.actions(self.single_action_space, actions, self.num_envs),
                    self._restart)
            out = perception.output(features, self._state if self.belief else None, self.single_observation_space)
        if self._mode == gym.vector.AutoresetMode.NEXT_STEP:
            self._restart = np.logical_or(terminations, truncations)
        return out, rewards, terminations, truncations, infos


class StateObservation(gym.ObservationWrapper, gym.utils.RecordConstructorArgs):
    """The oracle's observation: the low-dimensional state that ``kp_rl`` envs put in ``info["state"]``.

    Args:
        env: a ``kp_rl/<domain>-<task>-v0`` env (any env whose ``reset``/``step`` infos carry ``state``).

    Example:
        >>> import gymnasium as gym, kp_rl
        >>> env = StateObservation(gym.make("kp_rl/cartpole-swingup-v0", image_size=16))
        >>> obs, _ = env.reset(seed=0)
        >>> obs.shape, obs.dtype
        ((5,), dtype('float32'))
        >>> env.close()
    """

    def __init__(self, env: gym.Env) -> None:
        gym.utils.RecordConstructorArgs.__init__(self)
        gym.ObservationWrapper.__init__(self, env)
        _, info = env.reset()
        if "state" not in info:
            raise ValueError(f"StateObservation needs an env whose info carries 'state' (kp_rl envs do); "
                             f"{env.spec.id if env.spec else env} gives {sorted(info)}")
        size = np.asarray(info["state"]).shape
        self.observation_space = spaces.Box(-np.inf, np.inf, size, np.float32)
        self._state = np.asarray(info["state"], np.float32)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        obs, info = self.env.reset(seed=seed, options=options)
        self._state = np.asarray(info["state"], np.float32)
        return self.observation(obs), info

    def step(self, action: Any):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._state = np.asarray(info["state"], np.float32)
        return self.observation(obs), reward, terminated, truncated, info

    def observation(self, observation: Any) -> np.ndarray:
        return self._state.copy()
