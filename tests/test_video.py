import imageio.v3 as iio
import numpy as np
import pytest
import torch

import kp_rl
from kp_rl.model import PerceptionModel
from kp_rl.video import predict_frames, video_metrics, write_comparison

TINY = dict(keypoints={"image_size": 32, "num_keypoints": 4, "base_filters": 4, "layers_per_scale": 0},
            cnn={"latent_dim": 12},
            dynamics={"rnn_units": 16, "latent_dim": 4, "prior_hidden": 16, "posterior_hidden": 16,
                      "decoder_hidden": 16, "reward_hidden": 16, "observed_steps": 3, "predicted_steps": 2,
                      "num_samples": 3})


def tiny_model(representation: str, with_dynamics: bool = True) -> PerceptionModel:
    torch.manual_seed(0)
    cfg = kp_rl.get_preset("cpu").replace(**TINY)
    return PerceptionModel(cfg, representation, action_dim=2, with_dynamics=with_dynamics).eval()


def inputs(batch=2, observed=3, predicted=2, size=32):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (batch, observed, size, size, 3), dtype=np.uint8)
    actions = rng.uniform(-1, 1, (batch, observed + predicted, 2)).astype(np.float32)
    return frames, actions


@pytest.mark.parametrize("representation", ["keypoints", "cnn"])
def test_predict_frames_shapes_and_dtypes(representation):
    model = tiny_model(representation)
    frames, actions = inputs()
    out = predict_frames(model, frames, actions, num_samples=2)
    assert out["features"].shape == (2, 2, 5, model.feature_dim) and out["features"].dtype == np.float32
    assert out["rewards"].shape == (2, 2, 5) and out["rewards"].dtype == np.float32
    assert out["frames"].shape == (2, 2, 5, 32, 32, 3) and out["frames"].dtype == np.uint8
    # observed steps are shared by the samples; the prior mean makes every rollout alike
    np.testing.assert_array_equal(out["features"][0, :, :3], out["features"][1, :, :3])
    mean = predict_frames(model, torch.as_tensor(frames), torch.as_tensor(actions), num_samples=2, sample=False)
    np.testing.assert_allclose(mean["features"][0], mean["features"][1])


@pytest.mark.parametrize("representation", ["keypoints", "cnn"])
def test_zero_decoder_reproduces_first_observed_frame(representation):
    model = tiny_model(representation)
    with torch.no_grad():
        model.autoencoder.decoder.output.weight.zero_()
        model.autoencoder.decoder.output.bias.zero_()
    frames, actions = inputs()
    out = predict_frames(model, frames, actions, num_samples=2)
    expected = np.broadcast_to(frames[None, :, :1], out["frames"].shape)
    np.testing.assert_array_equal(out["frames"], expected)


def test_predict_frames_errors():
    frames, actions = inputs()
    with pytest.raises(ValueError, match="needs a model with dynamics"):
        predict_frames(tiny_model("keypoints", with_dynamics=False), frames, actions)
    model = tiny_model("keypoints")
    with pytest.raises(ValueError, match=r"expected uint8 \(B, T_obs, 32, 32, 3\)"):
        predict_frames(model, frames.astype(np.float32), actions)
    with pytest.raises(ValueError, match="actions: expected"):
        predict_frames(model, frames, actions[:, :2])


def test_write_comparison_gif_and_png(tmp_path):
    rng = np.random.default_rng(1)
    rows = {name: rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
            for name in ("truth", "Struct-VRNN sample 1", "CNN-VRNN sample 1")}
    rows["CNN-VRNN sample 2"] = np.zeros((6, 32, 32, 3), np.uint8)  # static rows must not merge GIF frames
    stem = tmp_path / "figs" / "video_task"
    write_comparison(rows, stem, observed=3, fps=4)
    gif = iio.imread(stem.with_suffix(".gif"), index=None)
    assert gif.shape[0] == 6 and gif.shape[-1] in (3, 4)
    png = iio.imread(stem.with_suffix(".png"))
    assert png.ndim == 3 and png.shape[0] > 100
    assert sorted(p.name for p in stem.parent.iterdir()) == ["video_task.gif", "video_task.png"]  # no temporaries
    with pytest.raises(ValueError, match="one shape"):
        write_comparison({"truth": rows["truth"], "short": rows["truth"][:3]}, stem, observed=3)


def test_video_metrics():
    rng = np.random.default_rng(2)
    truth = rng.integers(0, 256, (2, 4, 16, 16, 3), dtype=np.uint8)
    same = video_metrics(np.stack([truth, truth]), truth)
    assert same["num_samples"] == 2 and same["ssim_first_sample"].shape == (4,)
    np.testing.assert_allclose(same["ssim_first_sample"], 1.0)
    assert np.isinf(same["psnr_first_sample"]).all() and np.isinf(same["psnr_best_of_samples"]).all()
    noisy = np.clip(truth.astype(int) + rng.integers(-20, 21, truth.shape), 0, 255).astype(np.uint8)
    mixed = video_metrics(np.stack([noisy, truth]), truth)  # sample 0 noisy, sample 1 exact
    assert np.isfinite(mixed["psnr_first_sample"]).all() and (mixed["ssim_first_sample"] < 1).all()
    np.testing.assert_allclose(mixed["ssim_best_of_samples"], 1.0)
    with pytest.raises(ValueError, match="matching shapes"):
        video_metrics(truth, truth)
