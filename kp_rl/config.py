"""Typed configuration: dataclasses for every model and training knob, with the ``paper``, ``cpu`` and ``tiny`` presets.

The paper's values (Minderer et al. 2019, reference implementation) are written once, in :data:`PRESETS`.
Configs round-trip through plain dicts (checkpoints) and YAML files (experiments)::

    >>> cfg = get_preset("cpu")
    >>> cfg.keypoints.num_keypoints
    16
    >>> Config.from_dict(cfg.to_dict()) == cfg
    True
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from kp_rl.files import read_yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value or file is invalid; the message names the field."""


def _at_least(minimum: float, section: str, config: Any, *names: str) -> None:
    for name in names:
        if getattr(config, name) < minimum:
            raise ConfigError(f"{section}.{name} must be >= {minimum}, got {getattr(config, name)}")


@dataclass(frozen=True)
class KeypointConfig:
    """Sizes and loss weights of the keypoint autoencoder (encoder, Gaussian maps, decoder)."""

    image_size: int = 64
    num_keypoints: int = 64  # K
    base_filters: int = 32  # filters at full resolution; doubled at every down-sampling
    layers_per_scale: int = 2  # extra 3x3 convs per scale
    num_scales: int = 3  # 64 -> 32 -> 16: heatmaps at 1/4 resolution
    keypoint_sigma: float = 1.5  # Gaussian width in heatmap pixels
    heatmap_eps: float = 1e-6  # added per pixel before normalising a heatmap
    sparsity_weight: float = 5.0
    separation_weight: float = 10.0
    separation_sigma: float = 0.1
    leaky_relu_slope: float = 0.2
    # the frame a sequence is reconstructed from: "own" (its first, the paper's) or "other" (another sequence's
    # first), so that what stays still in an episode but differs between episodes (reacher's target) needs a keypoint
    reference: str = "own"

    @property
    def heatmap_width(self) -> int:
        return self.image_size // 2 ** (self.num_scales - 1)

    def validate(self) -> None:
        if self.image_size % 2 ** (self.num_scales - 1):
            raise ConfigError(f"keypoints.image_size={self.image_size} must be divisible by 2**(num_scales-1)="
                              f"{2 ** (self.num_scales - 1)}")
        _at_least(1, "keypoints", self, "num_keypoints", "base_filters", "num_scales", "image_size")
        _at_least(0, "keypoints", self, "layers_per_scale")
        if self.keypoint_sigma <= 0:
            raise ConfigError(f"keypoints.keypoint_sigma must be > 0, got {self.keypoint_sigma}")
        if self.reference not in ("own", "other"):
            raise ConfigError(f"keypoints.reference must be 'own' or 'other', got {self.reference!r}")


@dataclass(frozen=True)
class CNNConfig:
    """The unstructured baseline's CNN autoencoder: same conv trunk, flat latent instead of keypoints."""

    latent_dim: int = 192  # flat code; default K*3 of the paper preset (64*3)
    # channels of the spatial code around the flat latent (the counterpart of the K Gaussian maps); its two
    # Linear layers cost 2 * map_channels * h * w * latent_dim parameters, so small keeps the baseline comparable
    map_channels: int = 4

    def validate(self) -> None:
        _at_least(1, "cnn", self, "latent_dim", "map_channels")


