import os
import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import kp_rl
from kp_rl.data import collect
from kp_rl.model import CheckpointError, load, read_checkpoint, resolve_device
from kp_rl.train import train_autoencoder, train_dynamics, training_seconds



@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    collect("cartpole-swingup", root, 4, max_steps=15, progress=False, env_kwargs={"image_size": 32})
    return root


@pytest.fixture(scope="module")
def config():
    return kp_rl.get_preset("tiny")


@pytest.fixture(scope="module")
def keypoint_run(data, config, tmp_path_factory):
    out = tmp_path_factory.mktemp("kp")
    train_autoencoder(data, out, config, progress=False)
    return out


def test_autoencoder_training_logs_checkpoints_and_learns(keypoint_run):
    history = json.loads((keypoint_run / "history.json").read_text())
    train = history["train"]
    assert {"loss", "reconstruction", "sparsity", "separation", "grad_norm"} <= set(train[0])
    assert train[-1]["reconstruction"] < train[0]["reconstruction"]
    assert [row["step"] for row in history["val"]] == [10, 20, 30]
    assert list((keypoint_run / "tb").glob("events.out.tfevents*"))
    model = load(keypoint_run)
    assert model.representation == "keypoints" and not model.training
    assert model.data_spec["env_id"] == "kp_rl/cartpole-swingup-v0" and model.data_spec["action_dim"] == 1
    frames = torch.zeros(5, 32, 32, 3, dtype=torch.uint8)
    assert model.encode(frames).shape == (5, 12)


