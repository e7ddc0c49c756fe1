"""Data-parallel training (DDP) on CPU with gloo: 2 processes match 1 process with the same global batch.

The autoencoder loss is deterministic given the batch, and with ``shuffle=False`` a 2-process run (rank r
takes windows r, r+2, ... in batches of 2) sees the same 4 windows per step as 1 process with batch 4, so
the two loss trajectories agree up to float reassociation (the gradient is averaged over the ranks).
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

import kp_rl
from kp_rl.data import collect
from kp_rl.distributed import context_from_env
from kp_rl.model import read_checkpoint
from kp_rl.train import fit, train_autoencoder

TINY = dict(keypoints={"image_size": 32, "num_keypoints": 4, "base_filters": 4, "layers_per_scale": 0},
            dynamics={"rnn_units": 16, "latent_dim": 4, "prior_hidden": 16, "posterior_hidden": 16,
                      "decoder_hidden": 16, "reward_hidden": 16, "observed_steps": 4, "predicted_steps": 4,
                      "num_samples": 3},
            train={"steps": 4, "dynamics_steps": 3, "batch_size": 4, "dynamics_batch_size": 8, "sequence_length": 4,
                   "log_every": 1, "eval_every": 4, "checkpoint_every": 2, "image_every": 4, "lr": 3e-3,
                   "cpu_amp": False})  # fp32: the comparisons below are to float reassociation, not bf16 rounding
RTOL = 1e-5  # observed: <= 1.2e-7 relative over 12 Adam steps (float reassociation only)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, data: str, out: str, config: dict) -> None:
    """One torchrun-like rank: the environment torchrun sets, then the ordinary training call."""
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    train_autoencoder(data, out, kp_rl.Config.from_dict(config), device="cpu", progress=False, shuffle=False)


def _train(data, out, config, world: int) -> None:
    if world == 1:
        train_autoencoder(data, out, config, device="cpu", progress=False, shuffle=False)
    else:
        mp.spawn(_rank, args=(world, _free_port(), str(data), str(out), config.to_dict()), nprocs=world)


def _losses(out) -> list[float]:
    return [row["loss"] for row in json.loads((out / "history.json").read_text())["train"]]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    collect("cartpole-swingup", root, 3, max_steps=15, progress=False, env_kwargs={"image_size": 32})
    return root


@pytest.fixture(scope="module")
def config():
    return kp_rl.get_preset("cpu").replace(**TINY)


def test_two_processes_match_one_and_resume_across_world_sizes(data, config, tmp_path):
    assert not context_from_env().enabled
    longer = config.replace(train={"steps": 8})
    # reference: 1 process, 4 steps, then resumed in 1 process to 8 steps
    one = tmp_path / "one"
    _train(data, one, config, 1)
    _train(data, one, longer, 1)  # a bigger budget extends the run
    reference = _losses(one)
    assert len(reference) == 8

    # 2 processes for steps 1-4 (same global batch), then resumed by 1 process for steps 5-8
    two_then_one = tmp_path / "two-one"
    _train(data, two_then_one, config, 2)
    state = read_checkpoint(two_then_one / "model.pt")["train_state"]
    assert state["step"] == 4 and [r["step"] for r in state["history"]["train"]] == [1, 2, 3, 4]
    assert [r["step"] for r in state["history"]["val"]] == [4]
    assert _losses(two_then_one) == pytest.approx(reference[:4], rel=RTOL)
    _train(data, two_then_one, longer, 1)
    assert read_checkpoint(two_then_one / "model.pt")["train_state"]["step"] == 8
    assert _losses(two_then_one) == pytest.approx(reference, rel=RTOL)

    # and the other way: the 1-process checkpoint at step 4 resumed by 2 processes
    one_then_two = tmp_path / "one-two"
    _train(data, one_then_two, config, 1)
    _train(data, one_then_two, longer, 2)
    state = read_checkpoint(one_then_two / "model.pt")["train_state"]
    assert state["step"] == 8 and [r["step"] for r in state["history"]["train"]] == list(range(1, 9))
    assert _losses(one_then_two) == pytest.approx(reference, rel=RTOL)


def test_batch_must_divide_among_processes(data, config, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="batch size 3 does not divide among 2 processes"):
        fit(kp_rl.PerceptionModel(config), [], None, None, None, tmp_path, steps=1, batch_size=3, stage="x")


def test_torchrun_cli(data, config, tmp_path):
    """The documented launch: torchrun (torch.distributed.run) around `kp-rl train keypoints | dynamics`."""
    (tmp_path / "tiny.yaml").write_text(json.dumps({**TINY, "preset": "cpu"}))  # JSON is YAML
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def torchrun(*args: str) -> None:
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                 "2", "-m", "kp_rl.cli", "train", *args, "--data", str(data), "--device", "cpu",
                                 "--quiet"], capture_output=True, text=True, env=env, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]

    torchrun("keypoints", "--out", str(tmp_path / "kp"), "--config", str(tmp_path / "tiny.yaml"))
    state = read_checkpoint(tmp_path / "kp" / "model.pt")["train_state"]
    assert state["step"] == 4 and len(state["history"]["train"]) == 4
    assert len(list((tmp_path / "kp" / "tb").glob("events.out.tfevents*"))) == 1  # rank 0 logs alone
    torchrun("dynamics", "--keypoints", str(tmp_path / "kp"), "--out", str(tmp_path / "dyn"))
    state = read_checkpoint(tmp_path / "dyn" / "model.pt")["train_state"]
    assert state["stage"] == "dynamics" and state["step"] == 3 and "kl" in state["history"]["train"][-1]
