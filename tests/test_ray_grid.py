"""Experiment grids on a local Ray instance: same results as the local runner, retries, skipping finished cells."""

import json
import os
import subprocess
import sys

import pytest
import ray

from kp_rl.experiment import ExperimentSpec, run_cell
from kp_rl.ray_grid import CellFailedError, run_experiment_ray

SPEC = ("name: tiny\ntasks: [cartpole-swingup]\nagents: [ppo-state]\nseeds: [0, 1]\nsteps: 64\n"
        "eval_every: 32\neval_episodes: 1\nrandom_episodes: 2\nresources: {default: {cpus: 1}}\n")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_grid_retries_a_dead_worker_and_skips_finished_cells(tmp_path, local_ray):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(SPEC)
    marker = tmp_path / "crashed-once"

    def crash_once(spec, task, agent, seed, model, runs, progress=True, device="cpu"):
        if seed == 1 and not marker.exists():  # the worker process dies mid-cell, once
            marker.write_text("x")
            os._exit(1)
        return run_cell(spec, task, agent, seed, model, runs, progress=progress, device=device)

    dirs = dict(runs=tmp_path / "runs", results=tmp_path / "results", data=tmp_path / "data")
    summary = run_experiment_ray(spec, progress=False, max_retries=1, cell_fn=crash_once, **dirs)
    assert marker.exists()  # the crash happened, and the retry finished the cell
    row = summary["summary"]["cartpole-swingup"]["ppo-state"]
    assert len(row["final_returns"]) == 2 and row["ci"][0] <= row["iqm"] <= row["ci"][1]
    assert (tmp_path / "results" / "tiny" / "cells" / "cartpole-swingup" / "ppo-state" / "seed1.json").exists()
    written = json.loads((tmp_path / "results" / "tiny" / "results.json").read_text())
    assert set(written["curves"]) == {"cartpole-swingup/ppo-state/seed0", "cartpole-swingup/ppo-state/seed1"}
    assert (tmp_path / "results" / "tiny" / "curves_steps.png").exists()

    def never(*args, **kwargs):
        raise AssertionError("a finished cell was submitted again")

    again = run_experiment_ray(spec, progress=False, cell_fn=never, **dirs)
    assert again["summary"] == summary["summary"]
    committed = tmp_path / "results" / "tiny" / "cells" / "cartpole-swingup" / "ppo-state" / "seed1.json"
    committed.unlink()  # finished in its run folder, its result not committed (a runner stopped in between)
    assert run_experiment_ray(spec, progress=False, cell_fn=never, **dirs)["summary"] == summary["summary"]
    assert committed.exists()  # committed now, without training again, stamped with this machine
    assert "cpu_count" in json.loads(committed.read_text())["machine"]


def test_failed_cells_are_named_and_the_others_kept(tmp_path, local_ray):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(SPEC)

    def seed1_breaks(spec, task, agent, seed, model, runs, progress=True, device="cpu"):
        if seed == 1:
            raise ValueError("broken cell")
        return run_cell(spec, task, agent, seed, model, runs, progress=progress, device=device)

    with pytest.raises(CellFailedError, match=r"1 of 2 cells failed.*cartpole-swingup/ppo-state/seed1.*broken cell"):
        run_experiment_ray(spec, runs=tmp_path / "runs", results=tmp_path / "results", progress=False,
                           max_retries=0, cell_fn=seed1_breaks)
    assert (tmp_path / "runs" / "tiny" / "cartpole-swingup" / "ppo-state" / "seed0" / "curve.json").exists()
    assert not (tmp_path / "results" / "tiny" / "results.json").exists()


def test_resources_per_agent_and_bad_resources(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(SPEC.replace("resources: {default: {cpus: 1}}",
                                 "resources: {default: {cpus: 0.5}, sac-pixels: {gpus: 1}}"))
    loaded = ExperimentSpec.from_yaml(spec)
    assert loaded.resources_for("ppo-state") == {"cpus": 0.5, "gpus": 0}
    assert loaded.resources_for("sac-pixels") == {"cpus": 0.5, "gpus": 1.0}
    assert loaded.resources_for("perception") == {"cpus": 2, "gpus": 0}
    spec.write_text(SPEC.replace("{default: {cpus: 1}}", "{default: {cpus: -1}}"))
    with pytest.raises(ValueError, match="resources.default"):
        ExperimentSpec.from_yaml(spec)


@pytest.mark.slow  # the Ray runner's tests above cover the grid; this one adds a fresh instance and perception
def test_cli_ray_flag_with_a_keypoint_agent(tmp_path):
    """`kp-rl run SPEC --ray` on a fresh local instance (its own process): the perception task runs first and
    the keypoint agent's cell gets the trained model from it."""
    spec = tmp_path / "tiny.yaml"
    spec.write_text(SPEC.replace("seeds: [0, 1]", "seeds: [0]").replace("agents: [ppo-state]",
                                                                           "agents: [ppo-state, ppo-keypoints-belief]")
                    + "perception: {episodes: 2, autoencoder_steps: 2, dynamics_steps: 2}\n")
    cmd = [sys.executable, "-m", "kp_rl.cli", "run", str(spec), "--ray", "--ray-cpus", "2", "--quiet",
           "--runs", str(tmp_path / "runs"), "--data", str(tmp_path / "data"), "--results", str(tmp_path / "results")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ppo-state" in result.stdout and "ppo-keypoints-belief" in result.stdout
    assert (tmp_path / "runs" / "tiny" / "models" / "cartpole-swingup" / "keypoints-dyn" / "model.pt").exists()
    summary = json.loads((tmp_path / "results" / "tiny" / "results.json").read_text())
    rows = summary["summary"]["cartpole-swingup"]
    assert set(rows) == {"ppo-state", "ppo-keypoints-belief", "random"}
    # the keypoint agent's budget counts its perception's random-policy episodes; the state agent needs none
    assert set(summary["perception_minutes"]["cartpole-swingup"]) == {"keypoints", "keypoints-dyn"}
    assert rows["ppo-keypoints-belief"]["pretrained_perception_env_steps"] == 2 * 1000
    assert rows["ppo-keypoints-belief"]["env_steps"] == 64 * 8 + 2000 and rows["ppo-state"]["env_steps"] == 64 * 8


def test_cli_ray_errors_are_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "kp_rl.cli", "run", str(tmp_path / "missing.yaml"), "--ray"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("kp-rl: error:") and "missing.yaml" in result.stderr


def test_cli_device_is_for_local_runs(tmp_path):
    result = subprocess.run([sys.executable, "-m", "kp_rl.cli", "run", str(tmp_path / "spec.yaml"), "--ray",
                             "--device", "cuda"], capture_output=True, text=True)
    assert result.returncode == 2 and "--device is for local runs" in result.stderr
