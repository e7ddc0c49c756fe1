"""experiments/reward_prediction.py --spec quick: every cell, the summary block, resuming from committed cells."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["struct", "cnn", "state", "struct_no_kp_losses", "struct_deterministic", "struct_no_best_of_many",
           "struct_stop_prior_grad"]


def run(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "experiments" / "reward_prediction.py"), "--spec", "quick",
               "--data", str(tmp_path / "data"), "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"),
               *extra]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_quick_spec_runs_every_cell_resumes_and_a_fresh_machine_reuses_the_committed_autoencoder(tmp_path):
    first = run(tmp_path)
    assert "0 of" in first.stdout and "cells already done" in first.stdout
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {"commit", "cpu_count", "date"} <= set(results["machine"]) and results["data_seeds"] == {"train": 0, "test": 1}
    assert results["missing"] == []
    summary = results["summary"]["cartpole-swingup"]
    assert sorted(summary) == sorted(METHODS + ["mean_reward"])
    for method in ("struct", "cnn", "state"):
        entry = summary[method]
        assert entry["seeds"] == [0, 1] and len(entry["r2_ci"]) == 2 and entry["mse_mean"] >= 0
        assert len(entry["r2_per_step"]) == 4 and "r2_probe_mean" in entry  # tiny preset: 4 predicted steps
    assert "r2_sample_mean_mean" in summary["struct"] and "r2_sample_mean_mean" not in summary["struct_deterministic"]
    diff = results["summary"]["struct_minus_cnn"]["cartpole-swingup"]
    assert diff["seeds"] == 2 and diff["r2_diff_ci"][0] <= diff["r2_diff"] <= diff["r2_diff_ci"][1]
    cell = json.loads((tmp_path / "out" / "cells" / "cartpole-swingup" / "struct_seed1.json").read_text())
    assert cell["autoencoder_seed"] == 0 and cell["test_windows"] > 0 and cell["scores"]["best_of_samples"]["oracle_selected"]
    assert len(cell["video"]["psnr_first_sample"]) == 4 and "psnr_mean" in summary["struct"]  # predicted steps
    assert "Struct - CNN" in (tmp_path / "out" / "README.md").read_text()
    models = tmp_path / "out" / "models" / "cartpole-swingup"  # committed weights: a few hundred KB in all
    assert sorted(p.name for p in models.iterdir()) == ["ae_cnn_seed0.pt", "ae_keypoints_seed0.pt",
                                                        "ae_no_kp_losses_seed0.pt", "struct_seed0.pt"]
    again = run(tmp_path)  # every cell file is there: nothing is trained again
    assert "; 0 to run" in again.stdout
    readout = results["state_readout"]["cartpole-swingup"]
    assert len(readout["by_episodes"]) == 3 and readout["test_r2"] == list(readout["by_episodes"].values())[-1]["test_r2"]
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "ceiling of any reward head" in readme and "val loss, last quarter" in readme  # autoencoder curves

    # Struct-VRNN seed 0 ships as a pretrained bundle (weights without optimiser state) with its model card
    sys.path.insert(0, str(ROOT / "experiments"))
    import kp_rl
    import reward_prediction

    spec = {**reward_prediction.SPECS["quick"], "name": "quick"}
    roots = (tmp_path / "data" / "cartpole-swingup-quick", tmp_path / "data" / "cartpole-swingup-quick-test")
    bundle = reward_prediction.export_pretrained("cartpole-swingup", tmp_path / "out", spec, roots,
                                                 tmp_path / "pretrained")
    model = kp_rl.load(bundle)
    assert model.has_dynamics and model.representation == "keypoints"
    assert bundle.stat().st_size < (tmp_path / "runs" / "quick" / "cartpole-swingup" / "struct" / "seed0" / "model.pt").stat().st_size
    card = bundle.with_suffix(".md").read_text()
    seed0 = json.loads((tmp_path / "out" / "cells" / "cartpole-swingup" / "struct_seed0.json").read_text())
    assert "pretrained:cartpole-swingup" in card and f"R² {seed0['scores']['prior_mean']['r2_mean']:.3f}" in card

    # a fresh machine re-encodes with the committed autoencoder instead of retraining it
    shutil.rmtree(tmp_path / "runs")  # only the committed files are left
    for cell in (tmp_path / "out" / "cells" / "cartpole-swingup").glob("struct_seed*.json"):
        cell.unlink()
    again = run(tmp_path)
    assert "2 to run" in again.stdout
    ae_run = tmp_path / "runs" / "quick" / "cartpole-swingup" / "ae_keypoints_seed0"
    assert (ae_run / "features.npz").exists() and not (ae_run / "history.json").exists()  # not retrained


def test_only_the_autoencoders_the_chosen_methods_need_are_trained(tmp_path):
    run(tmp_path, "--methods", "state", "cnn")
    cells = sorted(p.stem for p in (tmp_path / "out" / "cells" / "cartpole-swingup").glob("*_seed*.json"))
    assert cells == ["ae_cnn_seed0", "cnn_seed0", "cnn_seed1", "state_seed0", "state_seed1"]


def test_a_spec_s_keypoint_settings_reach_its_keypoint_autoencoders_under_the_methods_own():
    sys.path.insert(0, str(ROOT / "experiments"))
    import reward_prediction

    spec = {**reward_prediction.SPECS["cpu_tasks_other"], "name": "cpu_tasks_other"}
    assert reward_prediction.autoencoder_config(spec, "keypoints", 0).keypoints.reference == "other"
    ablation = reward_prediction.autoencoder_config(spec, "no_kp_losses", 1).keypoints
    assert ablation.reference == "other" and ablation.sparsity_weight == 0.0 == ablation.separation_weight
    plain = {**reward_prediction.SPECS["cpu_tasks"], "name": "cpu_tasks"}
    assert reward_prediction.autoencoder_config(plain, "keypoints", 0).keypoints.reference == "own"


def test_the_committed_weights_are_not_git_ignored():
    """results/**/*.pt is ignored (large artefacts) but for these: a fresh machine needs them."""
    for path in ("results/reward_prediction/models/cartpole-swingup/ae_keypoints_seed0.pt",
                 "results/reward_prediction/cpu_plateau/models/walker-walk/ae_cnn_seed1.pt",
                 "results/reward_prediction/cpu_plateau/partial/walker-walk/ae_cnn_seed1/model.pt"):  # --stash
        ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT)
        assert ignored.returncode == 1, path  # 1: not ignored
    assert subprocess.run(["git", "check-ignore", "-q", "results/gpu_cell/model.pt"], cwd=ROOT).returncode == 0


def test_compare_specs_pairs_the_same_cells_of_two_specs(tmp_path):
    sys.path.insert(0, str(ROOT / "experiments"))
    import reward_prediction

    def cell(spec: str, name: str, **row):
        path = tmp_path / spec / "cells" / "cartpole-swingup" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"steps": 100, **row}))

    for spec, shift in (("short", 0.0), ("long", 0.1)):
        cell(spec, "ae_keypoints_seed0", tracking_rmse_px=6.0 - 10 * shift)
        for seed, r2 in enumerate((0.5, 0.7)):
            cell(spec, f"struct_seed{seed}", method="struct", scores={"prior_mean": {"r2_mean": r2 + shift}})
    cell("long", "struct_seed2", method="struct", scores={"prior_mean": {"r2_mean": 0.9}})  # no partner: left out
    compared = reward_prediction.compare_specs(tmp_path / "short", tmp_path / "long", ["cartpole-swingup"])
    task = compared["cartpole-swingup"]
    assert sorted(task["cells"]) == ["ae_keypoints_seed0", "struct_seed0", "struct_seed1"]
    assert task["cells"]["ae_keypoints_seed0"] == {"base": 6.0, "this": 5.0, "steps": [100, 100]}
    struct = task["methods"]["struct"]
    assert struct["seeds"] == 2 and abs(struct["r2_diff"] - 0.1) < 1e-9
    assert struct["r2_diff_ci"][0] <= struct["r2_diff"] <= struct["r2_diff_ci"][1]


def test_a_warm_started_spec_continues_the_other_spec_s_autoencoders_and_a_stash_resumes_elsewhere(tmp_path):
    def warm(*extra: str) -> subprocess.CompletedProcess:
        return run(tmp_path, "--spec", "quick_warm", "--out", str(tmp_path / "out" / "quick_warm"), "--methods", "cnn",
                   *extra)

    run(tmp_path, "--methods", "cnn", "--out", str(tmp_path / "out" / "quick"))  # specs' folders side by side
    warm()
    cells = tmp_path / "out" / "quick_warm" / "cells" / "cartpole-swingup"
    source = json.loads((tmp_path / "out" / "quick" / "cells" / "cartpole-swingup" / "ae_cnn_seed0.json").read_text())
    cell = json.loads((cells / "ae_cnn_seed0.json").read_text())
    assert cell["warm_start_steps"] == source["steps"] == 6 and cell["steps"] == 6 + 4
    assert cell["val_loss"][:len(source["val_loss"])] == source["val_loss"]  # one curve, the source's first
    assert [step for step, _ in cell["val_loss"][len(source["val_loss"]):]] == [6 + 3, 6 + 4]
    for same in ("state_readout.json", "mean_reward.json"):  # they do not depend on the autoencoders: copied
        assert (cells / same).read_bytes() == (tmp_path / "out" / "quick" / "cells" / "cartpole-swingup" / same).read_bytes()

    # an unfinished autoencoder cell (its cell file not written yet) is stashed, and resumed on a fresh machine
    (cells / "ae_cnn_seed0.json").unlink()
    stashed = warm("--stash")
    partial = tmp_path / "out" / "quick_warm" / "partial" / "cartpole-swingup" / "ae_cnn_seed0"
    assert f"stashed {partial}" in stashed.stdout and (partial / "model.pt").exists()
    shutil.rmtree(tmp_path / "runs")
    warm()
    again = json.loads((cells / "ae_cnn_seed0.json").read_text())
    assert again["steps"] == 10 and again["val_loss"] == cell["val_loss"]  # resumed at its end, not retrained
    assert not partial.exists()  # a finished cell's stash goes
    assert "nothing to stash" in warm("--stash").stdout

    # the continued run starts from the source's committed weights, under this spec's config
    sys.path.insert(0, str(ROOT / "experiments"))
    import torch

    import reward_prediction
    from kp_rl.model import read_checkpoint

    spec = {**reward_prediction.SPECS["quick_warm"], "name": "quick_warm", "out": str(tmp_path / "out" / "quick_warm")}
    config = reward_prediction.autoencoder_config(spec, "cnn", 0)
    fresh = tmp_path / "fresh" / "ae_cnn_seed0"
    assert reward_prediction.warm_start(spec, "cartpole-swingup", fresh, config)[0] == 6
    started = read_checkpoint(fresh / "model.pt")
    committed = read_checkpoint(tmp_path / "out" / "quick" / "models" / "cartpole-swingup" / "ae_cnn_seed0.pt")
    assert started["config"]["train"]["steps"] == 4 and started["train_state"] is None
    assert all(torch.equal(started["state_dict"][k], v) for k, v in committed["state_dict"].items())
