"""Stable-Baselines3 pieces: features extractors over a trained perception model, DrQ's random shifts of
replay-buffer samples and its one-encoder SAC policy, and a TensorBoard callback.

A frozen encoder is cheaper as a wrapper (:class:`kp_rl.wrappers.KeypointObservation`: encoded once per env
step, not again for every replay-buffer sample); the extractor is the way to train it with the agent.

Example:
    >>> import gymnasium as gym, kp_rl, tempfile, os, torch
    >>> from gymnasium import spaces
    >>> from stable_baselines3 import PPO
    >>> from kp_rl.sb3 import CNNExtractor, KeypointExtractor
    >>> cfg = kp_rl.get_preset("cpu").replace(keypoints={"image_size": 32, "num_keypoints": 4, "base_filters": 4},
    ...                                       cnn={"latent_dim": 8})
    >>> path, cnn_path = (os.path.join(tempfile.mkdtemp(), name) for name in ("model.pt", "cnn.pt"))
    >>> kp_rl.PerceptionModel(cfg, action_dim=1).save(path)
    >>> kp_rl.PerceptionModel(cfg, representation="cnn").save(cnn_path)
    >>> agent = PPO("CnnPolicy", gym.make("kp_rl/cartpole-swingup-v0", image_size=32), n_steps=16, batch_size=16,
    ...             policy_kwargs=dict(features_extractor_class=KeypointExtractor,
    ...                                features_extractor_kwargs=dict(model_path=path)))
    >>> agent.policy.features_extractor.features_dim
    12
    >>> extractor = KeypointExtractor(spaces.Box(0, 255, (6, 32, 32), "uint8"), path)   # 2 stacked frames
    >>> extractor.features_dim, extractor(torch.rand(5, 6, 32, 32)).shape
    (24, torch.Size([5, 24]))
    >>> CNNExtractor(spaces.Box(0, 255, (3, 32, 32), "uint8"), cnn_path, fine_tune=True).features_dim
    8
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import Image
from stable_baselines3.common.preprocessing import is_image_space_channels_first, preprocess_obs
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.policies import BaseModel, ContinuousCritic
from stable_baselines3.common.type_aliases import ReplayBufferSamples, Schedule
from stable_baselines3.sac.policies import Actor, CnnPolicy
from torch import Tensor, nn

from kp_rl.perception import ModelLike, Perception
from kp_rl.report import draw_keypoints

__all__ = ["CNNExtractor", "DrQCnnPolicy", "KeypointExtractor", "KeypointOverlayCallback", "RandomShiftReplayBuffer",
           "random_shift"]


# ------------------------------------------------------------------------------------- features extractors


class _PerceptionExtractor(BaseFeaturesExtractor):
    """Shared by :class:`KeypointExtractor` and :class:`CNNExtractor` (they differ only in ``representation``).

    SB3 hands image observations channels-first and, with the policy's ``normalize_images=True``, divided by 255:
    ``forward`` maps them to the model's [-0.5, 0.5]. Frame-stacked observations are encoded frame by frame.
    """

    representation: str = ""

    def __init__(self, observation_space: spaces.Space, model_path: str | Path, fine_tune: bool = False,
                 images_normalized: bool = True) -> None:
        name = type(self).__name__
        shape = getattr(observation_space, "shape", None)
        if not isinstance(observation_space, spaces.Box) or len(shape) != 3:
            raise ValueError(f"{name} expects image observations (C, H, W) or (H, W, C), got {observation_space}")
        channels_first = is_image_space_channels_first(observation_space)
        channels, size = (shape[0], shape[1:]) if channels_first else (shape[-1], shape[:2])
        if channels % 3:
            raise ValueError(f"{name} expects RGB frames (3 channels, or 3 * n_stack when frame-stacked), got "
                             f"{channels} channels in observation space of shape {shape}")
        # loaded on the CPU (SB3 moves the policy later), in the default memory format (SB3 initialises it)
        perception = Perception(model_path, "cpu", representation=self.representation, who=name, channels_last=False)
        perception.check_frame_size((*size, 3), "the observation space")
        model = perception.model
        self.n_stack = channels // 3
        super().__init__(observation_space, features_dim=self.n_stack * model.feature_dim)
        self.autoencoder: nn.Module = model.autoencoder
        self.channels_first = channels_first
        self.fine_tune = bool(fine_tune)
        self.scale = 1.0 if images_normalized else 1.0 / 255.0
        if not self.fine_tune:
            self.autoencoder.requires_grad_(False)
            self.autoencoder.eval()

    def train(self, mode: bool = True) -> "_PerceptionExtractor":
        """A frozen encoder stays in eval mode whatever the policy's mode."""
        super().train(mode)
        if not self.fine_tune:
            self.autoencoder.eval()
        return self

    def forward(self, observations: Tensor) -> Tensor:
        """Float ``(B, 3 * n_stack, H, W)`` (or channels-last) images -> ``(B, n_stack * feature_dim)``."""
        frames = observations.float()
        if not self.channels_first:
            frames = frames.movedim(-1, 1)
        frames = frames.unflatten(1, (self.n_stack, 3)) * self.scale - 0.5  # (B, n_stack, 3, H, W) in [-0.5, 0.5]
        with torch.set_grad_enabled(self.fine_tune and torch.is_grad_enabled()):
            return self.autoencoder.observed(self.autoencoder.features(frames)).flatten(1)