def test_cpu_bf16_autocast_trains_like_fp32(data, config, keypoint_run, tmp_path):
    """train.cpu_amp: the same run in bf16 autocast learns as the fp32 one does (losses within a few percent)."""
    train_autoencoder(data, tmp_path / "bf16", config.replace(train={"cpu_amp": True}), progress=False)
    train_autoencoder(data, tmp_path / "fp32", config.replace(train={"cpu_amp": False}), progress=False)
    fp32, bf16 = (json.loads((tmp_path / run / "history.json").read_text()) for run in ("fp32", "bf16"))
    assert bf16["train"][-1]["reconstruction"] < bf16["train"][0]["reconstruction"]
    for a, b in zip(fp32["val"], bf16["val"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=0.05)
    assert bf16["train"][0]["loss"] != fp32["train"][0]["loss"]  # bf16 did run
    frames = torch.zeros(2, 32, 32, 3, dtype=torch.uint8)
    assert load(tmp_path / "bf16").encode(frames).dtype == torch.float32  # a plain fp32 model for inference


def test_resume_continues_from_checkpoint(data, config, tmp_path):
    short = config.replace(train={"steps": 10})
    start = time.perf_counter()
    train_autoencoder(data, tmp_path, short, progress=False)
    assert read_checkpoint(tmp_path / "model.pt")["train_state"]["step"] == 10
    # a finished run extends to a bigger budget (its other settings hold)
    train_autoencoder(data, tmp_path, config.replace(train={"steps": 20}), progress=False)
    wall = time.perf_counter() - start
    state = read_checkpoint(tmp_path / "model.pt")["train_state"]
    assert state["step"] == 20
    assert [row["step"] for row in state["history"]["train"]] == [5, 10, 15, 20]
    # the logged rates add up to the training loops' time across both sessions (less than the calls' wall-clock)
    assert 0 < training_seconds(state["history"]) < wall
    assert training_seconds({"train": []}) == 0.0


def test_dynamics_training_and_cnn_baseline(data, config, keypoint_run, tmp_path):
    path = train_dynamics(keypoint_run, data, tmp_path / "dyn", progress=False)
    model = load(path, require_dynamics=True)
    history = json.loads((tmp_path / "dyn" / "history.json").read_text())
    assert {"kl", "coord_observed", "coord_predicted", "reward_predicted"} <= set(history["train"][0])
    # the autoencoder inside is the frozen one it was built on
    source = load(keypoint_run)
    for (name, a), b in zip(model.autoencoder.state_dict().items(), source.autoencoder.state_dict().values()):
        assert torch.equal(a, b), name
    cnn_path = train_autoencoder(data, tmp_path / "cnn", config, representation="cnn", progress=False)
    cnn_dyn = train_dynamics(cnn_path, data, tmp_path / "cnn-dyn", {"dynamics": {"stochastic": False}},
                             progress=False)
    cnn = load(cnn_dyn, representation="cnn", require_dynamics=True)
    assert cnn.feature_dim == 12 and not cnn.config.dynamics.stochastic


def test_dynamics_resume_takes_the_optimiser_state_of_a_cuda_graph_run(data, config, keypoint_run, tmp_path):
    """A VRNN run on a GPU saves a capturable Adam (CUDA graphs); resuming it on the CPU must still work."""
    out = tmp_path / "dyn"
    train_dynamics(keypoint_run, data, out, {"train": {"dynamics_steps": 10}}, progress=False)
    ckpt = read_checkpoint(out / "model.pt")
    optimiser = ckpt["train_state"]["optimizer"]
    assert optimiser["state"] and all(not group["capturable"] for group in optimiser["param_groups"])
    for group in optimiser["param_groups"]:
        group["capturable"] = True  # as the GPU run stores it
    ckpt["config"]["train"]["dynamics_steps"] = 20
    torch.save(ckpt, out / "model.pt")
    train_dynamics(keypoint_run, data, out, progress=False)
    state = read_checkpoint(out / "model.pt")["train_state"]
    assert state["step"] == 20
    assert all(not group["capturable"] for group in state["optimizer"]["param_groups"])


def test_load_errors_name_the_problem(keypoint_run, tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="without dynamics"):
        load(keypoint_run, require_dynamics=True)
    with pytest.raises(CheckpointError, match="'keypoints' model; a 'cnn' model is needed"):
        load(keypoint_run, representation="cnn")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load(tmp_path / "junk.pt")
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a kp_rl model checkpoint"):
        load(tmp_path / "foreign.pt")
    ckpt = read_checkpoint(keypoint_run)
    ckpt["version"] = 99
    torch.save(ckpt, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="version 99 is not supported"):
        load(tmp_path / "future.pt")
    with pytest.raises(ValueError, match="CUDA is not available|does not exist"):
        resolve_device("cuda:7")
    with pytest.raises(ValueError, match="unknown device|unsupported device"):
        resolve_device("tpu")


def test_pretrained_names_resolve_to_shipped_bundles(keypoint_run, tmp_path, monkeypatch):
    import kp_rl.model as model_module

    monkeypatch.setattr(model_module, "PRETRAINED_DIR", tmp_path)
    (tmp_path / "cartpole-swingup.pt").write_bytes((keypoint_run / "model.pt").read_bytes())
    assert model_module.pretrained_models() == ["pretrained:cartpole-swingup"]
    assert load("pretrained:cartpole-swingup").feature_dim == load(keypoint_run).feature_dim
    with pytest.raises(CheckpointError, match="no pretrained model 'pretrained:walker'; shipped: pretrained:cartpole"):
        load("pretrained:walker")


def test_image_size_mismatch_is_reported(data, config, tmp_path):
    with pytest.raises(ValueError, match="32x32 frames but keypoints.image_size is 64"):
        train_autoencoder(data, tmp_path, config.replace(keypoints={"image_size": 64}), progress=False)


def test_cli_train_errors(data, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "kp_rl.cli", "train", *args], capture_output=True, text=True)

    result = run("keypoints", "--data", str(tmp_path / "nodata"), "--out", str(tmp_path / "r"))
    assert result.returncode == 2 and "dataset directory not found" in result.stderr
    result = run("dynamics", "--data", str(data), "--out", str(tmp_path / "r"))
    assert result.returncode == 2 and "needs --keypoints" in result.stderr
    result = run("dynamics", "--data", str(data), "--out", str(tmp_path / "r"), "--keypoints", str(tmp_path / "x"))
    assert result.returncode == 2 and "checkpoint not found" in result.stderr


