import json
import subprocess
import sys


def test_quick_demo_runs_end_to_end(tmp_path):
    """`kp-rl demo --quick`: every stage of the main job on tiny sizes, results page written."""
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "kp_rl.cli", "demo", "--quick", "--out", str(out), "--data", str(tmp_path / "data"),
           "--runs", str(tmp_path / "runs")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert {"Struct-VRNN", "CNN-VRNN", "mean training reward"} == set(summary["reward_prediction"])
    for name in ("README.md", "frames.png", "reward_prediction.png", "video_prediction.gif", "sac_curve.png"):
        assert (out / name).exists(), name
    assert "reward prediction" in result.stdout