class KeypointExtractor(_PerceptionExtractor):
    """Pixels -> keypoints ``(mu x, mu y, mu) * K`` per frame, as the wrappers give them, as the policy's features
    (``features_dim = n_stack * K * 3``).

    Args:
        observation_space: uint8 image space, ``(3 * n_stack, H, W)`` as SB3 hands it (or channels-last).
        model_path: checkpoint of a ``keypoints`` model (:func:`kp_rl.load`); it must still exist when the agent
            is loaded again (``SAC.load``), which rebuilds the extractor and then restores the saved weights.
        fine_tune: train the encoder with the agent's loss (default: frozen, eval mode, no gradients).
        images_normalized: observations arrive divided by 255 (SB3's ``normalize_images=True``).

    Raises:
        ValueError: not an image space, channels not a multiple of 3, or a frame size the model does not take.
        kp_rl.model.CheckpointError: missing or foreign checkpoint, or a ``cnn`` model.
    """

    representation = "keypoints"


class CNNExtractor(_PerceptionExtractor):
    """Pixels -> the CNN baseline's flat latent per frame (``features_dim = n_stack * latent_dim``), for a ``cnn``
    checkpoint; the arguments of :class:`KeypointExtractor`."""

    representation = "cnn"


# ---------------------------------------------------------------------------------------------- callback


class KeypointOverlayCallback(BaseCallback):
    """Log keypoints drawn on frames (``kp/overlay``) and the reward-prediction error to TensorBoard.

    Every ``log_every`` calls it draws the keypoints on ``num_frames`` frames (a fixed array, or a random-action
    clip from ``source``: use an env other than the training one). The mean ``|info["predicted_reward"] - r|``
    of the training envs (:class:`kp_rl.wrappers.WorldModel`; ``r`` is ``info["true_reward"]`` when the reward
    was replaced) since the last log is recorded as ``kp/reward_abs_error``.

    Args:
        source: an env with uint8 image observations or ``rgb_array`` rendering, or uint8 frames ``(N, H, W, 3)``.
        model: a ``keypoints`` :class:`~kp_rl.model.PerceptionModel` or its checkpoint path.
        log_every: log every this many calls (env steps of the vectorised env).
        num_frames: frames per image when ``source`` is an env.
        scale: nearest-neighbour upscaling of the frames before drawing.
        seed: reset seed of ``source``.
        verbose: SB3 verbosity.

    Example:
        >>> import kp_rl, numpy as np
        >>> cfg = kp_rl.get_preset("cpu").replace(keypoints={"image_size": 32, "num_keypoints": 4,
        ...                                                  "base_filters": 4})
        >>> callback = KeypointOverlayCallback(np.zeros((2, 32, 32, 3), np.uint8), kp_rl.PerceptionModel(cfg))
        >>> callback.overlay().shape                   # 2 frames of 32x32, upscaled 4x, side by side
        (128, 256, 3)
    """

    def __init__(self, source: gym.Env | np.ndarray, model: ModelLike, log_every: int = 1000,
                 num_frames: int = 4, scale: int = 4, seed: int = 0, verbose: int = 0) -> None:
        super().__init__(verbose)
        self.perception = Perception(model, representation="keypoints", who="KeypointOverlayCallback",
                                     num_threads=None)
        if log_every < 1 or num_frames < 1 or scale < 1:
            raise ValueError(f"log_every, num_frames and scale must be >= 1, got {log_every}, {num_frames}, {scale}")
        if isinstance(source, gym.Env):
            self._frame, self._frames = self.perception.frame_source(source), None
        else:
            frames = np.asarray(source)
            size = self.perception.model.image_size
            if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (size, size, 3):
                raise ValueError(f"KeypointOverlayCallback: expected uint8 frames (N, {size}, {size}, 3), got "
                                 f"{frames.dtype} of shape {frames.shape}")
            self._frames = frames
        self.source = source
        self.log_every, self.num_frames, self.scale, self.seed = log_every, num_frames, scale, seed
        self._error_sum, self._error_count = 0.0, 0

    def _clip(self) -> np.ndarray:
        if self._frames is not None:
            return self._frames
        env = self.source
        env.action_space.seed(self.seed)
        observation, _ = env.reset(seed=self.seed)
        frames = [self._frame(observation)]
        for _ in range(self.num_frames - 1):
            observation, _, terminated, truncated, _ = env.step(env.action_space.sample())
            frames.append(self._frame(observation))
            if terminated or truncated:
                break
        return np.stack(frames)

    def overlay(self) -> np.ndarray:
        """The logged picture: uint8 ``(H * scale, N * W * scale, 3)``, frames with their keypoints, left to right."""
        frames = self._clip()
        with self.perception.running():
            keypoints = self.perception.encode(frames).unflatten(-1, (-1, 3)).cpu().numpy()
        big = frames.repeat(self.scale, axis=1).repeat(self.scale, axis=2)
        return np.concatenate([draw_keypoints(f, k) for f, k in zip(big, keypoints)], axis=1)

    def _on_step(self) -> bool:
        rewards = self.locals.get("rewards")
        for i, info in enumerate(self.locals.get("infos") or ()):
            true = info.get("true_reward", rewards[i] if rewards is not None else None)
            if "predicted_reward" in info and true is not None:
                self._error_sum += abs(float(info["predicted_reward"]) - float(true))
                self._error_count += 1
        if self.n_calls % self.log_every == 0:
            self.logger.record("kp/overlay", Image(self.overlay(), "HWC"), exclude=("stdout", "log", "json", "csv"))
            if self._error_count:
                self.logger.record("kp/reward_abs_error", self._error_sum / self._error_count)
                self._error_sum, self._error_count = 0.0, 0
        return True


