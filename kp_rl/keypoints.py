"""Keypoints from pixels and back: heatmaps -> (x, y, mu) keypoints, Gaussian maps, encoders and decoders.

Conventions (those of the reference implementation): frames are float ``(..., 3, H, W)`` in [-0.5, 0.5];
image coordinates run x: -1 (left) .. +1 (right) and y: +1 (top) .. -1 (bottom); a keypoint is
``(x, y, mu)`` with ``mu`` in [0, 1] its intensity. Heatmaps and Gaussian maps are ``(..., K, h, w)`` at
``1 / 2**(num_scales - 1)`` of the image resolution.

Two autoencoders share one public interface (``feature_dim``, ``encode``, ``features``, ``decode_features``,
``forward``, ``loss``, ``l2_parameters``) so the dynamics model and the RL wrappers can swap them:
:class:`KeypointAutoencoder` (the paper's model) and :class:`CNNAutoencoder` (the unstructured baseline).

    >>> import torch
    >>> from kp_rl.config import KeypointConfig
    >>> _ = torch.manual_seed(0)
    >>> cfg = KeypointConfig(image_size=32, num_keypoints=4, base_filters=8, layers_per_scale=0)
    >>> model = KeypointAutoencoder(cfg)
    >>> frames = preprocess_frames(torch.zeros(2, 5, 32, 32, 3, dtype=torch.uint8))  # (B, T, H, W, 3) pixels
    >>> frames.shape
    torch.Size([2, 5, 3, 32, 32])
    >>> model.features(frames).shape                                                # (B, T, K * 3)
    torch.Size([2, 5, 12])
    >>> reconstruction, out = model(frames)
    >>> reconstruction.shape, out.heatmaps.shape
    (torch.Size([2, 5, 3, 32, 32]), torch.Size([2, 5, 4, 8, 8]))
    >>> hot = torch.zeros(1, 33, 33); hot[0, 0, 0] = 1.0                            # top-left pixel
    >>> [round(v, 2) for v in heatmaps_to_keypoints(hot)[0].tolist()]
    [-1.0, 1.0, 1.0]
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kp_rl.config import CNNConfig, KeypointConfig
from kp_rl.losses import reconstruction_loss, separation_loss, sparsity_loss


def preprocess_frames(frames: np.ndarray | Tensor, device: torch.device | str | None = None) -> Tensor:
    """Turn pixels into network input.

    Args:
        frames: uint8 ``(..., H, W, 3)`` (numpy or torch), or a float tensor already channels-first
            ``(..., 3, H, W)`` in [-0.5, 0.5] (returned as float32, unchanged otherwise).
        device: where the result goes (default: where the input is; CPU for numpy).
    Returns:
        float32 ``(..., 3, H, W)`` in [-0.5, 0.5]; ValueError (naming shape and dtype) on anything else.
    """
    if isinstance(frames, np.ndarray):
        frames = np.ascontiguousarray(frames)  # dm_control / Shimmy frames can have negative strides
    frames = torch.as_tensor(frames, device=device)
    shape, dtype = tuple(frames.shape), frames.dtype
    if dtype == torch.uint8:
        if frames.dim() < 3 or shape[-1] != 3:
            raise ValueError(f"expected uint8 frames of shape (..., H, W, 3), got shape {shape}")
        return frames.movedim(-1, -3).float().div_(255.0).sub_(0.5)
    if dtype.is_floating_point:
        if frames.dim() < 3 or shape[-3] != 3:
            raise ValueError(f"expected float frames channels-first (..., 3, H, W) in [-0.5, 0.5], got shape {shape} "
                             "(pass channels-last pixels as uint8)")
        return frames.float()
    raise ValueError(f"expected uint8 (..., H, W, 3) or float (..., 3, H, W) frames, got {dtype} of shape {shape}")


def _grid(size: int, start: float, end: float, like: Tensor) -> Tensor:
    return torch.linspace(start, end, size, device=like.device, dtype=like.dtype)


def add_coord_channels(x: Tensor) -> Tensor:
    """Append two coordinate channels (CoordConv): x from -1 (left) to +1 (right), y from +1 (top) to -1 (bottom).

    Args:
        x: ``(..., C, H, W)``.
    Returns:
        ``(..., C + 2, H, W)``.
    """
    *lead, _, height, width = x.shape
    gx = _grid(width, -1.0, 1.0, x).expand(*lead, 1, height, width)
    gy = _grid(height, 1.0, -1.0, x)[:, None].expand(*lead, 1, height, width)
    return torch.cat([x, gx, gy], dim=-3)


class KeypointOutput(NamedTuple):
    """What the keypoint encoder detects in a sequence."""

    keypoints: Tensor  # (B, T, K, 3): (x, y, mu)
    heatmaps: Tensor  # (B, T, K, h, w): raw softplus heatmaps


def heatmaps_to_keypoints(heatmaps: Tensor, eps: float = 1e-6) -> Tensor:
    """Reduce each heatmap to its centre of mass and intensity.

    Args:
        heatmaps: nonnegative ``(..., K, H, W)``.
        eps: added per pixel before normalising (so an empty map has its centre at (0, 0)), and to the
            denominator of ``mu``.
    Returns:
        ``(..., K, 3)``: x = expectation of the column marginal over linspace(-1, 1, W); y = expectation of
        the row marginal over linspace(1, -1, H); mu = the map's spatial mean divided by (eps + the largest
        spatial mean over the K maps), in [0, 1]. An all-zero map gives (0, 0, 0).
    """
    if heatmaps.dim() < 3:
        raise ValueError(f"expected heatmaps (..., K, H, W), got shape {tuple(heatmaps.shape)}")
    if heatmaps.dtype in (torch.float16, torch.bfloat16):
        heatmaps = heatmaps.float()
    height, width = heatmaps.shape[-2:]
    shifted = heatmaps + eps
    columns = shifted.sum(dim=-2)  # (..., K, W)
    rows = shifted.sum(dim=-1)  # (..., K, H)
    x = (columns * _grid(width, -1.0, 1.0, heatmaps)).sum(-1) / columns.sum(-1)
    y = (rows * _grid(height, 1.0, -1.0, heatmaps)).sum(-1) / rows.sum(-1)
    scale = heatmaps.mean(dim=(-2, -1))  # (..., K)
    mu = scale / (eps + scale.amax(dim=-1, keepdim=True))
    return torch.stack([x, y, mu], dim=-1)


def gate_by_intensity(flat: Tensor) -> Tensor:
    """Flat keypoints ``(..., K * 3)`` ``(x, y, mu)`` -> ``(mu x, mu y, mu)``: what the agents observe.

    The position of a keypoint that is off (``mu`` near 0) is meaningless and jumps from frame to frame, which a
    policy takes for signal; weighting the coordinates by the intensity hides it.
    """
    triples = flat.unflatten(-1, (-1, 3))
    return torch.cat([triples[..., :2] * triples[..., 2:], triples[..., 2:]], dim=-1).flatten(-2)


def keypoints_to_maps(keypoints: Tensor, height: int, width: int | None = None, sigma: float = 1.5) -> Tensor:
    """Render each keypoint as an isotropic Gaussian blob of peak value ``mu`` (no normalisation).

    ``mu * exp(-(gx - x)^2 / w) * exp(-(gy - y)^2 / w)`` with ``w = 2 (sigma / width)^2`` on the grids
    gx = linspace(-1, 1, width), gy = linspace(1, -1, height), as in the reference. (On a [-1, 1] grid one
    pixel is ~2 / width units, so the blob's standard deviation is about ``sigma / 2`` pixels.)

    Args:
        keypoints: ``(..., K, 3)`` with (x, y, mu).
        height: map height (the heatmap resolution).
        width: map width (default: ``height``).
        sigma: blob width, in map pixels (the reference's ``keypoint_width``).
    Returns:
        ``(..., K, height, width)``.
    """
    if keypoints.dim() < 2 or keypoints.shape[-1] != 3:
        raise ValueError(f"expected keypoints (..., K, 3), got shape {tuple(keypoints.shape)}")
    width = height if width is None else width
    x, y, mu = (keypoints[..., i, None, None] for i in range(3))  # (..., K, 1, 1) each
    spread = 2.0 * (sigma / width) ** 2
    x_vec = torch.exp(-(_grid(width, -1.0, 1.0, keypoints) - x).pow(2) / spread)  # (..., K, 1, W)
    y_vec = torch.exp(-(_grid(height, 1.0, -1.0, keypoints)[:, None] - y).pow(2) / spread)  # (..., K, H, 1)
    return mu * x_vec * y_vec


def _conv(cfg: KeypointConfig, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1) -> nn.Conv2d:
    """Conv with 'same' padding, He-uniform kernel for the leaky ReLU that follows, zero bias (as in Keras)."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2)
    nn.init.kaiming_uniform_(conv.weight, a=cfg.leaky_relu_slope, nonlinearity="leaky_relu")
    nn.init.zeros_(conv.bias)
    return conv


def _conv_act(cfg: KeypointConfig, *conv_args: int, **conv_kwargs: int) -> list[nn.Module]:
    """:func:`_conv` followed by a leaky ReLU."""
    return [_conv(cfg, *conv_args, **conv_kwargs), nn.LeakyReLU(cfg.leaky_relu_slope)]


def trunk_channels(cfg: KeypointConfig) -> int:
    """Channels of the encoder trunk's output: ``base_filters * 2**(num_scales - 1)`` (128 in the paper)."""
    return cfg.base_filters * 2 ** (cfg.num_scales - 1)


def build_encoder_trunk(cfg: KeypointConfig, in_channels: int) -> nn.Sequential:
    """Image -> feature maps, shared by the keypoint, appearance and CNN-baseline encoders.

    A 3x3 conv to ``base_filters`` plus ``layers_per_scale`` more at full resolution; then per further
    scale a stride-2 3x3 conv doubling the filters plus ``layers_per_scale`` more (paper: 32 -> 64 -> 128
    filters at 64 -> 32 -> 16 px). Leaky ReLU after every conv.

    Args:
        cfg: sizes.
        in_channels: input channels (3 for RGB, 5 with coordinate channels).
    Returns:
        A module mapping ``(N, in_channels, H, W)`` to ``(N, trunk_channels(cfg), h, w)``.
    """
    filters = cfg.base_filters
    layers = _conv_act(cfg, in_channels, filters)
    for scale in range(cfg.num_scales):
        if scale > 0:
            layers += _conv_act(cfg, filters, filters * 2, stride=2)
            filters *= 2
        for _ in range(cfg.layers_per_scale):
            layers += _conv_act(cfg, filters, filters)
    return nn.Sequential(*layers)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


class ImageDecoder(nn.Module):
    """Feature maps at heatmap resolution -> image (the change from the reference frame).

    1x1 conv to ``trunk_channels(cfg)``, then per up-scale a bilinear x2 upsample (align_corners, as the
    reference) and ``max(1, layers_per_scale)`` 3x3 convs with half the filters, then a 1x1 conv to RGB
    with no activation (``self.output``).
    """

    def __init__(self, cfg: KeypointConfig, in_channels: int) -> None:
        super().__init__()
        filters = trunk_channels(cfg)
        layers = _conv_act(cfg, in_channels, filters, kernel_size=1)
        for _ in range(cfg.num_scales - 1):
            layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True))
            for i in range(max(1, cfg.layers_per_scale)):
                layers += _conv_act(cfg, filters if i == 0 else filters // 2, filters // 2)
            filters //= 2
        self.body = nn.Sequential(*layers)
        self.output = _conv(cfg, filters, 3, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        """Args: x ``(N, in_channels, h, w)``. Returns: ``(N, 3, H, W)``."""
        return self.output(self.body(x))


class KeypointEncoder(nn.Module):
    """Frames -> K heatmaps: coordinate channels, encoder trunk, 1x1 conv, softplus."""

    def __init__(self, cfg: KeypointConfig) -> None:
        super().__init__()
        self.trunk = build_encoder_trunk(cfg, in_channels=3 + 2)
        self.heatmaps = _conv(cfg, trunk_channels(cfg), cfg.num_keypoints, kernel_size=1)

    def forward(self, frames: Tensor) -> Tensor:
        """Args: frames ``(N, 3, H, W)``. Returns: nonnegative heatmaps ``(N, K, h, w)``."""
        return F.softplus(self.heatmaps(self.trunk(add_coord_channels(frames))))


class _FrameAutoencoder(nn.Module):
    """What both autoencoders share: input checks, appearance encoder, decoder, rendering, loss, L2 kernels.

    A subclass encodes frames to a code (:meth:`encode`), flattens it to per-frame feature vectors (``_flat``)
    and turns feature vectors back into ``map_channels`` maps at heatmap resolution (``_feature_maps``).
    Rendering frame t decodes concat(maps of t, appearance features of the reference frame, maps of the
    reference frame) plus coordinate channels, and adds the reference frame.
    """

    def __init__(self, cfg: KeypointConfig, map_channels: int) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.appearance = build_encoder_trunk(cfg, in_channels=3)
        self.map_channels = map_channels
        self.decoder = ImageDecoder(cfg, in_channels=2 * map_channels + trunk_channels(cfg) + 2)

    def features(self, frames: np.ndarray | Tensor) -> Tensor:
        """Flat per-frame code: ``(..., 3, H, W)`` frames (or uint8 ``(..., H, W, 3)``) -> ``(..., feature_dim)``."""
        return self._flat(self.encode(frames))

    def observed(self, features: Tensor) -> Tensor:
        """What agents observe of flat features ``(..., feature_dim)``: the features themselves (keypoints: gated)."""
        return features

    def decode_features(self, features: Tensor, first_frame: Tensor, first_features: Tensor) -> Tensor:
        """Render frames from flat codes; the reference frame's context is computed once per sequence.

        Args:
            features: ``(B, T, feature_dim)``, e.g. dynamics predictions.
            first_frame: ``(B, 3, H, W)`` reference frame (appearance source).
            first_features: ``(B, feature_dim)`` code of the reference frame.
        Returns:
            ``(B, T, 3, H, W)`` frames.
        """
        if features.dim() != 3 or features.shape[-1] != self.feature_dim:
            raise ValueError(f"expected features (B, T, {self.feature_dim}), got shape {tuple(features.shape)}")
        maps, first_maps = self._feature_maps(features), self._feature_maps(first_features)
        first_frame = self._frames(first_frame)
        batch, steps = features.shape[:2]
        context = torch.cat([self.appearance(first_frame), first_maps], dim=1)
        context = context[:, None].expand(batch, steps, *context.shape[1:])
        x = add_coord_channels(torch.cat([maps, context], dim=2).flatten(0, 1))
        change = self.decoder(x).unflatten(0, (batch, steps))
        return change + first_frame[:, None]

    def forward(self, frames: np.ndarray | Tensor, reference_shift: int = 0) -> tuple[Tensor, Any]:
        """Reconstruct ``(B, T, 3, H, W)`` frames from their code: ``(reconstruction, code)``. The appearance
        reference of sequence ``b`` is frame 0 of sequence ``b - reference_shift`` (0: its own)."""
        frames = self._frames(frames, min_dim=5)
        code = self.encode(frames)
        first_features = self._flat(code, step=0)  # sliced before flattening: the order autograd sums gradients in
        first_frame = frames[:, 0]
        if reference_shift:
            first_frame, first_features = first_frame.roll(reference_shift, 0), first_features.roll(reference_shift, 0)
        return self.decode_features(self._flat(code), first_frame, first_features), code

    def loss(self, frames: np.ndarray | Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Reconstruction loss plus the model's weighted regularisers on ``(B, T, 3, H, W)`` frames (with
        ``keypoints.reference: other``, each sequence reconstructed from the next sequence's reference frame).

        Returns:
            ``(total, terms)`` with terms ``loss``, ``reconstruction`` and each regulariser's (detached).
        """
        frames = self._frames(frames, min_dim=5)
        reconstruction, code = self(frames, reference_shift=int(self.cfg.reference == "other"))
        total = reconstruction_loss(reconstruction, frames)
        terms = {"reconstruction": total}
        for name, (weight, value) in self._regularisers(code).items():
            terms[name] = value
            total = total + weight * value
        return total, {"loss": total.detach(), **{k: v.detach() for k, v in terms.items()}}

    def _regularisers(self, code: Any) -> dict[str, tuple[float, Tensor]]:
        return {}

    def _frames(self, frames: np.ndarray | Tensor, min_dim: int = 4) -> Tensor:
        """Preprocess and check ``(..., 3, S, S)`` frames at ``cfg.image_size``; returns them on the model's device."""
        frames = preprocess_frames(frames, next(self.parameters()).device)  # uint8 moves before it is widened
        size = self.cfg.image_size
        if frames.dim() < min_dim or frames.shape[-2:] != (size, size):
            lead = "(B, T, " if min_dim == 5 else "(..., "
            raise ValueError(f"expected frames {lead}3, {size}, {size}), got shape {tuple(frames.shape)}")
        return frames

    def l2_parameters(self) -> Iterator[nn.Parameter]:
        """Kernels (weights, not biases) of every conv and linear layer, for the trainer's L2 penalty."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                yield module.weight


class KeypointAutoencoder(_FrameAutoencoder):
    """The paper's model: frames -> heatmaps -> keypoints (x, y, mu) -> Gaussian maps -> frames.

    The decoder sees only the keypoints of frame t, the keypoints of the reference frame (frame 0 of the
    sequence) and the appearance features of the reference frame, and predicts the change from it. The
    features (what the dynamics see) are the keypoints flattened to ``(..., K * 3)``: x0, y0, mu0, x1, ...; the
    agents see them gated by intensity (:meth:`observed`).

    Args:
        cfg: sizes and loss weights.
    """

    def __init__(self, cfg: KeypointConfig) -> None:
        super().__init__(cfg, map_channels=cfg.num_keypoints)
        self.encoder = KeypointEncoder(cfg)
        self.feature_dim = 3 * cfg.num_keypoints

    def encode(self, frames: np.ndarray | Tensor) -> KeypointOutput:
        """Detect keypoints, one conv pass over all frames.

        Args:
            frames: ``(..., 3, H, W)`` float in [-0.5, 0.5] (or uint8 ``(..., H, W, 3)``), e.g. ``(B, T, ...)``.
        Returns:
            :class:`KeypointOutput` with ``keypoints (..., K, 3)`` and ``heatmaps (..., K, h, w)``.
        """
        frames = self._frames(frames)
        heatmaps = self.encoder(frames.flatten(0, -4))
        keypoints = heatmaps_to_keypoints(heatmaps, self.cfg.heatmap_eps)
        lead = frames.shape[:-3]
        return KeypointOutput(keypoints.unflatten(0, lead), heatmaps.unflatten(0, lead))

    def _flat(self, code: KeypointOutput, step: int | None = None) -> Tensor:
        return (code.keypoints if step is None else code.keypoints[:, step]).flatten(-2)

    def observed(self, features: Tensor) -> Tensor:
        """The keypoints gated by intensity, ``(mu x, mu y, mu)`` (:func:`gate_by_intensity`)."""
        return gate_by_intensity(features)

    def _feature_maps(self, features: Tensor) -> Tensor:
        return keypoints_to_maps(features.unflatten(-1, (-1, 3)), self.cfg.heatmap_width, sigma=self.cfg.keypoint_sigma)

    def _regularisers(self, out: KeypointOutput) -> dict[str, tuple[float, Tensor]]:
        """The keypoint losses with their weights: sparsity and temporal separation."""
        cfg = self.cfg
        return {"sparsity": (cfg.sparsity_weight, sparsity_loss(out.heatmaps.float())),  # fp32 under bf16 autocast
                "separation": (cfg.separation_weight, separation_loss(out.keypoints, cfg.separation_sigma))}


class CNNAutoencoder(_FrameAutoencoder):
    """The unstructured baseline: same trunks and decoder, a flat (tanh-bounded) latent instead of keypoints.

    Encoder: coordinate channels, encoder trunk, 1x1 conv to ``cnn.map_channels``, flatten, Linear to
    ``latent_dim``, tanh. Decoder: Linear from the latent back to ``cnn.map_channels`` maps at heatmap
    resolution, which take the place of the Gaussian maps in the keypoint model's decoder. Its only loss is
    the reconstruction.

    Args:
        cfg: sizes of the trunks (the keypoint-specific fields are unused).
        cnn: the latent size.
    """

    def __init__(self, cfg: KeypointConfig, cnn: CNNConfig) -> None:
        super().__init__(cfg, map_channels=cnn.map_channels)
        cnn.validate()
        self.feature_dim = cnn.latent_dim
        code_size = cnn.map_channels * cfg.heatmap_width**2
        self.encoder = nn.Sequential(
            build_encoder_trunk(cfg, in_channels=3 + 2),
            *_conv_act(cfg, trunk_channels(cfg), cnn.map_channels, kernel_size=1),
            nn.Flatten(),
            nn.Linear(code_size, cnn.latent_dim),
            nn.Tanh(),
        )
        self.to_maps = nn.Sequential(nn.Linear(cnn.latent_dim, code_size), nn.LeakyReLU(cfg.leaky_relu_slope))

    def encode(self, frames: np.ndarray | Tensor) -> Tensor:
        """Flat latents ``(..., latent_dim)`` in [-1, 1] of ``(..., 3, H, W)`` frames."""
        frames = self._frames(frames)
        latents = self.encoder(add_coord_channels(frames.flatten(0, -4)))
        return latents.unflatten(0, frames.shape[:-3])

    def _flat(self, code: Tensor, step: int | None = None) -> Tensor:
        return code if step is None else code[:, step]

    def _feature_maps(self, features: Tensor) -> Tensor:
        size = self.cfg.heatmap_width
        return self.to_maps(features).unflatten(-1, (self.map_channels, size, size))
