import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from kp_rl.data import DatasetError, SequenceDataset, collect, episode_files, load_episode, read_manifest, shard_name
from kp_rl.envs import UnknownTaskError


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    collect("cartpole-swingup", root, episodes=5, max_steps=12, progress=False, env_kwargs={"image_size": 32})
    return root


def test_shards_hold_aligned_arrays_and_manifest(dataset):
    manifest = read_manifest(dataset)
    assert manifest["num_episodes"] == 5 and manifest["num_frames"] == 5 * 13
    assert manifest["task"]["image_size"] == 32 and manifest["versions"]["mujoco"].startswith("3.")
    episode = load_episode(dataset / shard_name(0))
    assert episode["image"].shape == (13, 32, 32, 3) and episode["image"].dtype == np.uint8
    assert episode["action"].shape == (13, 1) and np.all(episode["action"][0] == 0)
    assert episode["reward"].shape == (13,) and episode["reward"][0] == 0
    assert episode["true_object_pos"].shape == (13, 2, 2)
    assert episode["state"].shape == (13, 5)
    assert abs(manifest["episodes"][0]["return"] - episode["reward"].sum()) < 1e-4


def test_manifest_names_the_tracked_objects(dataset, tmp_path):
    assert read_manifest(dataset)["object_names"] == ["cart", "pole_1"]
    manifest = collect("reacher-easy", tmp_path / "reacher", episodes=1, max_steps=3, progress=False,
                       env_kwargs={"image_size": 32})
    assert manifest["object_names"] == ["arm", "hand", "finger", "target"]
    assert load_episode(tmp_path / "reacher" / shard_name(0))["true_object_pos"].shape == (4, 4, 2)
    # a dataset written before objects were named: bodies only; fine for cartpole, refused where objects are missing
    for name, root in (("cartpole-swingup", dataset), ("reacher-easy", tmp_path / "reacher")):
        old = json.loads((root / "manifest.json").read_text())
        del old["object_names"], old["task"]["objects"]
        (root / "manifest.json").write_text(json.dumps(old))
    collect("cartpole-swingup", dataset, episodes=5, max_steps=12, progress=False, env_kwargs={"image_size": 32})
    assert read_manifest(dataset)["object_names"] == ["cart", "pole_1"]
    with pytest.raises(DatasetError, match=r"older dataset whose true_object_pos lacks \['target'\]"):
        collect("reacher-easy", tmp_path / "reacher", episodes=1, max_steps=3, progress=False,
                env_kwargs={"image_size": 32})


def test_collection_is_reproducible_and_resumes_without_duplicates(dataset, tmp_path):
    collect("cartpole-swingup", tmp_path, episodes=2, max_steps=12, progress=False, env_kwargs={"image_size": 32})
    first = load_episode(tmp_path / shard_name(1))
    np.testing.assert_array_equal(first["image"], load_episode(dataset / shard_name(1))["image"])
    # simulate an interruption: the manifest lost its last entry and a temporary file was left behind
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["episodes"] = manifest["episodes"][:1]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / ".episode-000002.npz.abc.tmp").write_bytes(b"partial")
    mtime = os.path.getmtime(tmp_path / shard_name(0))
    result = collect("cartpole-swingup", tmp_path, episodes=3, max_steps=12, progress=False,
                     env_kwargs={"image_size": 32})
    assert [e["index"] for e in result["episodes"]] == [0, 1, 2]
    assert os.path.getmtime(tmp_path / shard_name(0)) == mtime  # finished work is not redone
    assert not list(tmp_path.glob(".*.tmp"))
    assert len(episode_files(tmp_path)) == 3


def test_parallel_workers_write_the_same_episodes(dataset, tmp_path):
    collect("cartpole-swingup", tmp_path, episodes=3, max_steps=12, workers=2, progress=False,
            env_kwargs={"image_size": 32})
    for i in range(3):
        np.testing.assert_array_equal(load_episode(tmp_path / shard_name(i))["image"],
                                      load_episode(dataset / shard_name(i))["image"])