# ------------------------------------------------------------------------------------------ augmentation


def random_shift(images: Tensor, pad: int = 4, generator: torch.Generator | None = None) -> Tensor:
    """Shift each image of a batch by a random whole number of pixels in ``[-pad, pad]`` on both axes.

    The image is padded by repeating its border pixels and cropped back to its size at a random offset (the
    augmentation of DrQ, Kostrikov et al. 2021). Channels, dtype and device are kept.

    Args:
        images: ``(B, C, H, W)``, any dtype (uint8 frames as SB3 stores them, or floats).
        pad: the largest shift, in pixels.
        generator: random source (default: torch's global one).

    Example:
        >>> frames = torch.arange(16, dtype=torch.uint8).reshape(1, 1, 4, 4)
        >>> random_shift(frames, pad=0).equal(frames)
        True
        >>> random_shift(frames, pad=1).shape
        torch.Size([1, 1, 4, 4])
    """
    if images.dim() != 4:
        raise ValueError(f"random_shift expects images (B, C, H, W), got shape {tuple(images.shape)}")
    if pad == 0:
        return images
    batch, _, height, width = images.shape
    # replicate padding by concatenating border rows and columns (F.pad takes floats only), one slice per image
    rows = torch.cat([images[:, :, :1].expand(-1, -1, pad, -1), images,
                      images[:, :, -1:].expand(-1, -1, pad, -1)], dim=2)
    padded = torch.cat([rows[:, :, :, :1].expand(-1, -1, -1, pad), rows,
                        rows[:, :, :, -1:].expand(-1, -1, -1, pad)], dim=3)
    offsets = torch.randint(0, 2 * pad + 1, (batch, 2), generator=generator).tolist()
    return torch.stack([image[:, top:top + height, left:left + width]
                        for image, (top, left) in zip(padded, offsets)])


