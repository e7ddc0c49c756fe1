"""Tests of kp_rl.metrics: known values, closed forms, and an independent SSIM reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kp_rl.metrics import (
    fit_ridge,
    frechet_distance,
    frechet_distance_from_features,
    predict_ridge,
    psnr,
    reward_prediction_error,
    ssim,
    tracking_error,
)


# --------------------------------------------------------------------------------------------------- PSNR


def test_psnr_known_value_and_shape():
    target = np.random.default_rng(0).uniform(0, 0.8, size=(2, 3, 8, 8, 3))
    values = psnr(target + 0.1, target)
    assert values.shape == (2, 3)
    np.testing.assert_allclose(values, 20.0)
    np.testing.assert_allclose(psnr(target + 0.1, target, data_range=2.0), 20.0 + 20 * math.log10(2))


def test_psnr_identical_is_inf_and_uint8_does_not_wrap():
    frame = np.zeros((8, 8, 3), np.uint8)
    assert psnr(frame, frame) == np.inf
    a, b = np.full((8, 8, 3), 10, np.uint8), np.full((8, 8, 3), 20, np.uint8)  # a - b would wrap in uint8
    assert float(psnr(a, b, data_range=255)) == pytest.approx(10 * math.log10(255**2 / 100))


def test_psnr_accepts_tensors_and_channels_first():
    x = torch.rand(4, 3, 8, 8)
    y = x + 0.1
    np.testing.assert_allclose(psnr(y, x, channels_last=False), 20.0, rtol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        psnr(x, x[:2])


# --------------------------------------------------------------------------------------------------- SSIM


def _ssim_reference(x: np.ndarray, y: np.ndarray, data_range: float = 1.0) -> float:
    """Direct definition on a single-channel image: explicit 11 x 11 Gaussian windows, valid positions."""
    i = np.arange(11) - 5.0
    g = np.exp(-(i**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vals = []
    for r in range(x.shape[0] - 10):
        for c in range(x.shape[1] - 10):
            px, py = x[r : r + 11, c : c + 11], y[r : r + 11, c : c + 11]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cxy = (w * (px - mx) * (py - my)).sum()
            vals.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_ssim_matches_direct_definition():
    rng = np.random.default_rng(1)
    x = rng.uniform(size=(14, 15, 2))
    y = np.clip(x + rng.normal(0, 0.2, size=x.shape), 0, 1)
    expected = np.mean([_ssim_reference(x[..., c], y[..., c]) for c in range(2)])
    assert float(ssim(y, x)) == pytest.approx(expected, rel=1e-10)


def test_ssim_constant_images_closed_form():
    a, b = 0.2, 0.7
    x, y = np.full((3, 16, 16, 3), a), np.full((3, 16, 16, 3), b)
    c1 = 0.01**2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)  # variances are 0: only the luminance term is left
    np.testing.assert_allclose(ssim(x, y), expected, rtol=1e-9)


def test_ssim_identical_symmetric_and_below_one_for_noise():
    rng = np.random.default_rng(2)
    x = rng.uniform(size=(2, 4, 16, 16, 3))
    y = rng.uniform(size=(2, 4, 16, 16, 3))
    np.testing.assert_allclose(ssim(x, x), 1.0, atol=1e-12)
    s = ssim(x, y)
    assert s.shape == (2, 4) and (s < 0.2).all()
    np.testing.assert_allclose(s, ssim(y, x), atol=1e-12)


def test_ssim_layouts_agree_and_wrong_layout_is_named():
    x, y = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    cf = ssim(x, y, channels_last=False)
    cl = ssim(x.permute(0, 2, 3, 1), y.permute(0, 2, 3, 1), channels_last=True)
    np.testing.assert_allclose(cf, cl, atol=1e-12)
    with pytest.raises(ValueError, match="channels_last"):
        ssim(x, y)  # (3, 16, 16) read as H=3


# ---------------------------------------------------------------------------------------------- probes


def test_ridge_recovers_linear_map_with_bias():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 5))
    w_true, b_true = rng.normal(size=(5, 2)), np.array([1.0, -2.0])
    y = x @ w_true + b_true
    w, b = fit_ridge(x, y, ridge=0.0)
    np.testing.assert_allclose(w, w_true, atol=1e-10)
    np.testing.assert_allclose(b, b_true, atol=1e-10)
    np.testing.assert_allclose(predict_ridge((w, b), x), y, atol=1e-10)


def test_tracking_error_is_the_noise_level_of_a_linear_readout():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(4000, 3))
    y = x @ np.array([[1.0], [2.0], [3.0]]) + rng.normal(0, 0.5, size=(4000, 1))
    assert tracking_error(x[:2000], y[:2000], x[2000:], y[2000:])["keypoint_rmse"] == pytest.approx(0.5, rel=0.05)


def test_tracking_error_keys_and_ordering():
    rng = np.random.default_rng(5)
    coords = rng.uniform(-1, 1, size=(300, 2, 2))  # (N, bodies, 2)
    keypoints = np.concatenate([coords @ np.array([[0.5, 0.1], [-0.2, 0.9]]), rng.uniform(size=(300, 2, 1))], -1)
    res = tracking_error(torch.from_numpy(keypoints[:200]), coords[:200], keypoints[200:], coords[200:])
    assert set(res) == {"keypoint_rmse", "mean_baseline_rmse"}
    assert all(isinstance(v, float) for v in res.values())
    assert res["keypoint_rmse"] < 1e-3
    assert res["mean_baseline_rmse"] == pytest.approx(2 / math.sqrt(12), rel=0.15)  # std of U(-1, 1)


def test_reward_prediction_error():
    true = np.array([[0.0, 1.0, 5.0], [2.0, 1.0, 7.0], [4.0, 1.0, 9.0]])
    pred = true.copy()
    pred[:, 0] = 2.0  # predicts the mean: R^2 = 0
    pred[:, 2] += 1.0  # constant offset: MSE 1, SST = 8 -> R^2 = 1 - 3/8
    res = reward_prediction_error(pred, torch.from_numpy(true))
    np.testing.assert_allclose(res["mse"], [8 / 3, 0.0, 1.0])
    np.testing.assert_allclose(res["r2"][[0, 2]], [0.0, 1 - 3 / 8])
    assert np.isnan(res["r2"][1])  # constant true reward: SST = 0
    assert res["mse_mean"] == pytest.approx((8 / 3 + 1) / 3)
    assert res["r2_mean"] == pytest.approx((1 - 3 / 8) / 2)
    with pytest.raises(ValueError):
        reward_prediction_error(pred[:, :2], true)


# ----------------------------------------------------------------------------------------------- Frechet


def test_frechet_closed_forms():
    rng = np.random.default_rng(6)
    a = rng.normal(size=(4, 4))
    cov = a @ a.T + np.eye(4)
    mu = rng.normal(size=4)
    assert frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-8)
    shift = np.array([1.0, -2.0, 0.5, 3.0])
    assert frechet_distance(mu, np.eye(4), mu + shift, np.eye(4)) == pytest.approx(shift @ shift)
    d1, d2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = 1.0 + ((np.sqrt(d1) - np.sqrt(d2)) ** 2).sum()
    assert frechet_distance(np.zeros(3), np.diag(d1), np.ones(3) / np.sqrt(3), np.diag(d2)) == pytest.approx(expected)


def test_frechet_from_features():
    rng = np.random.default_rng(7)
    f = rng.normal(size=(50, 6))
    assert frechet_distance_from_features(f, f) == pytest.approx(0.0, abs=1e-6)
    g1 = rng.normal(size=(20000, 2))
    g2 = rng.normal(size=(20000, 2)) * 2.0 + 1.0  # closed form: ||(1, 1)||^2 + 2 (1 - 2)^2 = 4
    assert frechet_distance_from_features(g1, g2) == pytest.approx(4.0, rel=0.05)
    with pytest.raises(ValueError):
        frechet_distance_from_features(f, f[:, :3])


def test_frechet_singular_covariance_is_finite():
    cov = np.diag([1.0, 0.0, 0.0])
    assert frechet_distance(np.zeros(3), cov, np.zeros(3), cov) == pytest.approx(0.0, abs=1e-5)




def test_ssim_of_many_frames_is_computed_in_chunks_with_the_same_scores(monkeypatch):
    """A few thousand video frames (3 samples x 32 windows x 16 steps) once asked torchmetrics for 30 GB."""
    import kp_rl.metrics as metrics

    rng = np.random.default_rng(0)
    target = rng.integers(0, 256, (5, 7, 16, 16, 3)).astype(np.uint8)
    pred = np.clip(target + rng.normal(0, 20, target.shape), 0, 255).astype(np.uint8)
    whole = metrics.ssim(pred, target, data_range=255.0)
    monkeypatch.setattr(metrics, "SSIM_CHUNK", 4)
    np.testing.assert_allclose(metrics.ssim(pred, target, data_range=255.0), whole, rtol=1e-12)
    assert whole.shape == (5, 7) and 0 < whole.min() < whole.max() < 1
