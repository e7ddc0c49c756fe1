"""Streaming sequence data: the same windows as the in-memory dataset, a few episodes in memory at a time."""

import json
import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import kp_rl
import kp_rl.data as data_module
from kp_rl.data import DatasetError, EpisodeBlockSampler, SequenceDataset, StreamingSequenceDataset, collect, count_frames, sequence_dataset
from kp_rl.train import train_autoencoder

KEYS = ("image", "action", "reward", "true_object_pos")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    collect("cartpole-swingup", root, 5, max_steps=9, progress=False, env_kwargs={"image_size": 32})
    return root


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("split,stride", [("train", 1), ("val", 1), ("all", 3)])
def test_same_windows_as_in_memory(data, split, stride):
    memory = SequenceDataset(data, 4, split=split, val_fraction=0.4, stride=stride, keys=KEYS)
    stream = StreamingSequenceDataset(data, 4, split=split, val_fraction=0.4, stride=stride, keys=KEYS, cache_size=1)
    assert stream.files == memory.files  # the split is the in-memory one
    assert (len(stream), stream.num_frames, stream.image_shape, stream.action_dim) == \
           (len(memory), memory.num_frames, memory.image_shape, memory.action_dim)
    assert [stream.window(i) for i in range(len(stream))] == [memory.window(i) for i in range(len(memory))]
    assert memory.cached_episodes == tuple(range(len(memory.files))) and stream.cached_episodes == ()  # all / none loaded
    assert all(_same(stream[i], memory[i]) for i in range(len(memory)))
    assert _same(stream[-1], memory[-1])
    with pytest.raises(IndexError):
        stream[len(stream)]


def test_cache_holds_at_most_cache_size_episodes(data, monkeypatch):
    loads = []
    load = data_module.load_episode
    monkeypatch.setattr(data_module, "load_episode", lambda path, keys=None: loads.append(path.name) or load(path, keys))
    stream = StreamingSequenceDataset(data, 4, split="all", cache_size=2)
    for i in np.random.default_rng(0).permutation(len(stream)):
        episode, _ = stream.window(int(i))
        stream[int(i)]
        assert len(stream.cached_episodes) <= 2 and stream.cached_episodes[-1] == episode
    # the block sampler touches each episode once per epoch when a block fits in the cache
    sampler = EpisodeBlockSampler(stream, seed=1)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        loads.clear()
        order = list(sampler)
        assert sorted(order) == list(range(len(stream)))
        for i in order:
            stream[i]
        assert len(set(loads)) == len(loads) >= len(stream.files) - 2  # once each (2 may still be cached)
    sampler.set_epoch(0)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first  # a new order each epoch
    # ranks take disjoint shares (DistributedSampler's layout), the dataset order without shuffling
    shards = [list(EpisodeBlockSampler(stream, shuffle=False, num_replicas=2, rank=r, drop_last=True)) for r in (0, 1)]
    assert shards[0] == list(range(0, 2 * len(shards[0]), 2)) and shards[1] == [i + 1 for i in shards[0]]
    with pytest.raises(ValueError, match="rank must be in"):
        EpisodeBlockSampler(stream, num_replicas=2, rank=2)


def test_dataloader_workers_and_reference_folder(data, tmp_path):
    memory = SequenceDataset(data, 4, split="train")
    stream = StreamingSequenceDataset(data, 4, split="train", cache_size=2)
    sampler = EpisodeBlockSampler(stream, shuffle=False)
    loader = DataLoader(stream, batch_size=5, sampler=sampler, num_workers=2)
    expected = DataLoader(memory, batch_size=5, shuffle=False)
    assert all(_same(a, b) for a, b in zip(loader, expected, strict=True))
    # a reference-format folder (shards only, no manifest): lengths come from the .npy headers
    reference = tmp_path / "reference"
    reference.mkdir()
    for shard in sorted(data.glob("*.npz")):
        shutil.copy(shard, reference / shard.name)
    assert count_frames(reference) == json.loads((data / "manifest.json").read_text())["num_frames"]
    memory = SequenceDataset(reference, 4, split="all")
    stream = StreamingSequenceDataset(reference, 4, split="all")
    assert len(stream) == len(memory) and all(_same(stream[i], memory[i]) for i in range(len(memory)))


def test_corrupt_and_missing_shards_are_named(data, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    (copy / "episode-000003.npz").write_bytes(b"not a zip")
    stream = StreamingSequenceDataset(copy, 4, split="all")  # manifest: nothing read yet
    episode = stream.files.index(copy / "episode-000003.npz")
    with pytest.raises(DatasetError, match="corrupt shard .*episode-000003.npz"):
        stream[stream.episode_windows(episode)[0]]
    (copy / "manifest.json").unlink()  # reference format: the header scan finds it at once
    with pytest.raises(DatasetError, match="corrupt shard .*episode-000003.npz"):
        StreamingSequenceDataset(copy, 4, split="all")
    shutil.rmtree(copy)
    shutil.copytree(data, copy)
    (copy / "episode-000001.npz").unlink()
    with pytest.raises(DatasetError, match="missing shard .*episode-000001.npz"):
        StreamingSequenceDataset(copy, 4, split="all")
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["episodes"][1]["frames"] += 1  # a shard that disagrees with the manifest
    shutil.copy(data / "episode-000001.npz", copy / "episode-000001.npz")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="corrupt shard .*episode-000001.npz: 10 frames, the manifest says 11"):
        StreamingSequenceDataset(copy, 4, split="all", keys=("image",)).episodes[1]


def test_training_streams_the_same_batches(data, tmp_path, monkeypatch):
    assert not sequence_dataset(data, 4).streaming and isinstance(sequence_dataset(data, 4), SequenceDataset)
    monkeypatch.setattr(data_module, "STREAMING_MIN_FRAMES", 10)
    streamed = sequence_dataset(data, 4)
    assert streamed.streaming and not isinstance(streamed, SequenceDataset)
    config = kp_rl.get_preset("cpu").replace(
        keypoints={"image_size": 32, "num_keypoints": 4, "base_filters": 4, "layers_per_scale": 0},
        train={"steps": 3, "batch_size": 4, "sequence_length": 4, "log_every": 1, "eval_every": 3,
               "checkpoint_every": 3, "image_every": 3, "num_workers": 0})
    histories = []
    for streaming in (False, True):
        out = tmp_path / str(streaming)
        train_autoencoder(data, out, config, device="cpu", progress=False, streaming=streaming, shuffle=False)
        histories.append([{k: v for k, v in row.items() if k != "steps_per_s"}
                          for row in json.loads((out / "history.json").read_text())["train"]])
    assert histories[0] == histories[1]


def test_cli_streaming_flag(data, tmp_path):
    import subprocess
    import sys

    (tmp_path / "tiny.yaml").write_text(
        "preset: cpu\nkeypoints: {image_size: 32, num_keypoints: 4, base_filters: 4, layers_per_scale: 0}\n"
        "train: {steps: 2, batch_size: 4, sequence_length: 4, checkpoint_every: 2, eval_every: 2, image_every: 2}\n")
    cmd = [sys.executable, "-m", "kp_rl.cli", "train", "keypoints", "--data", str(data), "--quiet",
           "--config", str(tmp_path / "tiny.yaml"), "--out", str(tmp_path / "run"), "--streaming"]
    result = subprocess.run(cmd + ["on"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "run" / "model.pt").exists()
    bad = subprocess.run(cmd + ["sometimes"], capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
