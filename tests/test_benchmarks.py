"""The benchmark scripts run end to end at toy sizes and write what the README quotes from them."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(EXPERIMENTS / script), *args], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_bench_agent_measures_each_agent_on_each_device(tmp_path: Path) -> None:
    result = run("bench_agent.py", "--device", "cpu", "--agents", "sac-state", "sac-keypoints-belief",
                 "--fill", "40", "--updates", "2", "--repeats", "1", "--out", str(tmp_path))
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["devices"] == ["cpu"] and set(report["agents"]) == {"sac-state", "sac-keypoints-belief"}
    for row in (r["cpu"] for r in report["agents"].values()):
        assert row["env_steps_per_s"] > 0 and row["updates_per_s"] > 0 and row["updates_vs_cpu"] == 1.0
        assert row["agent_steps_100k"] == 12_500  # cartpole-swingup: action repeat 8
        expected = row["agent_steps_100k"] * (1 / row["env_steps_per_s"] + 1 / row["updates_per_s"]) / 3600
        assert abs(row["hours_per_100k_run"] - expected) < 1e-9
        assert abs(row["sac_step_ms"] - 1e3 / row["env_steps_per_s"] - 1e3 / row["updates_per_s"]) < 1e-9
    assert report["agents"]["sac-state"]["cpu"]["perception_ms_per_step"] == 0.0  # no perception to time
    assert (tmp_path / "bench_agent.png").stat().st_size > 0 and "sac-keypoints-belief" in result.stdout
    assert "| sac-keypoints-belief | cpu |" in (tmp_path / "README.md").read_text()


def test_bench_wrapper_reports_ratios_to_raw(tmp_path: Path) -> None:
    run("bench_wrapper.py", "--steps", "10", "--repeats", "1", "--n-envs", "2", "--out", str(tmp_path))
    report = json.loads((tmp_path / "results.json").read_text())
    rows = report["env_steps_per_s"]
    assert rows["single: raw"]["vs_raw"] == 1.0 and 0 < rows["single: KeypointObservation"]["vs_raw"]
    assert set(report["encode_1_frame_ms_in_context"]) == {"between env steps", "back to back"}
    assert (tmp_path / "bench_wrapper.png").stat().st_size > 0
    assert "| single: KeypointObservation |" in (tmp_path / "README.md").read_text()


def test_bench_threads_chooses_a_thread_count_per_stage(tmp_path: Path) -> None:
    run("bench_threads.py", "--preset", "tiny", "--seconds", "0.05", "--rounds", "1", "--out", str(tmp_path))
    report = json.loads((tmp_path / "results.json").read_text())
    assert set(report["choice"]) == {"autoencoder", "vrnn", "sac update (keypoints + belief)"}
    assert all(c["threads"] in c["worst_fraction_of_best"] or str(c["threads"]) in c["worst_fraction_of_best"]
               for c in report["choice"].values())
    assert "thread(s): steps/s" in (tmp_path / "README.md").read_text()


def test_state_probe_scores_each_observation_of_each_model(tmp_path: Path) -> None:
    import kp_rl
    from kp_rl.data import collect

    for name, seed in (("cartpole-swingup", 0), ("cartpole-swingup-test", 1)):
        collect("cartpole-swingup", tmp_path / "data" / name, 3, seed=seed, max_steps=12, progress=False,
                env_kwargs={"image_size": 32})
    model = kp_rl.PerceptionModel(kp_rl.get_preset("tiny"), action_dim=1, with_dynamics=True)
    model.save(tmp_path / "tiny.pt")
    run("state_probe.py", "--data", str(tmp_path / "data"), "--models", f"tiny={tmp_path / 'tiny.pt'}",
        "--mlp-steps", "5", "--notes", "tiny=untrained", "--out", str(tmp_path / "out"))
    report = json.loads((tmp_path / "out" / "cartpole-swingup" / "results.json").read_text())
    # the state, then every tracked object's pixel position (cartpole: its bodies)
    objects = json.loads((tmp_path / "data" / "cartpole-swingup" / "manifest.json").read_text())["object_names"]
    assert report["state_names"] == ["position[0]", "position[1]", "position[2]", "velocity[0]", "velocity[1]"] + [
        f"{name}.{axis}" for name in objects for axis in "xy"] and objects
    assert report["episodes"] == {"train": 3, "test": 3}
    scores = report["models"]["tiny"]
    assert set(scores) == {"keypoints", "keypoints x2", "keypoints+belief"}
    width = len(report["state_names"])
    assert all(len(v) == width for probes in scores.values() for v in probes.values())
    # R² is at most 1; nan only for a column constant on the held-out episodes (the cart's pixel row)
    assert all(r <= 1.0 for probes in scores.values() for v in probes.values() for r in v[:5])
    assert all(r <= 1.0 or (math.isnan(r) and name == "cart.y") for probes in scores.values()
               for v in probes.values() for r, name in zip(v, report["state_names"]))
    assert "| tiny | keypoints+belief | mlp |" in (tmp_path / "out" / "cartpole-swingup" / "README.md").read_text()
    run("state_probe.py", "--data", str(tmp_path / "data"), "--models", f"tiny={tmp_path / 'tiny.pt'}", "--jitter",
        "--out", str(tmp_path / "out"))
    jitter = json.loads((tmp_path / "out" / "cartpole-swingup" / "jitter.json").read_text())["models"]["tiny"]
    assert len(jitter["raw_xy"]) == len(jitter["gated_step"]) == len(jitter["on"]) == 4  # the tiny preset's K
    assert all(s >= 0 for s in jitter["gated_step"] + jitter["raw_step"])
    assert len(jitter["state"]) == 5 and len(jitter["belief_quartiles"]) == 3


def test_change_share_is_zero_for_a_constant_step_and_one_for_white_noise() -> None:
    sys.path.insert(0, str(EXPERIMENTS))
    from state_probe import change_share

    ramp = [np.arange(200.0)[:, None]]
    noise = [np.random.default_rng(0).normal(size=(20000, 1))]
    assert change_share(ramp)[0] < 1e-3 and abs(change_share(noise)[0] - 1) < 0.05


def test_state_probe_r2_is_one_for_a_perfect_readout_and_zero_for_the_mean() -> None:
    sys.path.insert(0, str(EXPERIMENTS))
    from state_probe import r2

    target = np.random.default_rng(0).normal(size=(50, 3))
    np.testing.assert_allclose(r2(target, target), 1.0)
    np.testing.assert_allclose(r2(np.broadcast_to(target.mean(0), target.shape), target), 0.0, atol=1e-12)


def test_feature_usability_appends_to_the_state_and_writes_curves(tmp_path: Path) -> None:
    run("feature_usability.py", "--variants", "state+kpb", "state+noise", "--env-steps", "160", "--eval-every", "20",
        "--out", str(tmp_path))
    for variant in ("state+kpb", "state+noise"):
        curve = json.loads((tmp_path / f"{variant}-seed0.json").read_text())
        assert curve["agent_steps"] == 20 and curve["env_steps"] == 160 and curve["steps"] == [20]
        assert len(curve["returns"]) == 1 and curve["eval_episodes"] == 10
    sys.path.insert(0, str(EXPERIMENTS))
    from feature_usability import make_env

    env = make_env("cartpole-swingup", "state+kpb", "pretrained:cartpole-swingup", 0, width=0)
    observation, info = env.reset(seed=0)
    assert observation.shape == (5 + 48 + 136,)  # state, then the keypoints and the belief
    np.testing.assert_allclose(observation[:5], info["state"], rtol=1e-6)
    env.close()
    full = make_env("cartpole-swingup", "kpb", "pretrained:cartpole-swingup", 0, width=0)
    belief = make_env("cartpole-swingup", "belief", "pretrained:cartpole-swingup", 0, width=0)
    np.testing.assert_allclose(belief.reset(seed=3)[0], full.reset(seed=3)[0][48:], atol=1e-6)  # keypoints left out
    full.close()
    belief.close()


def test_feature_usability_pca_whitens_the_observations_it_was_fitted_on(tmp_path: Path) -> None:
    from kp_rl.data import collect

    collect("cartpole-swingup", tmp_path / "cartpole-swingup", 2, seed=0, max_steps=20, progress=False)
    sys.path.insert(0, str(EXPERIMENTS))
    from feature_usability import pca
    from state_probe import observations

    from kp_rl.data import SequenceDataset
    from kp_rl.perception import Perception

    mean, basis = pca("cartpole-swingup", "pretrained:cartpole-swingup", 4, data=tmp_path)
    assert mean.shape == (184,) and basis.shape == (184, 4)
    episodes = list(SequenceDataset(tmp_path / "cartpole-swingup", 1, split="all", keys=("image", "action")).episodes)
    x = np.concatenate(observations(Perception("pretrained:cartpole-swingup"), episodes)["keypoints+belief"])
    np.testing.assert_allclose(np.cov((x - mean) @ basis, rowvar=False, bias=True), np.eye(4), atol=1e-3)


def test_feature_usability_augmentation_moves_keypoints_by_their_intensity_and_leaves_the_belief() -> None:
    import torch

    sys.path.insert(0, str(EXPERIMENTS))
    from feature_usability import AugmentedReplayBuffer

    buffer = AugmentedReplayBuffer.__new__(AugmentedReplayBuffer)  # _perturb only: no storage needed
    buffer.kind, buffer.size, buffer.keypoint_values = "shift", 0.125, 6
    mu = torch.tensor([1.0, 0.0])  # one keypoint fully on, one off
    x, y = torch.tensor([0.3, -0.2]), torch.tensor([0.1, 0.4])
    sample = torch.stack([mu * x, mu * y, mu], -1).flatten()  # gated (mu x, mu y, mu), then a 3-value belief
    batch = torch.cat([sample, torch.tensor([7.0, -7.0, 0.5])])[None].repeat(64, 1)
    moved = buffer._perturb(batch)
    assert torch.equal(moved[:, 6:], batch[:, 6:]) and torch.equal(moved[:, 2::3][:, :2], batch[:, 2::3][:, :2])
    assert torch.equal(moved[:, 3:5], batch[:, 3:5])  # the off keypoint stays at 0
    offsets = moved[:, :2] - batch[:, :2]
    assert offsets.abs().max() <= 0.125 + 1e-6 and offsets.std(0).min() > 0.03  # each sample its own shift
    buffer.kind, buffer.size = "noise", 0.5
    wide = torch.randn(4096, 2) * torch.tensor([1.0, 10.0])
    change = (buffer._perturb(wide) - wide).std(0)
    assert torch.allclose(change, torch.tensor([0.5, 5.0]), rtol=0.1)  # noise of A times each value's spread
