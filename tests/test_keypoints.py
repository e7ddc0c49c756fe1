"""Keypoint geometry (the reference's invariants), shapes, gradients and a tiny training run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kp_rl.config import CNNConfig, ConfigError, KeypointConfig, get_preset
from kp_rl.keypoints import (
    CNNAutoencoder,
    KeypointAutoencoder,
    add_coord_channels,
    count_parameters,
    gate_by_intensity,
    heatmaps_to_keypoints,
    keypoints_to_maps,
    preprocess_frames,
)
from kp_rl.losses import reconstruction_loss

TINY = KeypointConfig(image_size=32, num_keypoints=4, base_filters=8, layers_per_scale=0)


def _hot(row: int, col: int, size: int = 33) -> torch.Tensor:
    maps = torch.zeros(1, size, size)
    maps[0, row, col] = 1.0
    return maps


@pytest.mark.parametrize(
    ("row", "col", "expected"),
    [(0, 0, (-1.0, 1.0, 1.0)), (32, 32, (1.0, -1.0, 1.0)), (16, 16, (0.0, 0.0, 1.0)), (0, 32, (1.0, 1.0, 1.0))],
)
def test_hot_pixel_gives_its_coordinates(row: int, col: int, expected: tuple[float, float, float]) -> None:
    keypoint = heatmaps_to_keypoints(_hot(row, col))[0]
    torch.testing.assert_close(keypoint, torch.tensor(expected), atol=2e-3, rtol=0)  # eps=1e-6 per pixel


def test_empty_map_gives_zero_keypoint_and_mu_is_relative() -> None:
    maps = torch.zeros(2, 3, 9, 9)
    maps[1, 0, 4, 4], maps[1, 1, 4, 4] = 2.0, 1.0  # second example: intensities 2, 1, 0
    keypoints = heatmaps_to_keypoints(maps)
    torch.testing.assert_close(keypoints[0], torch.zeros(3, 3), atol=1e-6, rtol=0)
    torch.testing.assert_close(keypoints[1, :, 2], torch.tensor([1.0, 0.5, 0.0]), atol=1e-4, rtol=0)


def test_gating_hides_the_position_of_an_inactive_keypoint() -> None:
    flat = torch.tensor([[0.5, -0.4, 1.0, 0.9, 0.7, 0.0, -0.6, 0.2, 0.5]])  # (x, y, mu) of 3 keypoints
    gated = gate_by_intensity(flat)
    torch.testing.assert_close(gated, torch.tensor([[0.5, -0.4, 1.0, 0.0, 0.0, 0.0, -0.3, 0.1, 0.5]]))
    moved = flat.clone()
    moved[0, 3:5] = torch.tensor([-0.9, -0.2])  # the inactive keypoint jumps: the agent sees nothing change
    torch.testing.assert_close(gate_by_intensity(moved), gated)
    assert gate_by_intensity(torch.zeros(2, 5, 12)).shape == (2, 5, 12)


def test_keypoint_renders_where_it_is() -> None:
    maps = keypoints_to_maps(torch.tensor([[-1.0, 1.0, 1.0], [0.2, -0.4, 0.7]]), height=16, sigma=1.5)
    assert maps.shape == (2, 16, 16)
    assert divmod(int(maps[0].argmax()), 16) == (0, 0)
    assert float(maps[1].max()) <= 0.7  # never above mu: no normalisation
    on_grid = keypoints_to_maps(torch.tensor([[1.0, -1.0, 0.7]]), height=16)  # exactly on the last pixel
    assert float(on_grid[0, 15, 15]) == pytest.approx(0.7)


def test_maps_keypoints_round_trip() -> None:
    torch.manual_seed(0)
    keypoints = torch.cat([torch.rand(10, 2) * 1.4 - 0.7, torch.ones(10, 1)], dim=-1)  # interior points
    recovered = heatmaps_to_keypoints(keypoints_to_maps(keypoints, height=16, sigma=1.5))
    torch.testing.assert_close(recovered[:, :2], keypoints[:, :2], atol=1e-3, rtol=0)


def test_orientation_of_a_dot_in_the_upper_right() -> None:
    image = torch.zeros(1, 32, 32)
    image[0, 4:8, 24:28] = 1.0  # rows near the top, columns near the right
    x, y, mu = heatmaps_to_keypoints(image)[0].tolist()
    assert x > 0.5 and y > 0.5 and mu == pytest.approx(1.0, abs=1e-4)
    coords = add_coord_channels(image[None])[0]  # (3, H, W): image, x, y
    assert coords.shape == (3, 32, 32)
    dot = image[0] > 0
    assert bool((coords[1][dot] > 0).all()) and bool((coords[2][dot] > 0).all())
    assert (coords[1, 0, 0], coords[2, 0, 0], coords[1, -1, -1], coords[2, -1, -1]) == (-1, 1, 1, -1)
    rendered = keypoints_to_maps(torch.tensor([[x, y, mu]]), height=32)[0]
    row, col = divmod(int(rendered.argmax()), 32)
    assert 4 <= row < 8 and 24 <= col < 28


def test_preprocess_frames() -> None:
    pixels = np.zeros((2, 3, 32, 32, 3), dtype=np.uint8)
    pixels[..., 0] = 255
    frames = preprocess_frames(pixels)
    assert frames.shape == (2, 3, 3, 32, 32) and frames.dtype == torch.float32
    assert float(frames[:, :, 0].min()) == 0.5 and float(frames[:, :, 1].max()) == -0.5
    assert torch.equal(preprocess_frames(frames), frames)  # float channels-first passes through
    with pytest.raises(ValueError, match=r"\(2, 32, 32, 4\)"):
        preprocess_frames(np.zeros((2, 32, 32, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"\(2, 32, 32, 3\)"):
        preprocess_frames(torch.zeros(2, 32, 32, 3))  # float but channels-last


@pytest.mark.parametrize("kind", ["keypoints", "cnn"])
def test_shapes_gradients_and_residual_decoding(kind: str) -> None:
    torch.manual_seed(0)
    model = KeypointAutoencoder(TINY) if kind == "keypoints" else CNNAutoencoder(TINY, CNNConfig(latent_dim=10))
    assert model.feature_dim == (12 if kind == "keypoints" else 10)
    frames = torch.rand(2, 3, 3, 32, 32) - 0.5
    features = model.features(frames)
    assert features.shape == (2, 3, model.feature_dim)
    assert model.features(frames[:, 0]).shape == (2, model.feature_dim)  # single frames: (B, 3, H, W)
    reconstruction, _ = model(frames)
    assert reconstruction.shape == frames.shape
    decoded = model.decode_features(features, frames[:, 0], features[:, 0])
    torch.testing.assert_close(decoded, reconstruction)

    total, terms = model.loss(frames)
    assert {"loss", "reconstruction"} <= set(terms) and torch.isfinite(total)
    total.backward()
    encoder_grads = [p.grad for p in model.encoder.parameters()]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in encoder_grads)
    assert sum(float(g.abs().sum()) for g in encoder_grads) > 0
    kernels = list(model.l2_parameters())
    assert kernels and all(k.dim() in (2, 4) for k in kernels)  # weights, never biases

    with torch.no_grad():  # the network predicts the change from the reference frame
        model.decoder.output.weight.zero_()
        model.decoder.output.bias.zero_()
        decoded = model.decode_features(features, frames[:, 0], features[:, 0])
    torch.testing.assert_close(decoded, frames[:, :1].expand_as(frames))

    with pytest.raises(ValueError, match=r"\(2, 3, 3, 16, 16\)"):
        model.features(torch.zeros(2, 3, 3, 16, 16))


def test_keypoint_model_outputs_and_loss_terms() -> None:
    torch.manual_seed(0)
    model = KeypointAutoencoder(TINY)
    out = model.encode(torch.rand(2, 3, 3, 32, 32) - 0.5)
    assert out.keypoints.shape == (2, 3, 4, 3) and out.heatmaps.shape == (2, 3, 4, 8, 8)
    assert bool((out.heatmaps >= 0).all()) and bool((out.keypoints.abs() <= 1).all())
    decoded = model.decode_features(out.keypoints.flatten(-2), torch.zeros(2, 3, 32, 32), out.keypoints[:, 0].flatten(-2))
    assert decoded.shape == (2, 3, 3, 32, 32)
    _, terms = model.loss(torch.rand(2, 3, 3, 32, 32) - 0.5)
    assert set(terms) == {"loss", "reconstruction", "sparsity", "separation"}
    weighted = terms["reconstruction"] + 5.0 * terms["sparsity"] + 10.0 * terms["separation"]
    torch.testing.assert_close(terms["loss"], weighted)


def test_presets_build_with_comparable_sizes() -> None:
    for name in ("cpu", "paper"):
        cfg = get_preset(name)
        structured = count_parameters(KeypointAutoencoder(cfg.keypoints))
        baseline = count_parameters(CNNAutoencoder(cfg.keypoints, cfg.cnn))
        assert 0.5 < baseline / structured < 2.0, (name, structured, baseline)


def _moving_squares(num_sequences: int = 4, steps: int = 4, size: int = 32) -> torch.Tensor:
    pixels = np.zeros((num_sequences, steps, size, size, 3), dtype=np.uint8)
    for n in range(num_sequences):
        for t in range(steps):
            row, col = 4 + 3 * n, 2 + 5 * t
            pixels[n, t, row : row + 6, col : col + 6] = 255
    return preprocess_frames(pixels)


@pytest.mark.parametrize("kind", ["keypoints", "cnn"])
def test_loss_goes_down_on_moving_squares(kind: str) -> None:
    torch.manual_seed(0)
    frames = _moving_squares()
    model = KeypointAutoencoder(TINY) if kind == "keypoints" else CNNAutoencoder(TINY, CNNConfig(latent_dim=8))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    history = []
    for _ in range(60):
        total, terms = model.loss(frames)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append(float(terms["reconstruction"]))
    assert np.mean(history[-5:]) < 0.7 * np.mean(history[:5]), history[::10]
    # ... and beyond what copying the reference frame gives: the code carries where the square is
    copy_first = reconstruction_loss(frames[:, :1].expand_as(frames), frames)
    assert history[-1] < 0.95 * float(copy_first), (history[-1], float(copy_first))


@pytest.mark.parametrize("kind", ["keypoints", "cnn"])
def test_reference_other_reconstructs_each_sequence_from_another_ones_first_frame(kind: str) -> None:
    """``keypoints.reference: other``: what stands still within a sequence but differs between sequences (a
    static target) cannot be copied from the reference frame; the decoder starts from the next sequence's."""
    import dataclasses

    torch.manual_seed(0)
    other_cfg = dataclasses.replace(TINY, reference="other")
    build = (lambda cfg: KeypointAutoencoder(cfg)) if kind == "keypoints" else (
        lambda cfg: CNNAutoencoder(cfg, CNNConfig(latent_dim=8)))
    own, other = build(TINY), build(other_cfg)
    other.load_state_dict(own.state_dict())
    frames = torch.rand(3, 2, 3, 32, 32) - 0.5
    with torch.no_grad():
        for model in (own, other):  # the decoder outputs the reference frame: the reconstruction shows which
            model.decoder.output.weight.zero_()
            model.decoder.output.bias.zero_()
        reconstruction, _ = own(frames, reference_shift=1)
        torch.testing.assert_close(reconstruction, frames.roll(1, 0)[:, :1].expand_as(frames))
        expected = reconstruction_loss(reconstruction, frames)
        assert float(other.loss(frames)[1]["reconstruction"]) == pytest.approx(float(expected))
        assert float(own.loss(frames)[1]["reconstruction"]) < float(expected)  # its own first frame is closer
        same = frames[:1].expand(3, -1, -1, -1, -1)  # identical sequences: either reference is the same frame
        assert float(other.loss(same)[0]) == pytest.approx(float(own.loss(same)[0]))
    with pytest.raises(ConfigError, match="keypoints.reference must be 'own' or 'other'"):
        dataclasses.replace(TINY, reference="first").validate()
