import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["struct", "cnn", "struct_no_kp_losses", "struct_deterministic", "struct_no_best_of_many", "state",
           "mean_reward"]


def test_quick_run_writes_every_method_per_step(tmp_path):
    horizon = 3
    command = [sys.executable, str(ROOT / "experiments" / "reward_prediction.py"), "--quick",
               "--tasks", "cartpole-swingup", "--seeds", "0", "--horizon", str(horizon),
               "--data", str(tmp_path / "data"), "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "struct_no_best_of_many" in result.stdout and "seed 0" in result.stdout
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["config"]["horizon"] == horizon and results["config"]["seeds"] == [0]
    assert {"cpu_count", "torch"} <= set(results["machine"]) and results["seconds"] > 0
    task = results["tasks"]["cartpole-swingup"]
    assert sorted(task["methods"]) == sorted(METHODS)
    for method in METHODS:
        seed0 = task["methods"][method]["per_seed"]["0"]
        assert len(seed0["mse"]) == horizon and len(seed0["r2"]) == horizon, method
        summary = task["methods"][method]["summary"]
        for key in ("mse_per_step_mean", "mse_per_step_min", "mse_per_step_max", "r2_per_step_mean"):
            assert len(summary[key]) == horizon, (method, key)
        assert summary["mse_mean"] is not None and summary["mse_mean"] >= 0
    assert "best_of_samples" in task["methods"]["struct"]["per_seed"]["0"]
    assert "best_of_samples" not in task["methods"]["struct_deterministic"]["per_seed"]["0"]
    assert set(task["tracking"]) == {"keypoints", "cnn", "no_kp_losses", "mean_coords"}
    assert len(task["video"]["struct"]["ssim_first_sample"]) == 4 + horizon  # observed (quick: 4) + predicted
    for name in ("reward_per_step.png", "summary.png", "video_cartpole-swingup.png", "video_cartpole-swingup.gif"):
        assert (tmp_path / "out" / name).stat().st_size > 0, name