def test_sequence_dataset_windows_and_split(dataset):
    train = SequenceDataset(dataset, sequence_length=8, split="train", val_fraction=0.2)
    val = SequenceDataset(dataset, sequence_length=8, split="val", val_fraction=0.2)
    assert len(train.files) == 4 and len(val.files) == 1 and not set(train.files) & set(val.files)
    assert len(train) == 4 * (13 - 8 + 1)
    batch = next(iter(DataLoader(train, batch_size=3, shuffle=True)))
    assert batch["image"].shape == (3, 8, 32, 32, 3) and batch["image"].dtype == torch.uint8
    assert batch["action"].shape == (3, 8, 1) and batch["reward"].shape == (3, 8)
    item = train[0]
    episode = load_episode(train.files[0])
    np.testing.assert_array_equal(item["image"].numpy(), episode["image"][:8])


def test_reads_reference_format_folder(tmp_path):
    for i in range(2):
        np.savez(tmp_path / f"{i}.npz", image=np.zeros((10, 16, 16, 3), np.uint8),
                 true_object_pos=np.zeros((10, 3, 2), np.float32))
    data = SequenceDataset(tmp_path, 4, split="all", keys=("image", "action", "reward", "true_object_pos"))
    item = data[0]
    assert item["action"].shape == (4, 0) and item["reward"].shape == (4,) and item["true_object_pos"].shape == (4, 3, 2)


def test_bad_input_is_reported_by_name(dataset, tmp_path):
    with pytest.raises(DatasetError, match="longer than every episode"):
        SequenceDataset(dataset, sequence_length=50)
    with pytest.raises(DatasetError, match="dataset directory not found"):
        SequenceDataset(tmp_path / "nope", 4)
    with pytest.raises(UnknownTaskError, match="unknown task"):
        collect("cartpole-flip", tmp_path / "x", 1, progress=False)
    assert not (tmp_path / "x").exists()
    # a corrupt shard and a foreign shard are named
    bad = tmp_path / "bad"
    collect("cartpole-swingup", bad, episodes=1, max_steps=3, progress=False, env_kwargs={"image_size": 16})
    (bad / "stranger.npz").write_bytes(b"x")
    with pytest.raises(DatasetError, match="foreign shard .*stranger.npz"):
        episode_files(bad)
    (bad / "stranger.npz").unlink()
    (bad / shard_name(0)).write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match=f"corrupt shard .*{shard_name(0)}"):
        SequenceDataset(bad, 2, split="all")
    # a directory holding another task is not overwritten
    with pytest.raises(DatasetError, match="holds a dataset with env_id"):
        collect("reacher-easy", dataset, 1, progress=False)


def test_unwritable_output(tmp_path):
    # /proc refuses new files even to root; a regular file cannot hold a directory
    with pytest.raises(DatasetError, match="/proc/kp_rl_test.* is not writable"):
        collect("cartpole-swingup", "/proc/kp_rl_test", 1, progress=False)
    (tmp_path / "file").write_text("keep me")
    with pytest.raises(DatasetError, match="not writable"):
        collect("cartpole-swingup", tmp_path / "file" / "d", 1, progress=False)
    with pytest.raises(DatasetError, match="exists and is not a directory"):
        collect("cartpole-swingup", tmp_path / "file", 1, progress=False)
    assert (tmp_path / "file").read_text() == "keep me"
    if os.geteuid() != 0:  # permission bits bind everyone but root
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(DatasetError, match="not writable"):
            collect("cartpole-swingup", locked / "d", 1, progress=False)


def test_cli_errors_are_one_line_with_nonzero_exit(tmp_path, cli):
    bad = [
        ["collect", "--env", "kp_rl/nope-v0", "--episodes", "1", "--out", str(tmp_path / "a")],
        ["collect", "--env", "cartpole-swingup", "--episodes", "1", "--out", str(tmp_path / "a"), "--image-size", "2"],
        ["collect", "--env", "cartpole-swingup", "--episodes", "1", "--out", "/proc/kp_rl_cannot_write"],
        ["inspect", str(tmp_path / "missing")],
    ]
    # each in this process, the first also as a user's own process (its real exit status)
    process = subprocess.run([sys.executable, "-m", "kp_rl.cli", *bad[0]], capture_output=True, text=True)
    results = [(process.returncode, process.stdout, process.stderr)] + [cli(*args) for args in bad]
    for args, (code, _, err) in zip([bad[0], *bad], results):
        assert code == 2, (args, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("kp-rl: error:"), err
    assert not (tmp_path / "a").exists()
    code, out, _ = cli("collect", "--env", "cartpole-swingup", "--episodes", "1", "--out", str(tmp_path / "ok"),
                       "--max-steps", "3", "--image-size", "16", "--quiet")
    assert code == 0 and "1 episodes, 4 frames" in out
