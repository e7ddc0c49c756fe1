"""The one front door between a trained :class:`~kp_rl.model.PerceptionModel` and the code that uses it.

:class:`Perception` is what every wrapper (:mod:`kp_rl.wrappers`), SB3 features extractor and callback
(:mod:`kp_rl.sb3`) holds: the model on its device, where an env's frames come from, frame-size checks, encoding
under ``torch.inference_mode`` and the VRNN belief.

Example:
    >>> import numpy as np, kp_rl
    >>> model = kp_rl.PerceptionModel(kp_rl.get_preset("tiny"), action_dim=1, with_dynamics=True)
    >>> perception = Perception(model, need_dynamics=True)
    >>> with perception.running():
    ...     features = perception.encode(np.zeros((2, 32, 32, 3), np.uint8))
    ...     state = perception.advance(None, features, None)          # a fresh belief for 2 envs
    >>> features.shape, perception.output(features, state).shape      # K*3, then K*3 + belief_dim
    (torch.Size([2, 12]), (2, 32))
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from kp_rl.dynamics import StepOutput, VRNNState
from kp_rl.model import PerceptionModel, load, resolve_device

ModelLike = PerceptionModel | str | Path

__all__ = ["ModelLike", "Perception", "is_pixel_space"]


def is_pixel_space(space: spaces.Space) -> bool:
    """A uint8 ``(H, W, 3)`` image space (what the encoder reads)."""
    return (isinstance(space, spaces.Box) and space.dtype == np.uint8 and len(space.shape) == 3
            and space.shape[-1] == 3)


class Perception:
    """A perception model on its device, with everything its users share.

    Args:
        model: a :class:`PerceptionModel` (moved to ``device``, set to eval mode) or a checkpoint path.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        need_dynamics: the caller uses the VRNN (a belief or a world model).
        representation: the representation the caller needs (``keypoints`` or ``cnn``), if any.
        who: the caller's name, for error messages.
        num_threads: torch intra-op threads while the model runs on the CPU (``None``: torch's global setting).
        action_space: with ``need_dynamics``, the env's (single) action space, checked against the dynamics'.
        channels_last: on the CPU, put the autoencoder's weights in the channels-last memory format (in place;
            oneDNN convolves it without reordering). ``False`` for callers that train the model (SB3's init).

    Attributes:
        tracks_belief: whether :meth:`observe` updates :attr:`state` (set by the wrappers that need it).
        wants_outputs: whether belief updates also compute the VRNN's reward and feature estimates
            (:attr:`last_output`; set by :class:`~kp_rl.wrappers.WorldModel`).
        state: the belief of the envs this object observes (``None`` before the first frame).
    """

    def __init__(self, model: ModelLike, device: str | torch.device = "cpu", need_dynamics: bool = False,
                 representation: str | None = None, who: str = "kp_rl", num_threads: int | None = 1,
                 action_space: spaces.Space | None = None, channels_last: bool = True) -> None:
        if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, int)
                                        or num_threads < 1):
            raise ValueError(f"{who}: num_threads must be a positive integer or None, got {num_threads!r}")
        self.who, self.num_threads = who, num_threads
        self.device = resolve_device(device)
        self.model_path: str | None = None
        if isinstance(model, (str, Path)):
            self.model_path = str(model)
            model = load(model, self.device, representation=representation, require_dynamics=need_dynamics)
        elif isinstance(model, PerceptionModel):
            if representation is not None and model.representation != representation:
                raise ValueError(f"{who} needs a {representation!r} model, got a {model.representation!r} model")
            if need_dynamics and model.dynamics is None:
                raise ValueError(f"{who} needs a model with dynamics (a trained VRNN); this "
                                 f"{model.representation!r} model has only an autoencoder")
            model = model.to(self.device).eval()
        else:
            raise TypeError(f"{who}: model must be a kp_rl.PerceptionModel or a checkpoint path, "
                            f"got {type(model).__name__}")
        if channels_last and self.device.type == "cpu":
            model.autoencoder.to(memory_format=torch.channels_last)
        self.model: PerceptionModel = model
        if need_dynamics and action_space is not None:
            self.check_action_space(action_space)
        # the features' bounds: keypoints (x0, y0, mu0, x1, ...) with x, y in [-1, 1] and mu in [0, 1]; CNN in [-1, 1]
        low = (np.tile(np.float32([-1, -1, 0]), model.feature_dim // 3) if model.representation == "keypoints"
               else np.full(model.feature_dim, -1, np.float32))
        high = np.ones(model.feature_dim, np.float32)
        inf = np.full(model.dynamics.belief_dim if model.dynamics is not None else 0, np.inf, np.float32)
        # (low, high) of the output without / with the belief
        self.bounds = {False: (low, high), True: (np.concatenate([low, -inf]), np.concatenate([high, inf]))}
        self.tracks_belief = self.wants_outputs = False
        self.state: VRNNState | None = None
        self.last_output: StepOutput | None = None

    # -- frames --------------------------------------------------------------------------------------------
    def check_frame_size(self, shape: tuple[int, ...], source: str) -> None:
        """Frames ``(H, W, 3)`` of the model's size, or a ValueError naming both sizes and the fix."""
        size = self.model.image_size
        if len(shape) != 3 or shape[-1] != 3:
            raise ValueError(f"{self.who}: expected RGB frames (H, W, 3) from {source}, got shape {tuple(shape)}")
        if tuple(shape[:2]) != (size, size):
            raise ValueError(f"{self.who}: {source} gives {shape[0]}x{shape[1]} frames but the model expects "
                             f"{size}x{size}; make the env render at {size}x{size} (e.g. image_size={size} or "
                             f"render_kwargs={{'width': {size}, 'height': {size}}})")

    def frame_source(self, env: gym.Env) -> "FrameSource":
        """Where ``env``'s frames come from (see :class:`FrameSource`); the observation space is checked now."""
        if is_pixel_space(env.observation_space):
            self.check_frame_size(env.observation_space.shape, "the observation space")
            return FrameSource(self, None)
        if env.render_mode != "rgb_array":
            raise ValueError(f"{self.who} needs frames: uint8 (H, W, 3) image observations or "
                             f"render_mode='rgb_array', got observation space {env.observation_space} and "
                             f"render_mode={env.render_mode!r}")
        return FrameSource(self, env)

    def check_vector_frames(self, space: spaces.Space) -> None:
        """A vector env's per-env observation space must be the model's frames (encoded in one batch)."""
        if not is_pixel_space(space):
            raise ValueError(f"{self.who} needs uint8 (H, W, 3) image observations, got {space}; wrap each env "
                             f"that only renders with gymnasium.wrappers.AddRenderObservation(env, render_only=True)")
        self.check_frame_size(space.shape, "the observation space")

    def check_action_space(self, space: spaces.Space) -> None:
        action_dim = spaces.flatdim(space)
        if action_dim != self.model.action_dim:
            raise ValueError(f"{self.who}: the model's dynamics were trained with {self.model.action_dim}-dim "
                             f"actions but the env's action space {space} has {action_dim}")

    # -- computation (callers hold running()) --------------------------------------------------------------
    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """``torch.inference_mode`` with torch's CPU thread count set to ``num_threads`` (restored on exit)."""
        previous = torch.get_num_threads()
        threads = self.num_threads if self.num_threads and self.device.type == "cpu" else previous
        if threads != previous:
            torch.set_num_threads(threads)
        try:
            with torch.inference_mode():
                yield
        finally:
            if threads != previous:
                torch.set_num_threads(previous)

    def encode(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 ``(B, H, W, 3)`` -> features ``(B, D)`` on the device (the model's own ``encode``)."""
        return self.model.encode(np.asarray(frames))

    def actions(self, space: spaces.Space, actions: Any, batch: int | None = None) -> torch.Tensor:
        """Actions as the dynamics see them: flattened (one-hot if discrete), clipped to a Box, ``(B, A)``.

        Args:
            space: the env's (single) action space.
            actions: one action (``batch=None``) or ``batch`` of them stacked.
            batch: ``None`` for one unbatched action.
        """
        if isinstance(space, spaces.Box):
            flat = np.clip(np.asarray(actions, np.float32).reshape(1 if batch is None else batch, -1),
                           space.low.reshape(-1), space.high.reshape(-1)).astype(np.float32)
        else:
            rows = [actions] if batch is None else list(actions)
            flat = np.stack([spaces.flatten(space, a) for a in rows]).astype(np.float32)
        return torch.from_numpy(flat).to(self.device)

    def advance(self, state: VRNNState | None, features: torch.Tensor, actions: torch.Tensor | None,
                restart: np.ndarray | None = None) -> VRNNState:
        """The belief after observing ``features`` (``(B, D)``) with ``actions`` (``(B, A)``).

        A ``None`` state, ``None`` actions, or the rows in ``restart`` (bool ``(B,)``) start over: a zero state
        and a zero action, as after ``reset()``. With :attr:`wants_outputs` the step's reward and feature
        estimates are kept in :attr:`last_output`.
        """
        dynamics = self.model.dynamics
        batch = features.shape[0]
        if state is None:
            state = dynamics.initial_state(batch, self.device)
        if actions is None:
            actions = features.new_zeros(batch, self.model.action_dim)
        if restart is not None and np.any(restart):
            keep = torch.from_numpy(~np.asarray(restart, bool)).to(features)[:, None]
            state, actions = VRNNState(*(t * keep for t in state)), actions * keep
        if self.wants_outputs:
            state, self.last_output = dynamics.observe_step(state, features, actions)
            return state
        return dynamics.update_belief(state, features, actions)

    def observe(self, frame: np.ndarray, space: spaces.Space, action: Any) -> torch.Tensor:
        """One env's uint8 ``(H, W, 3)`` frame -> features ``(1, D)``; updates :attr:`state` when
        :attr:`tracks_belief` with ``action`` of ``space`` that led to it (``None``: an episode's first frame)."""
        features = self.encode(frame[None])
        if self.tracks_belief:
            first = action is None
            self.state = self.advance(None if first else self.state, features,
                                      None if first else self.actions(space, action))
        return features

    def replay(self, images: np.ndarray, actions: np.ndarray, belief: bool) -> tuple[np.ndarray, VRNNState | None]:
        """A recorded episode's observations as the wrappers give them, step by step: uint8 ``images`` (L, H, W, 3)
        and ``actions`` (L, A) (``actions[t]`` led to ``images[t]``; row 0 unused) -> ``(L, D [+ belief_dim])``,
        and the belief after the last step (``None`` without ``belief``). Holds :meth:`running` itself."""
        with self.running():
            features = self.encode(images)
            if not belief:
                return self.output(features, None), None
            actions_t = torch.as_tensor(np.asarray(actions), dtype=torch.float32, device=features.device)
            state, rows = None, []
            for t in range(len(features)):
                state = self.advance(state, features[t:t + 1], actions_t[t:t + 1] if t else None)
                rows.append(self.output(features[t:t + 1], state))
        return np.concatenate(rows), state

    def output(self, features: torch.Tensor, state: VRNNState | None) -> np.ndarray:
        """``(B, D [+ belief_dim])`` float32 numpy within the feature bounds (one device -> host copy): what the
        agents observe: the autoencoder's ``observed`` features (keypoints as ``(mu x, mu y, mu)``)."""
        features = self.model.autoencoder.observed(features)
        if state is not None:
            features = torch.cat([features, self.model.dynamics.belief(state)], dim=-1)
        low, high = self.bounds[state is not None]  # float rounding can leave x = 1 + 1e-7
        return np.clip(features.cpu().numpy(), low, high)

    def observation_space(self, belief: bool) -> spaces.Box:
        return spaces.Box(*self.bounds[belief], dtype=np.float32)

    def __getstate__(self) -> dict[str, Any]:  # a wrapped env crosses process boundaries (SubprocVecEnv, Ray)
        return {**self.__dict__, "state": None, "last_output": None}


class FrameSource:
    """``observation -> frame`` for one env: the observation itself, or ``env.render()`` when ``env`` is given
    (checked at the first frame, when its size is known). Picklable, unlike a closure."""

    def __init__(self, perception: Perception, env: gym.Env | None) -> None:
        self.perception, self.env, self.checked = perception, env, env is None

    def __call__(self, observation: Any) -> np.ndarray:
        if self.env is None:
            return observation
        frame = self.env.render()
        if not self.checked:
            if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8:
                raise ValueError(f"{self.perception.who}: env.render() must return a uint8 (H, W, 3) array, got "
                                 f"{type(frame).__name__} {getattr(frame, 'dtype', '')}")
            self.perception.check_frame_size(frame.shape, "env.render()")
            self.checked = True
        return frame
