"""A fast CPU inference path for the frame encoders: uint8 pixels -> features, a few frames at a time.

The wrappers encode one frame per env step (or one per sub-env). At that size PyTorch's default CPU conv
picks its generic im2col path for most of the small layers, and a dozen tiny elementwise ops (normalising
the pixels, coordinate channels, heatmap centres of mass) each cost more in dispatch than in arithmetic.
:class:`FastEncoder` computes the same function with fewer, larger ops:

* pixel normalisation and the coordinate channels are folded into the first conv: its response to them is
  the same for every frame, so it is computed once as a bias map and the conv sees only the raw RGB values;
* every conv runs through oneDNN (``torch.mkldnn_convolution``) on channels-last tensors, where a uint8
  ``(N, H, W, 3)`` frame already is once viewed as ``(N, 3, H, W)``;
* the keypoint head's 1x1 conv is one matrix product, and the heatmaps' centres of mass and intensities a
  second one against a fixed ``[x, y, 1]`` grid.

Results match :meth:`PerceptionModel.encode` to float rounding (~1e-6). The plan copies nothing but a few
reshaped kernels, and :class:`FastEncoder` rebuilds it whenever a parameter of the encoder changes
(in-place training updates, ``load_state_dict``), so it never serves stale weights.

    >>> import numpy as np, torch, kp_rl
    >>> cfg = kp_rl.get_preset("cpu").replace(keypoints={"image_size": 32, "num_keypoints": 4, "base_filters": 4})
    >>> model = kp_rl.PerceptionModel(cfg).eval()
    >>> frames = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), np.uint8)
    >>> with torch.inference_mode():
    ...     bool(torch.allclose(FastEncoder(model)(frames), model.encode(frames), atol=1e-5))
    True
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kp_rl.keypoints import CNNAutoencoder, KeypointAutoencoder, add_coord_channels, preprocess_frames

__all__ = ["FastEncoder"]

_CHANNELS_LAST = torch.channels_last


def _conv_fn() -> Callable[[Tensor, Tensor, Tensor | None, tuple[int, ...], tuple[int, ...]], Tensor]:
    """oneDNN's convolution where PyTorch was built with it, else the generic one (same results)."""
    if torch.backends.mkldnn.is_available() and hasattr(torch, "mkldnn_convolution"):
        return lambda x, w, b, padding, stride: torch.mkldnn_convolution(x, w, b, padding, stride, (1, 1), 1)
    return lambda x, w, b, padding, stride: F.conv2d(x, w, b, stride, padding)


