import pytest
import torch

from kp_rl.losses import best_of_many, kl_divergence, reconstruction_loss, separation_loss, sparsity_loss


def test_reconstruction_is_zero_for_a_perfect_match_and_half_the_summed_squares_otherwise():
    frames = torch.rand(2, 3, 3, 8, 8)
    assert reconstruction_loss(frames, frames) == 0
    # every pixel off by 0.1: per frame 3*8*8 * 0.01 / 2, averaged over batch and time
    assert reconstruction_loss(frames + 0.1, frames).item() == pytest.approx(3 * 8 * 8 * 0.01 / 2, rel=1e-5)
    with pytest.raises(ValueError, match="reconstruction shape"):
        reconstruction_loss(frames, frames[:, :2])


def test_sparsity_is_zero_for_empty_heatmaps_and_grows_with_their_mass():
    empty = torch.zeros(2, 4, 5, 16, 16)
    one_pixel = empty.clone()
    one_pixel[..., 3, 3] = 1.0
    full = torch.ones_like(empty)
    assert sparsity_loss(empty) == 0
    assert sparsity_loss(one_pixel).item() == pytest.approx(1 / 256)
    assert sparsity_loss(full).item() == pytest.approx(1.0)


def test_separation_is_one_for_parallel_motion_and_near_zero_for_independent_motion():
    t = torch.linspace(-1, 1, 10)
    path = torch.stack([t, t.flip(0)], -1)  # (T, 2)
    parallel = torch.cat([path[None, :, None].expand(1, 10, 3, 2), torch.ones(1, 10, 3, 1)], -1)
    assert separation_loss(parallel, sigma=0.1).item() == pytest.approx(1.0)
    offsets = torch.tensor([0.5, -0.3, 0.2])[None, None, :, None]  # static offsets do not matter (centred)
    assert separation_loss(parallel + torch.cat([offsets.expand(1, 10, 3, 2), torch.zeros(1, 10, 3, 1)], -1)).item() \
        == pytest.approx(1.0)
    independent = torch.zeros(1, 10, 3, 3)
    independent[0, :, 0, 0] = t  # one moves right, one moves up, one stays
    independent[0, :, 1, 1] = t
    assert separation_loss(independent, sigma=0.1).item() < 1e-6
    assert separation_loss(torch.zeros(1, 10, 1, 3)) == 0  # a single keypoint has no pairs


def test_kl_matches_the_closed_form_and_vanishes_for_equal_distributions():
    mean, std = torch.full((3,), 2.0), torch.full((3,), 2.0)
    assert kl_divergence(mean, std, torch.zeros(3), torch.ones(3)).item() == pytest.approx(8.4206, abs=1e-4)
    assert kl_divergence(mean, std, mean, std).item() == pytest.approx(0.0, abs=1e-7)


def test_best_of_many_takes_the_smallest_error_per_example():
    errors = torch.tensor([[3.0, 1.0], [2.0, 5.0], [4.0, 0.5]])
    best, index = best_of_many(errors)
    assert best.tolist() == [2.0, 0.5] and index.tolist() == [1, 2]
    with pytest.raises(ValueError, match="samples, batch"):
        best_of_many(errors[0])