@dataclass(frozen=True)
class DynamicsConfig:
    """VRNN over keypoint (or CNN latent) vectors, with action input and a reward head."""

    rnn_units: int = 512
    latent_dim: int = 16
    prior_hidden: int = 128
    posterior_hidden: int = 128
    decoder_hidden: int = 128
    reward_hidden: int = 128
    observed_steps: int = 8  # N
    predicted_steps: int = 8  # M
    num_samples: int = 10  # S, best-of-many
    best_of_many: bool = True
    stochastic: bool = True  # False: no z at all (deterministic RNN ablation)
    # The reference uses 0.0, which leaves its prior untrained. The coordinate loss is a mean over D features, so a
    # weight w acts like a Gaussian likelihood of variance w*D/2: 1e-3 keeps the posterior informative (README).
    kl_weight: float = 1e-3
    kl_anneal_steps: int = 1000
    reward_weight: float = 1.0
    coord_weight: float = 1.0
    # scheduled sampling: probability of feeding the true keypoints, ramped linearly over ramp_fraction of training
    sampling_observed_end: float = 0.1
    sampling_predicted_end: float = 0.5
    sampling_ramp_fraction: float = 0.8
    sampling_ramp_steps: int = 0  # > 0: ramp over this many steps instead (a budget that early stopping may cut)
    # the reference stops the gradient into the prior's mean and std at predicted steps (sampled there, and
    # best-of-many picks among the samples); False lets it flow through the chosen sample
    stop_prior_gradient: bool = False
    min_std: float = 1e-4

    @property
    def sequence_length(self) -> int:
        return self.observed_steps + self.predicted_steps

    def validate(self) -> None:
        _at_least(1, "dynamics", self, "rnn_units", "latent_dim", "observed_steps", "num_samples")
        _at_least(0, "dynamics", self, "predicted_steps", "kl_weight")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, logging and checkpointing (shared by every training loop)."""

    batch_size: int = 32
    sequence_length: int = 16  # frames per training window (keypoint model: observed steps are what it sees)
    steps: int = 10_000  # autoencoder (keypoint or CNN) training steps
    dynamics_steps: int = 10_000  # VRNN training steps (stage 2: autoencoder frozen)
    dynamics_batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4  # L2 on conv kernels
    clip_grad_norm: float = 10.0  # global norm (torch.nn.utils.clip_grad_norm_), not Keras' per-tensor clipnorm
    log_every: int = 50
    image_every: int = 500
    eval_every: int = 500
    checkpoint_every: int = 500
    eval_batches: int = 4
    num_workers: int = 0
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU (and by the VRNN stage's CUDA graph, fp32)
    # bf16 autocast on the CPU; None: in the autoencoder stage where the CPU computes bf16 natively (AVX512-BF16
    # or AMX, about 2x faster steps there; kp_rl.train.cpu_has_native_bf16)
    cpu_amp: bool | None = None
    cuda_graphs: bool = True  # VRNN stage on one GPU: each step replayed from a CUDA graph (launch-bound otherwise)
    # early stopping: a plateau is `patience` evaluations in a row without the validation loss (at the end-of-training
    # schedules) improving on its best by min_improvement (relative); 0: train the whole budget. The first
    # `lr_reductions` plateaus multiply the learning rate by lr_factor (as torch's ReduceLROnPlateau: at a constant
    # lr the weights, and so the loss, oscillate by more than min_improvement), the next one ends training
    patience: int = 0
    min_improvement: float = 0.01
    lr_reductions: int = 0
    lr_factor: float = 0.3

    def validate(self) -> None:
        _at_least(1, "train", self, "batch_size", "sequence_length", "steps", "dynamics_steps", "dynamics_batch_size",
                  "log_every", "checkpoint_every", "eval_every")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        _at_least(0, "train", self, "patience", "lr_reductions")
        if not 0 < self.lr_factor < 1:
            raise ConfigError(f"train.lr_factor must be in (0, 1), got {self.lr_factor}")


@dataclass(frozen=True)
class Config:
    """Everything a model needs to be rebuilt: stored inside every checkpoint."""

    preset: str = "paper"
    keypoints: KeypointConfig = field(default_factory=KeypointConfig)
    cnn: CNNConfig = field(default_factory=CNNConfig)
    dynamics: DynamicsConfig = field(default_factory=DynamicsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "Config":
        for section in (self.keypoints, self.cnn, self.dynamics, self.train):
            section.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        return _build(cls, data, "config").validate()

    def replace(self, **sections: dict[str, Any]) -> "Config":
        """Return a copy with some fields of some sections changed, e.g. ``replace(train={"steps": 10})``."""
        merged = self.to_dict()
        for section, values in sections.items():
            if not isinstance(merged.get(section), dict):
                expected = [name for name, value in merged.items() if isinstance(value, dict)]
                raise ConfigError(f"unknown config section {section!r}; expected one of {expected}")
            merged[section] = {**merged[section], **values}
        return Config.from_dict(merged)


def _build(cls: type[T], data: Any, where: str) -> T:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; expected some of {sorted(fields)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value, f"{where}.{name}")
        elif isinstance(default, bool) or default is None:  # None: a bool whose default is decided at run time
            if not isinstance(value, bool) and not (default is None and value is None):
                raise ConfigError(f"{where}.{name}: expected true/false, got {value!r}")
            kwargs[name] = value
        elif isinstance(default, (int, float)):  # (bools were handled above)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{where}.{name}: expected a number, got {value!r}")
            if isinstance(default, int) and not float(value).is_integer():
                raise ConfigError(f"{where}.{name}: expected an integer, got {value!r}")
            kwargs[name] = type(default)(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


PRESETS: dict[str, Config] = {
    # The reference implementation's sizes and optimisation (64x64, K=64, 32 filters, 2 layers per scale).
    "paper": Config(preset="paper"),
    # Small enough to train a useful model on 2 CPU cores in minutes.
    "cpu": Config(
        preset="cpu",
        keypoints=KeypointConfig(num_keypoints=16, base_filters=8, layers_per_scale=1),
        cnn=CNNConfig(latent_dim=48, map_channels=1),
        dynamics=DynamicsConfig(rnn_units=128, latent_dim=8, prior_hidden=64, posterior_hidden=64,
                                decoder_hidden=64, reward_hidden=64, num_samples=5, kl_anneal_steps=500),
        train=TrainConfig(batch_size=16, sequence_length=8, steps=2000, dynamics_steps=3000, image_every=250,
                          eval_every=250, checkpoint_every=250),
    ),
    # A smoke test of the whole pipeline in seconds (the test suite's and the quick demo's sizes): 32x32
    # frames, 4 keypoints, a 16-unit VRNN, a few dozen steps with logs, evaluations and checkpoints along the way.
    "tiny": Config(
        preset="tiny",
        keypoints=KeypointConfig(image_size=32, num_keypoints=4, base_filters=4, layers_per_scale=0),
        cnn=CNNConfig(latent_dim=12, map_channels=1),
        dynamics=DynamicsConfig(rnn_units=16, latent_dim=4, prior_hidden=16, posterior_hidden=16, decoder_hidden=16,
                                reward_hidden=16, observed_steps=4, predicted_steps=4, num_samples=3,
                                kl_anneal_steps=500),
        train=TrainConfig(batch_size=4, sequence_length=4, steps=30, dynamics_steps=30, dynamics_batch_size=8,
                          lr=3e-3, log_every=5, eval_every=10, checkpoint_every=10, image_every=15),
    ),
}


def get_preset(name: str) -> Config:
    """Return a preset by name: ``paper``, ``cpu`` or ``tiny`` (a smoke test)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML config file holds (``preset`` and section overrides), unvalidated beyond its shape."""
    path = Path(path)
    try:
        data = read_yaml(path, "config file") or {}
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(str(exc)) from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def load_config(path: str | Path, base: str | None = None) -> Config:
    """Load a YAML config: ``preset: cpu`` plus section overrides (``train: {steps: 100}``).

    ``base`` is the preset when the file names none; a file that names another one is an error.
    """
    data = read_config_file(path)
    if base is not None and data.get("preset", base) != base:
        raise ConfigError(f"{path} sets preset {data['preset']!r}, but preset {base!r} was asked for")
    preset = get_preset(data.pop("preset", base or "cpu"))
    try:
        return preset.replace(**data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