def test_threads_option_sets_torch_threads_in_every_stage(tmp_path, capsys):
    from kp_rl import cli
    from kp_rl.train import STAGE_THREADS

    before, stages = torch.get_num_threads(), dict(STAGE_THREADS)
    try:
        assert cli.main(["eval", "--threads", "3", "--model", str(tmp_path / "missing"), "--data", str(tmp_path)]) == 2
        assert torch.get_num_threads() == 3 and set(STAGE_THREADS.values()) == {3}
    finally:
        torch.set_num_threads(before)
        STAGE_THREADS.update(stages)
    assert "missing" in capsys.readouterr().err


def test_each_stage_trains_with_its_thread_default_unless_told(data, config, keypoint_run, tmp_path, monkeypatch):
    from kp_rl.dynamics import KeypointVRNN
    from kp_rl.keypoints import KeypointAutoencoder
    from kp_rl.train import STAGE_THREADS

    seen: dict[str, list[int]] = {"autoencoder": [], "dynamics": []}
    for stage, cls in (("autoencoder", KeypointAutoencoder), ("dynamics", KeypointVRNN)):
        loss = cls.loss
        monkeypatch.setattr(cls, "loss", lambda self, *a, _loss=loss, _s=stage, **k:
                            seen[_s].append(torch.get_num_threads()) or _loss(self, *a, **k))
    before = torch.get_num_threads()
    quick = config.replace(train={"steps": 2, "dynamics_steps": 2})
    train_autoencoder(data, tmp_path / "ae", quick, progress=False)
    train_dynamics(keypoint_run, data, tmp_path / "dyn", {"train": {"dynamics_steps": 2}}, progress=False)
    cores = len(os.sched_getaffinity(0))
    assert set(seen["autoencoder"]) == {STAGE_THREADS["autoencoder"] or cores}
    assert set(seen["dynamics"]) == {STAGE_THREADS["dynamics"]} == {1}
    assert torch.get_num_threads() == before  # restored
    seen["dynamics"].clear()
    train_dynamics(keypoint_run, data, tmp_path / "dyn2", {"train": {"dynamics_steps": 2}}, progress=False, threads=2)
    assert set(seen["dynamics"]) == {2}


def _snapshot(root):
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_run_folders_know_what_they_hold(data, config, keypoint_run, tmp_path):
    from kp_rl.runs import RunMismatchError, checkpoint_hash, read_run

    assert read_run(keypoint_run) == {"kp_rl": kp_rl.__version__, "command": "train", "stage": "autoencoder",
                                      "representation": "keypoints", "env_id": "kp_rl/cartpole-swingup-v0",
                                      "preset": "tiny"}
    dyn = tmp_path / "dyn"
    train_dynamics(keypoint_run, data, dyn, {"train": {"dynamics_steps": 10}}, progress=False)
    recorded = read_run(dyn)
    assert recorded["stage"] == "dynamics" and recorded["model_sha256"] == checkpoint_hash(keypoint_run)
    before = _snapshot(keypoint_run), _snapshot(dyn)
    with pytest.raises(RunMismatchError, match="holds representation='keypoints', not representation='cnn'"):
        train_autoencoder(data, keypoint_run, config, representation="cnn", progress=False)
    with pytest.raises(RunMismatchError, match="holds stage='autoencoder', not stage='dynamics'"):
        train_dynamics(keypoint_run, data, keypoint_run, progress=False)
    (tmp_path / "corrupt.pt").write_bytes(b"junk")  # a named autoencoder is read, even on a resume
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        train_dynamics(tmp_path / "corrupt.pt", data, dyn, progress=False)
    other = train_autoencoder(data, tmp_path / "other", config.replace(train={"steps": 10}), progress=False)
    with pytest.raises(RunMismatchError, match="holds model_sha256="):
        train_dynamics(other, data, dyn, progress=False)
    with pytest.raises(ValueError, match=r"trained with train.dynamics_batch_size=8, not train.dynamics_batch_size=2"):
        train_dynamics(keypoint_run, data, dyn, {"train": {"dynamics_batch_size": 2, "dynamics_steps": 20}},
                       progress=False)
    with pytest.raises(ValueError, match="has trained 10 dynamics steps, more than the 5 asked for"):
        train_dynamics(None, data, dyn, {"train": {"dynamics_steps": 5}}, progress=False)
    with pytest.raises(ValueError, match="has trained 30 autoencoder steps, more than the 10 asked for"):
        train_autoencoder(data, keypoint_run, config.replace(train={"steps": 10}), progress=False)
    assert (_snapshot(keypoint_run), _snapshot(dyn)) == before  # refused: nothing written
    train_dynamics(None, data, dyn, {"train": {"dynamics_steps": 15}}, progress=False)  # a bigger budget extends
    assert read_checkpoint(dyn / "model.pt")["train_state"]["step"] == 15
    assert read_checkpoint(dyn / "model.pt")["config"]["train"]["dynamics_steps"] == 15


