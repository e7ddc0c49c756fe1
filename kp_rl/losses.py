"""Losses of the keypoint autoencoder and the VRNN, in the paper's terms.

Shapes: keypoints are ``(B, T, K, 3)`` with ``(x, y, mu)`` in the last axis; heatmaps ``(B, T, K, H, W)``.

    >>> import torch
    >>> t = torch.linspace(0, 1, 8)[None, :, None, None]               # one trajectory, 8 steps
    >>> parallel = torch.cat([t.expand(1, 8, 3, 2), torch.ones(1, 8, 3, 1)], -1)
    >>> round(float(separation_loss(parallel)), 4)                      # all move together: maximal
    1.0
"""

from __future__ import annotations

import torch
from torch import Tensor


def reconstruction_loss(reconstruction: Tensor, target: Tensor) -> Tensor:
    """Sum of squared errors over each image / 2, averaged over all leading axes (batch, time)."""
    if reconstruction.shape != target.shape:
        raise ValueError(f"reconstruction shape {tuple(reconstruction.shape)} != target {tuple(target.shape)}")
    return 0.5 * (reconstruction - target).pow(2).flatten(-3).sum(-1).mean()


def sparsity_loss(heatmaps: Tensor) -> Tensor:
    """L1 on keypoint intensities: mean over batch, time and keypoints of each raw heatmap's spatial mean."""
    return heatmaps.mean(dim=(-2, -1)).mean()


def separation_loss(keypoints: Tensor, sigma: float = 0.1) -> Tensor:
    """Temporal separation: penalise keypoints whose (centred) trajectories move alike.

    ``d_kk'`` = mean over time of the squared distance between centred trajectories ``k`` and ``k'``;
    loss = (sum over all pairs of exp(-d_kk' / (2 sigma^2)) - K) / (K (K - 1)), in [0, 1].
    1 when all keypoints move in parallel, ~0 when their motions differ by much more than ``sigma``.

    Args:
        keypoints: ``(B, T, K, 3)`` (only x, y are used) or ``(B, T, K, 2)``.
        sigma: distance scale, in image coordinates ([-1, 1]).
    Returns:
        Scalar, mean over the batch.
    """
    xy = keypoints[..., :2]
    num_keypoints = xy.shape[-2]
    if num_keypoints < 2:
        return xy.new_zeros(())
    centred = xy - xy.mean(dim=1, keepdim=True)  # (B, T, K, 2)
    diff = centred.unsqueeze(-2) - centred.unsqueeze(-3)  # (B, T, K, K, 2)
    dist = diff.pow(2).sum(-1).mean(dim=1)  # (B, K, K)
    similarity = torch.exp(-dist / (2.0 * sigma**2)).sum(dim=(-2, -1))
    loss = (similarity - num_keypoints) / (num_keypoints * (num_keypoints - 1))
    return loss.mean()


def kl_divergence(q_mean: Tensor, q_std: Tensor, p_mean: Tensor, p_std: Tensor) -> Tensor:
    """KL(q || p) of diagonal Gaussians, summed over the last axis (latent dims), no reduction otherwise."""
    var_ratio = (q_std / p_std).pow(2)
    mean_term = ((q_mean - p_mean) / p_std).pow(2)
    return 0.5 * (var_ratio + mean_term - 1.0 - torch.log(var_ratio)).sum(-1)


def best_of_many(errors: Tensor) -> tuple[Tensor, Tensor]:
    """Pick, per example, the sample with the smallest error.

    Args:
        errors: ``(S, B)`` error of each of ``S`` samples for each of ``B`` examples.
    Returns:
        ``(best_error (B,), best_index (B,))``; gradients flow only through the chosen sample.
    """
    if errors.dim() != 2:
        raise ValueError(f"best_of_many expects (samples, batch) errors, got shape {tuple(errors.shape)}")
    best, index = errors.min(dim=0)
    return best, index