class _Plan:
    """Kernels of one encoder, reshaped for the fast path (built under ``torch.no_grad``)."""

    def __init__(self, autoencoder: KeypointAutoencoder | CNNAutoencoder) -> None:
        cfg = autoencoder.cfg
        self.slope = cfg.leaky_relu_slope
        self.eps = cfg.heatmap_eps
        self.size = cfg.image_size
        self.keypoints = isinstance(autoencoder, KeypointAutoencoder)
        if self.keypoints:
            trunk, head = autoencoder.encoder.trunk, autoencoder.encoder.heatmaps
        else:
            trunk, head = autoencoder.encoder[0], autoencoder.encoder[1]
            linear = autoencoder.encoder[4]
            self.linear_weight, self.linear_bias = linear.weight.t().contiguous(), linear.bias.detach().clone()
        convs = [m for m in trunk if isinstance(m, nn.Conv2d)]
        first = convs[0]
        device = first.weight.device
        # The first conv's response to a frame of zeros (pixel value -0.5 after normalisation, plus the coordinate
        # channels and the bias) is what it adds to every frame; the rest is linear in the raw pixel values.
        zero = torch.zeros(1, self.size, self.size, 3, dtype=torch.uint8, device=device)
        self.bias_map = first(add_coord_channels(preprocess_frames(zero))).contiguous(memory_format=_CHANNELS_LAST)
        self.first_weight = (first.weight[:, :3] / 255.0).contiguous(memory_format=_CHANNELS_LAST)
        self.first_geometry = (first.padding, first.stride)
        self.convs = [(c.weight.detach().contiguous(memory_format=_CHANNELS_LAST), c.bias.detach().clone(),
                       c.padding, c.stride) for c in convs[1:]]
        self.head_weight = head.weight[:, :, 0, 0].t().contiguous()  # (C, K): the 1x1 conv as a matrix
        self.head_bias = head.bias.detach().clone()
        if self.keypoints:
            width = cfg.heatmap_width
            gx = torch.linspace(-1.0, 1.0, width, device=device).repeat(width)
            gy = torch.linspace(1.0, -1.0, width, device=device).repeat_interleave(width)
            self.grid = torch.stack([gx, gy, torch.ones_like(gx)])  # (3, h*w), rows: x, y, 1 per heatmap pixel
            self.grid_eps = self.eps * self.grid.sum(1, keepdim=True)  # what adding eps per pixel adds to each sum
            self.eps_total = self.eps * width * width
        self.conv = _conv_fn()

    def __call__(self, frames: Tensor) -> Tensor:
        """uint8 ``(N, H, W, 3)`` -> float32 ``(N, feature_dim)``."""
        x = frames.permute(0, 3, 1, 2).float()  # channels-last (N, 3, H, W): the layout oneDNN wants
        x = self.conv(x, self.first_weight, None, *self.first_geometry).add_(self.bias_map)
        x = F.leaky_relu_(x, self.slope)
        for weight, bias, padding, stride in self.convs:
            x = F.leaky_relu_(self.conv(x, weight, bias, padding, stride), self.slope)
        n, channels = x.shape[:2]
        pixels = x.permute(0, 2, 3, 1).reshape(-1, channels)  # (N*h*w, C), a view of the channels-last maps
        maps = torch.addmm(self.head_bias, pixels, self.head_weight)  # the 1x1 head: (N*h*w, K)
        if not self.keypoints:
            maps = F.leaky_relu_(maps, self.slope).view(n, -1, maps.shape[1]).transpose(1, 2).reshape(n, -1)
            return torch.tanh(torch.addmm(self.linear_bias, maps, self.linear_weight))
        heatmaps = F.softplus(maps).view(n, -1, maps.shape[1])  # (N, h*w, K)
        sums = torch.matmul(self.grid, heatmaps)  # (N, 3, K): sum x*m, sum y*m, sum m per keypoint
        shifted = sums + self.grid_eps  # the same sums over (m + eps), as heatmaps_to_keypoints centres them
        xy = shifted[:, :2] / shifted[:, 2:]
        mass = sums[:, 2]  # mu = mean / (eps + max mean) = sum / (eps * h * w + max sum)
        mu = mass / (self.eps_total + mass.amax(dim=-1, keepdim=True))
        return torch.cat([xy, mu[:, None]], dim=1).transpose(1, 2).reshape(n, -1)


class FastEncoder:
    """Pixels -> features of a :class:`~kp_rl.model.PerceptionModel`, for inference on the CPU.

    Call it under ``torch.inference_mode`` (or ``torch.no_grad``): it does not build autograd graphs.
    The reshaped kernels are rebuilt on the first call after any encoder parameter changed.

    Args:
        model: the perception model (keypoint or CNN representation), on the CPU.

    Raises:
        ValueError: the model is not on the CPU.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._check_cpu()
        self._key: tuple[tuple[int, int], ...] | None = None
        self._plan: _Plan | None = None

    def __getstate__(self) -> dict:
        # the plan is derived (and holds a closure): a pickled copy rebuilds it on its first call
        return {**self.__dict__, "_key": None, "_plan": None}

    def _check_cpu(self) -> None:
        device = next(self.model.parameters()).device
        if device.type != "cpu":
            raise ValueError(f"FastEncoder runs on the CPU; the model is on {device}")

    def _parameters_key(self) -> tuple[tuple[int, int], ...]:
        # Identity and in-place version counter of every encoder parameter: changes on optimiser steps,
        # load_state_dict and replaced modules alike.
        return tuple((p.data_ptr(), p._version) for p in self.model.autoencoder.encoder.parameters())

    def __call__(self, frames: np.ndarray | Tensor) -> Tensor:
        """uint8 ``(N, H, W, 3)`` frames (numpy or torch) -> float32 ``(N, feature_dim)``.

        Raises:
            ValueError: frames are not uint8 ``(N, S, S, 3)`` at the model's image size.
        """
        frames = torch.as_tensor(np.ascontiguousarray(frames) if isinstance(frames, np.ndarray) else frames)
        frames = frames.contiguous()  # (N, H, W, 3) rows: a channels-last (N, 3, H, W) image once permuted
        size = self.model.image_size
        if frames.dtype != torch.uint8 or frames.shape[1:] != (size, size, 3):
            raise ValueError(f"expected uint8 frames (N, {size}, {size}, 3), got {frames.dtype} of shape "
                             f"{tuple(frames.shape)}")
        key = self._parameters_key()
        if key != self._key:  # also when the model was moved off the CPU since
            self._check_cpu()
            with torch.no_grad():
                self._plan = _Plan(self.model.autoencoder)
            self._key = key
        assert self._plan is not None
        return self._plan(frames)