def test_reward_statistics_are_stored_and_early_stopping_ends_a_converged_run(data, config, keypoint_run, tmp_path):
    from kp_rl.data import FeatureSequences, SequenceDataset, encode_episodes

    out = tmp_path / "dyn"
    # patience 1 with a 1000% improvement asked for: the second validation stops the run, far before the budget
    cfg = {"train": {"dynamics_steps": 500, "patience": 1, "min_improvement": 10.0, "eval_every": 5}}
    train_dynamics(keypoint_run, data, out, cfg, progress=False)
    history = json.loads((out / "history.json").read_text())
    assert history["stopped"]["step"] == 10 and history["best"]["step"] == 5
    state = read_checkpoint(out / "model.pt")["train_state"]
    assert state["step"] == 10 and history["restored_best"] == history["best_weights_step"] in (5, 10)
    stored = read_checkpoint(out / "model.pt")["state_dict"]  # the finished run holds its best validation's weights
    assert all(torch.equal(stored[k], v) for k, v in state["best_weights"].items())
    before = (out / "model.pt").read_bytes()
    train_dynamics(keypoint_run, data, out, cfg, progress=False)  # converged: nothing more to do
    assert (out / "model.pt").read_bytes() == before
    # a stricter rule reopens the converged run: its plateau now lowers the lr once, and the next plateau stops it
    strict = {"train": {**cfg["train"], "lr_reductions": 1, "lr_factor": 0.5}}
    train_dynamics(keypoint_run, data, out, strict, progress=False)
    history = json.loads((out / "history.json").read_text())
    state = read_checkpoint(out / "model.pt")["train_state"]
    lr = load(out).config.train.lr
    assert history["lr_reductions"] == [{"step": 10, "lr": pytest.approx(lr * 0.5)}]
    assert history["stopped"]["step"] == 15 and history["stopped"]["rule"]["lr_reductions"] == 1
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(lr * 0.5)
    before = (out / "model.pt").read_bytes()
    train_dynamics(keypoint_run, data, out, strict, progress=False)  # converged under this rule: nothing to do
    assert (out / "model.pt").read_bytes() == before
    from kp_rl.config import ConfigError
    with pytest.raises(ConfigError, match=r"train.lr_factor must be in \(0, 1\), got 1.5"):
        kp_rl.get_preset("cpu").replace(train={"lr_factor": 1.5}).validate()
    fresh = tmp_path / "fresh"  # the same rule from the start gives the same schedule
    train_dynamics(keypoint_run, data, fresh, strict, progress=False)
    history = json.loads((fresh / "history.json").read_text())
    assert [r["step"] for r in history["lr_reductions"]] == [10] and history["stopped"]["step"] == 15
    model = load(out)
    frames = SequenceDataset(data, 1, split="train", keys=("image", "action", "reward"))
    episodes = [{**e, "features": f} for e, f in zip(frames.episodes, encode_episodes(model, frames.episodes))]
    mean, scale = FeatureSequences(episodes, 8).reward_statistics()
    rewards = np.concatenate([e["reward"][1:] for e in frames.episodes])
    assert mean == pytest.approx(rewards.mean(), rel=1e-6) and scale == pytest.approx(rewards.std(), rel=1e-6)
    assert float(model.dynamics.reward_mean) == pytest.approx(mean) and float(model.dynamics.reward_scale) == \
        pytest.approx(scale)
