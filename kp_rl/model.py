"""The model bundle users load: a frame autoencoder (keypoints or CNN), an optional VRNN, and their config.

One checkpoint file holds everything needed to rebuild and use the model: weights, :class:`Config`,
the representation (``keypoints`` or ``cnn``), the data spec (env id, image size, action dim) and,
for training runs, the optimiser state to resume from. :func:`load` reads it back::

    >>> import tempfile, os
    >>> from kp_rl.config import get_preset
    >>> cfg = get_preset("cpu").replace(keypoints={"image_size": 32, "num_keypoints": 4, "base_filters": 4})
    >>> model = PerceptionModel(cfg, representation="keypoints", action_dim=1)
    >>> path = os.path.join(tempfile.mkdtemp(), "model.pt")
    >>> model.save(path)
    >>> loaded = load(path)
    >>> loaded.feature_dim, loaded.has_dynamics, loaded.image_size
    (12, False, 32)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kp_rl.config import Config
from kp_rl.dynamics import KeypointVRNN
from kp_rl.keypoints import CNNAutoencoder, KeypointAutoencoder

CHECKPOINT_FORMAT = "kp_rl.model"
CHECKPOINT_VERSION = 1
REPRESENTATIONS = ("keypoints", "cnn")


class CheckpointError(ValueError):
    """A checkpoint is missing, not a kp_rl model, of an unsupported version, or of the wrong kind."""


class PerceptionModel(nn.Module):
    """Frame autoencoder (+ optional dynamics) with the config that built it.

    Args:
        config: the full :class:`Config` (sizes of every part).
        representation: ``keypoints`` (the paper's structured model) or ``cnn`` (the unstructured baseline).
        action_dim: action size of the environment (needed by the dynamics model).
        with_dynamics: also build the VRNN over the autoencoder's features.
        data_spec: where the training data came from (``env_id``, ``image_size``, ...), kept for checks.

    Attributes:
        autoencoder: :class:`KeypointAutoencoder` or :class:`CNNAutoencoder`.
        dynamics: :class:`KeypointVRNN` or ``None``.
    """

    def __init__(self, config: Config, representation: str = "keypoints", action_dim: int = 0,
                 with_dynamics: bool = False, data_spec: dict[str, Any] | None = None) -> None:
        super().__init__()
        if representation not in REPRESENTATIONS:
            raise ValueError(f"representation must be one of {REPRESENTATIONS}, got {representation!r}")
        self.config = config.validate()
        self.representation = representation
        self.action_dim = int(action_dim)
        self.data_spec = dict(data_spec or {})
        self.autoencoder: nn.Module = (KeypointAutoencoder(config.keypoints) if representation == "keypoints"
                                       else CNNAutoencoder(config.keypoints, config.cnn))
        self.dynamics: KeypointVRNN | None = None
        if with_dynamics:
            self.add_dynamics()

    def add_dynamics(self) -> KeypointVRNN:
        """Build a fresh VRNN over this model's features (used when dynamics training starts)."""
        self.dynamics = KeypointVRNN(self.config.dynamics, self.feature_dim, self.action_dim)
        return self.dynamics

    @property
    def has_dynamics(self) -> bool:
        return self.dynamics is not None

    @property
    def feature_dim(self) -> int:
        return int(self.autoencoder.feature_dim)

    @property
    def image_size(self) -> int:
        return self.config.keypoints.image_size

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode(self, frames: np.ndarray | Tensor) -> Tensor:
        """Pixels -> flat features.

        Args:
            frames: uint8 ``(..., H, W, 3)`` (numpy or torch) or float ``(..., 3, H, W)`` in [-0.5, 0.5].
        Returns:
            float32 ``(..., feature_dim)`` on the model's device (keypoints: ``K * (x, y, mu)``).
        """
        return self.autoencoder.features(frames)

    def checkpoint(self, train_state: dict[str, Any] | None = None) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "representation": self.representation,
            "action_dim": self.action_dim,
            "has_dynamics": self.has_dynamics,
            "config": self.config.to_dict(),
            "data_spec": self.data_spec,
            "state_dict": self.state_dict(),
            "train_state": train_state,
        }

    def save(self, path: str | Path, train_state: dict[str, Any] | None = None) -> None:
        """Write the checkpoint atomically (temporary file + rename): an interrupted save loses nothing."""
        from kp_rl.files import write_bytes

        write_bytes(path, lambda handle: torch.save(self.checkpoint(train_state), handle))


PRETRAINED = "pretrained:"  # ``pretrained:<task>``: a bundle shipped in kp_rl/pretrained (see its README.md)
PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"


def pretrained_models() -> list[str]:
    """Names of the shipped bundles, e.g. ``['pretrained:cartpole-swingup', ...]``."""
    return sorted(PRETRAINED + p.stem for p in PRETRAINED_DIR.glob("*.pt"))


def checkpoint_file(path: str | Path) -> Path:
    """The checkpoint file a model path names: the file, a run folder's ``model.pt``, or a shipped bundle
    (``pretrained:cartpole-swingup``); an unknown bundle name is a CheckpointError listing the shipped ones."""
    if str(path).startswith(PRETRAINED):
        file = PRETRAINED_DIR / f"{str(path)[len(PRETRAINED):]}.pt"
        if not file.is_file():
            raise CheckpointError(f"no pretrained model {str(path)!r}; shipped: {', '.join(pretrained_models())}")
        return file
    path = Path(path)
    return path / "model.pt" if path.is_dir() else path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and check a checkpoint file; errors name the file and what is wrong with it."""
    path = checkpoint_file(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for a damaged file
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a kp_rl model checkpoint")
    if data.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {data.get('version')} is not supported "
                              f"(this kp_rl reads version {CHECKPOINT_VERSION})")
    return data


def load(path: str | Path, device: str | torch.device = "cpu", representation: str | None = None,
         require_dynamics: bool = False) -> PerceptionModel:
    """Load a model saved by training (``RUN/model.pt`` or the run directory itself), or a shipped
    ``pretrained:<task>`` bundle (:func:`pretrained_models`), in eval mode.

    Args:
        path: checkpoint file, run directory or ``pretrained:<task>``.
        device: where to put it (``cpu``, ``cuda``, ``cuda:1``, ...).
        representation: if given, the representation the caller needs (``keypoints`` or ``cnn``).
        require_dynamics: the caller needs the VRNN (e.g. the world-model wrapper).
    Raises:
        CheckpointError: missing file, foreign file, unsupported version, or the wrong kind of model.
    """
    device = resolve_device(device)
    data = read_checkpoint(path)
    if representation is not None and data["representation"] != representation:
        raise CheckpointError(f"{path} holds a {data['representation']!r} model; a {representation!r} model is needed")
    if require_dynamics and not data["has_dynamics"]:
        raise CheckpointError(f"{path} holds an autoencoder without dynamics; train one with "
                              f"`kp-rl train dynamics --keypoints {path}`")
    model = PerceptionModel(Config.from_dict(data["config"]), data["representation"], data["action_dim"],
                            with_dynamics=data["has_dynamics"], data_spec=data["data_spec"])
    model.load_state_dict(data["state_dict"])
    return model.to(device).eval()


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when present, else CPU; a device that does not exist is a clear error."""
    device = str(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {device!r}: expected auto, cpu, cuda or cuda:N") from exc
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    elif resolved.type != "cpu":
        raise ValueError(f"unsupported device {device!r}: expected auto, cpu, cuda or cuda:N")
    return resolved