class RandomShiftReplayBuffer(ReplayBuffer):
    """SB3's replay buffer whose sampled ``observations`` and ``next_observations`` (images ``(C, H, W)``) each get
    their own random shift per transition (DrQ): ``SAC("CnnPolicy", env, replay_buffer_class=RandomShiftReplayBuffer)``.

    Args:
        pad: the largest shift in pixels (default 4, DrQ's for 84x84 and 64x64 frames).
        normalize_images: hand the shifted images over as float32 divided by 255, for :class:`DrQCnnPolicy` only
            (SB3's policies would divide them again): once per sample, not once per network that reads it.
        other arguments: :class:`~stable_baselines3.common.buffers.ReplayBuffer`'s.
    """

    normalize_images = False  # (the class default: replay buffers pickled before the option existed)

    def __init__(self, *args: Any, pad: int = 4, normalize_images: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if len(self.obs_shape) != 3:
            raise ValueError(f"RandomShiftReplayBuffer needs image observations (C, H, W), got {self.obs_shape}")
        self.pad, self.normalize_images = pad, bool(normalize_images)

    def _get_samples(self, batch_inds: np.ndarray, env: Any = None) -> ReplayBufferSamples:
        samples = super()._get_samples(batch_inds, env)
        shifted = [random_shift(images, self.pad) for images in (samples.observations, samples.next_observations)]
        if self.normalize_images:  # SB3's preprocess_obs, in place, in the layout DrQCnnPolicy's convolutions read
            shifted = [images.to(torch.float32, memory_format=torch.channels_last).div_(255.0) for images in shifted]
        return samples._replace(observations=shifted[0], next_observations=shifted[1])


# ------------------------------------------------------------------------------------------ DrQ's encoder


def _image_features(model: BaseModel, obs: Tensor, features_extractor: BaseFeaturesExtractor) -> Tensor:
    """SB3's feature extraction for uint8 images (the env's); float ones come normalised from the replay buffer
    (:class:`RandomShiftReplayBuffer` with ``normalize_images=True``). Channels-last, as the encoder's weights."""
    if obs.dtype == torch.uint8:
        obs = preprocess_obs(obs, model.observation_space, normalize_images=model.normalize_images)
    return features_extractor(obs.contiguous(memory_format=torch.channels_last))


class _EncoderTrainedByCritic(ContinuousCritic):
    """SAC's critic whose image encoder learns from the TD loss only: where the actions carry the actor's gradient
    (the actor's loss), the features are computed without one."""

    def forward(self, obs: Tensor, actions: Tensor) -> tuple[Tensor, ...]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not actions.requires_grad):
            features = _image_features(self, obs, self.features_extractor)
        return tuple(q_net(torch.cat([features, actions], dim=1)) for q_net in self.q_networks)


class _ActorOnDetachedFeatures(Actor):
    """SAC's actor reading the critic's encoder without training it."""

    def extract_features(self, obs: Tensor, features_extractor: BaseFeaturesExtractor) -> Tensor:
        with torch.no_grad():
            return _image_features(self, obs, features_extractor)


class DrQCnnPolicy(CnnPolicy):
    """SAC's ``CnnPolicy`` with one image encoder, as DrQ has it (Kostrikov et al. 2021, after SAC-AE): the critic's
    loss trains it, the actor reads its features detached, the target critic keeps its own slowly updated copy
    (SB3's default trains an encoder each for actor and critic: three encoder backward passes per update, not one).
    ``SAC(DrQCnnPolicy, env, replay_buffer_class=RandomShiftReplayBuffer, replay_buffer_kwargs={"normalize_images":
    True})``; the keyword arguments are ``CnnPolicy``'s. It reads uint8 images (divided by 255 here) and float ones
    (taken as divided already). Its convolutions run channels-last: the same numbers up to float rounding, and a
    pixel agent step (env + update, batch 256) 2.2x faster on 2 AVX2 cores (1.27 -> 2.83 steps/s on cartpole).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "share_features_extractor": True})

    def make_actor(self, features_extractor: BaseFeaturesExtractor | None = None) -> Actor:
        kwargs = self._update_features_extractor(self.actor_kwargs, features_extractor)
        return _ActorOnDetachedFeatures(**kwargs).to(self.device)

    def make_critic(self, features_extractor: BaseFeaturesExtractor | None = None) -> ContinuousCritic:
        kwargs = self._update_features_extractor(self.critic_kwargs, features_extractor)
        return _EncoderTrainedByCritic(**kwargs).to(self.device)

    def _build(self, lr_schedule: Schedule) -> None:
        super()._build(lr_schedule)  # SB3's sharing: the actor's optimizer would train the encoder, the critic's not
        self.to(memory_format=torch.channels_last)  # 4-d weights only (the convolutions'); parameters stay the same
        encoder = {id(p) for p in self.actor.features_extractor.parameters()}
        self.actor.optimizer = self.optimizer_class([p for p in self.actor.parameters() if id(p) not in encoder],
                                                    lr=lr_schedule(1), **self.optimizer_kwargs)
        self.critic.optimizer = self.optimizer_class(self.critic.parameters(), lr=lr_schedule(1),
                                                     **self.optimizer_kwargs)
