"""Rollout datasets: episode shards on disk, a manifest, and fixed-length sequence windows for PyTorch.

A dataset directory holds one compressed ``.npz`` shard per episode plus ``manifest.json``::

    data/cartpole/
      manifest.json                 # task spec, seed, policy, package versions, one entry per episode
      episode-000000.npz            # image (L+1, H, W, 3) uint8, action, reward, discount, state, physics,
      episode-000001.npz            # true_object_pos (L+1, objects, 2): pixel (column, row) of every tracked
      ...                           #   object, named by the manifest's object_names (bodies, then e.g. a target)

Arrays are aligned per step (Dreamer convention): ``action[t]`` is the action taken *before* ``image[t]``
and ``reward[t]`` the reward received with it; both are zero at ``t = 0`` (the reset frame).
The keys ``image`` and ``true_object_pos`` match the reference implementation's per-episode ``.npz``
files, and a directory of those (no manifest) is read too.

Every write is atomic (temporary file, then rename), so an interrupted collection resumes where it
stopped without duplicating or losing episodes.

Example:
    >>> import tempfile, kp_rl
    >>> from kp_rl.data import collect, SequenceDataset
    >>> root = tempfile.mkdtemp()
    >>> manifest = collect("cartpole-swingup", root, episodes=2, max_steps=10, progress=False)
    >>> manifest["num_frames"]
    22
    >>> window = SequenceDataset(root, sequence_length=8, split="all")[0]
    >>> tuple(window["image"].shape), tuple(window["action"].shape)
    ((8, 64, 64, 3), (8, 1))
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import tempfile
import time
import zipfile
from pathlib import Path
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from kp_rl.files import write_bytes, write_json

if TYPE_CHECKING:
    from kp_rl.model import PerceptionModel

MANIFEST = "manifest.json"
FORMAT = "kp_rl.episodes"
FORMAT_VERSION = 1
SHARD_KEYS = ("image", "action", "reward", "discount", "state", "physics", "true_object_pos")
POLICIES = ("random",)


class DatasetError(ValueError):
    """A dataset directory, shard or window request is invalid; the message names the file or value."""


# -- episodes --------------------------------------------------------------------------------------------
def shard_name(index: int) -> str:
    return f"episode-{index:06d}.npz"


def episode_seed(seed: int, index: int) -> int:
    """Independent, reproducible seed of episode ``index`` in a collection seeded with ``seed``."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def rollout(env: Any, seed: int, max_steps: int | None = None) -> dict[str, np.ndarray]:
    """Run one episode of uniform random actions and return its aligned arrays (see the module docstring)."""
    steps: list[dict[str, Any]] = []

    def record(obs, action, reward, info):
        steps.append({"image": obs, "action": action, "reward": reward, "discount": info["discount"],
                      "state": info["state"], "physics": info["physics"], "true_object_pos": info["object_pixels"]})

    env.action_space.seed(seed)
    obs, info = env.reset(seed=seed)
    record(obs, np.zeros(env.action_space.shape[0], np.float32), 0.0, info)
    done, t = False, 0
    while not done and (max_steps is None or t < max_steps):
        action = env.action_space.sample()
        obs, reward, terminated, truncated, info = env.step(action)
        record(obs, action, reward, info)
        done, t = terminated or truncated, t + 1
    return {k: np.asarray([step[k] for step in steps], dtype=np.uint8 if k == "image" else np.float32)
            for k in SHARD_KEYS}


def save_episode(path: Path, episode: dict[str, np.ndarray]) -> None:
    """Write one episode shard atomically (compressed ``.npz``)."""
    write_bytes(Path(path), lambda f: np.savez_compressed(f, **episode))


def load_episode(path: Path, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Read a shard; a missing, corrupt or foreign file raises :class:`DatasetError` naming it."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            episode = {k: data[k] for k in (keys or data.files) if k in data.files}
    except FileNotFoundError as exc:
        raise DatasetError(f"missing shard {path}") from exc
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DatasetError(f"corrupt shard {path}: {exc}") from exc
    image = episode.get("image")
    if image is None or image.dtype != np.uint8 or image.ndim != 4 or image.shape[-1] != 3:
        raise DatasetError(f"foreign shard {path}: expected an 'image' array of uint8 (T, H, W, 3)")
    for key, value in episode.items():
        if len(value) != len(image):
            raise DatasetError(f"corrupt shard {path}: '{key}' has {len(value)} steps, 'image' has {len(image)}")
    return episode


# -- collection ------------------------------------------------------------------------------------------
def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("kp_rl", "mujoco", "dm-control", "gymnasium", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "unknown"
    return out


def _check_output_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DatasetError(f"output path {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out, prefix=".write-test-").close()
    except OSError as exc:
        raise DatasetError(f"output directory {out} is not writable: {exc.strerror or exc}") from exc


_worker_env: Any = None


def _worker_init(env_name: str, env_kwargs: dict[str, Any]) -> None:
    global _worker_env
    import kp_rl.envs

    _worker_env = kp_rl.envs.make_env(env_name, **env_kwargs)


def _entry(index: int, seed: int, episode: dict[str, np.ndarray]) -> dict[str, Any]:
    """The manifest's record of episode ``index``."""
    return {"index": index, "file": shard_name(index), "seed": seed, "frames": len(episode["image"]),
            "return": float(episode["reward"].sum())}


def _worker_rollout(job: tuple[int, int, str, int | None]) -> dict[str, Any]:
    index, seed, out, max_steps = job
    episode = rollout(_worker_env, seed, max_steps)
    save_episode(Path(out) / shard_name(index), episode)
    return _entry(index, seed, episode)


def collect(
    env: str,
    out: str | Path,
    episodes: int,
    *,
    seed: int = 0,
    workers: int = 1,
    policy: str = "random",
    max_steps: int | None = None,
    env_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Collect ``episodes`` rollouts of ``env`` into ``out`` (resuming a partial collection there).

    Args:
        env: catalog id or name (``kp_rl/cartpole-swingup-v0`` or ``cartpole-swingup``).
        out: dataset directory (created if needed).
        episodes: total number of episodes the directory should hold when done.
        seed: collection seed; episode ``i`` uses :func:`episode_seed` (seed, i).
        workers: parallel worker processes, each with its own environment.
        policy: ``random`` (uniform random actions: the paper's data).
        max_steps: cut episodes to this many agent steps (default: the full episode).
        env_kwargs: spec overrides, e.g. ``{"image_size": 32}``.
    Returns:
        The manifest (also written to ``out/manifest.json``).
    """
    from tqdm.auto import tqdm

    from kp_rl.envs import get_spec, object_names

    if episodes < 1:
        raise DatasetError(f"episodes must be >= 1, got {episodes}")
    if workers < 1:
        raise DatasetError(f"workers must be >= 1, got {workers}")
    if policy not in POLICIES:
        raise DatasetError(f"unknown policy {policy!r}; expected one of {list(POLICIES)}")
    env_kwargs = dict(env_kwargs or {})
    spec = get_spec(env).replace(**env_kwargs)  # unknown task / bad size fail here, before anything is written
    out = Path(out)
    _check_output_dir(out)

    manifest_path = out / MANIFEST
    wanted = {"env_id": spec.env_id, "task": spec.to_dict(), "seed": seed, "policy": policy, "max_steps": max_steps,
              "object_names": list(object_names(spec))}
    if manifest_path.exists():
        manifest = read_manifest(out)
        if "object_names" not in manifest:  # written before objects were named: its shards track the bodies only
            if spec.objects:
                raise DatasetError(f"{manifest_path}: an older dataset whose true_object_pos lacks {list(spec.objects)}; "
                                   f"collect into another directory")
            manifest.update(object_names=wanted["object_names"], task={**manifest["task"], "objects": []})
        for key, value in wanted.items():
            if manifest.get(key) != value:
                raise DatasetError(f"{manifest_path}: holds a dataset with {key}={manifest.get(key)!r}, "
                                   f"not {value!r}; collect into another directory")
    else:
        manifest = {"format": FORMAT, "version": FORMAT_VERSION, **wanted, "episodes": []}
    for stale in out.glob(".*.tmp"):  # temporaries of an interrupted write
        stale.unlink()

    done = {e["index"]: e for e in manifest["episodes"]}
    for index in range(episodes):  # shards written but not yet recorded (interrupted between the two)
        path = out / shard_name(index)
        if index not in done and path.exists():
            done[index] = _entry(index, episode_seed(seed, index), load_episode(path, keys=("image", "reward")))
    todo = [i for i in range(episodes) if i not in done]

    def write_manifest() -> None:
        entries = sorted(done.values(), key=lambda e: e["index"])
        manifest.update(episodes=entries, num_episodes=len(entries), num_frames=sum(e["frames"] for e in entries),
                        versions=_versions())
        write_json(manifest_path, manifest)

    write_manifest()
    jobs = [(i, episode_seed(seed, i), str(out), max_steps) for i in todo]
    expected = (max_steps + 1 if max_steps else spec.max_episode_steps + 1) * len(jobs)
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(tqdm(total=expected, unit="frame", desc=f"collect {spec.name}", disable=not progress))
        if workers == 1 or len(jobs) <= 1:
            _worker_init(spec.name, env_kwargs)
            stack.callback(lambda: _worker_env.close())
            entries = map(_worker_rollout, jobs)
        else:
            pool = stack.enter_context(mp.get_context("spawn").Pool(
                min(workers, len(jobs)), initializer=_worker_init, initargs=(spec.name, env_kwargs)))
            entries = pool.imap_unordered(_worker_rollout, jobs)
        for entry in entries:
            done[entry["index"]] = entry
            write_manifest()
            bar.update(entry["frames"])
    manifest["seconds"] = round(time.perf_counter() - start, 3)
    return manifest


def read_manifest(root: str | Path) -> dict[str, Any]:
    """Read ``root/manifest.json``; a missing directory or a foreign/corrupt manifest is a DatasetError."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset directory not found: {root}")
    path = root / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise DatasetError(f"no {MANIFEST} in {root}") from exc
    except json.JSONDecodeError as exc:
        raise DatasetError(f"corrupt manifest {path}: {exc}") from exc
    if manifest.get("format") != FORMAT:
        raise DatasetError(f"{path} is not a kp_rl dataset manifest (format={manifest.get('format')!r})")
    if manifest.get("version") != FORMAT_VERSION:
        raise DatasetError(f"{path}: dataset format version {manifest.get('version')} is not supported "
                           f"(this kp_rl reads version {FORMAT_VERSION})")
    return manifest


def episode_files(root: str | Path) -> list[Path]:
    """Shards of a dataset: those listed in the manifest, or every ``*.npz`` of a reference-format folder."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset directory not found: {root}")
    if (root / MANIFEST).exists():
        manifest = read_manifest(root)
        listed = {e["file"] for e in manifest["episodes"]}
        foreign = sorted(p.name for p in root.glob("*.npz") if p.name not in listed)
        if foreign:
            raise DatasetError(f"foreign shard {root / foreign[0]}: not listed in {root / MANIFEST}")
        return [root / e["file"] for e in manifest["episodes"]]
    files = sorted(root.glob("*.npz"))
    if not files:
        raise DatasetError(f"no episodes in {root}: expected {MANIFEST} and episode-*.npz shards")
    return files


def split_episodes(files: Sequence[Path], split: str, val_fraction: float) -> list[Path]:
    """Deterministic train/validation split by episode: every k-th episode is held out."""
    if split not in ("train", "val", "all"):
        raise DatasetError(f"split must be 'train', 'val' or 'all', got {split!r}")
    if split == "all" or val_fraction <= 0 or len(files) < 2:
        if split == "val":
            raise DatasetError(f"no validation episodes: {len(files)} episode(s), val_fraction={val_fraction}")
        return list(files)
    num_val = min(len(files) - 1, max(1, round(len(files) * val_fraction)))
    val = set(np.linspace(len(files) - 1, 0, num_val).round().astype(int).tolist())
    return [f for i, f in enumerate(files) if (i in val) == (split == "val")]


def _window(episode: dict[str, np.ndarray], keys: Sequence[str], start: int, length: int) -> dict[str, torch.Tensor]:
    """Steps ``start .. start + length`` of ``keys``; a missing ``action`` / ``reward`` / ``discount`` is zeros."""
    window = slice(start, start + length)
    item = {}
    for key in keys:
        if key in episode:
            item[key] = torch.from_numpy(np.ascontiguousarray(episode[key][window]))
        elif key == "action":
            item[key] = torch.zeros(length, 0)
        elif key in ("reward", "discount"):
            item[key] = torch.zeros(length)
    return item


STREAMING_MIN_FRAMES = 250_000  # `sequence_dataset(streaming=None)` streams above this (~3 GB of 64x64 frames)


def shard_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Array shapes of a shard read from the ``.npy`` headers only (nothing is decompressed beyond them)."""
    path = Path(path)
    shapes = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                if not name.endswith(".npy"):
                    continue
                with archive.open(name) as member:
                    version = np.lib.format.read_magic(member)
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                        np.lib.format.read_array_header_2_0
                    shapes[name[:-4]] = tuple(read(member)[0])
    except FileNotFoundError as exc:
        raise DatasetError(f"missing shard {path}") from exc
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DatasetError(f"corrupt shard {path}: {exc}") from exc
    image = shapes.get("image")
    if image is None or len(image) != 4 or image[-1] != 3:
        raise DatasetError(f"foreign shard {path}: expected an 'image' array of uint8 (T, H, W, 3)")
    return shapes


def episode_lengths(root: str | Path, files: Sequence[Path]) -> list[int]:
    """Frames per shard: from the manifest entries (``frames``), else from each shard's ``.npy`` header."""
    root = Path(root)
    if (root / MANIFEST).exists():
        frames = {e["file"]: e.get("frames") for e in read_manifest(root)["episodes"]}
        if all(frames.get(f.name) is not None for f in files):
            return [int(frames[f.name]) for f in files]
    return [shard_shapes(f)["image"][0] for f in files]


def count_frames(root: str | Path) -> int:
    """Frames in a dataset directory, without loading any episode."""
    return sum(episode_lengths(root, episode_files(root)))


class StreamingSequenceDataset(Dataset):
    """Fixed-length windows of a dataset directory for data larger than memory: shards read on demand.

    Windows come in :class:`SequenceDataset`'s order; episodes are loaded when a window needs them into an LRU
    cache of ``cache_size`` episodes per process (per DataLoader worker). Shuffle with :class:`EpisodeBlockSampler`.

    Args:
        root, sequence_length, split, val_fraction, stride, keys: as for :class:`SequenceDataset`.
        cache_size: episodes held in memory per process (per DataLoader worker).

    Example:
        >>> import tempfile
        >>> root = tempfile.mkdtemp()
        >>> _ = collect("cartpole-swingup", root, episodes=3, max_steps=5, progress=False)
        >>> data = StreamingSequenceDataset(root, 4, split="all", cache_size=1)
        >>> len(data), data.num_frames, tuple(data[0]["image"].shape), data.cached_episodes
        (9, 18, (4, 64, 64, 3), (0,))
    """

    streaming = True

    def __init__(
        self,
        root: str | Path,
        sequence_length: int,
        split: str = "train",
        val_fraction: float = 0.1,
        stride: int = 1,
        keys: Iterable[str] = ("image", "action", "reward"),
        cache_size: int = 8,
    ):
        if sequence_length < 1 or stride < 1:
            raise DatasetError(f"sequence_length and stride must be >= 1, got {sequence_length}, {stride}")
        if cache_size < 1:
            raise DatasetError(f"cache_size must be >= 1, got {cache_size}")
        self.root, self.sequence_length, self.stride = Path(root), sequence_length, stride
        self.keys, self.cache_size = tuple(keys), cache_size
        self.files = split_episodes(episode_files(self.root), split, val_fraction)
        missing = [f for f in self.files if not f.is_file()]
        if missing:
            raise DatasetError(f"missing shard {missing[0]}")
        self.lengths = episode_lengths(self.root, self.files)
        if not self.lengths or max(self.lengths) < sequence_length:
            raise DatasetError(f"window of {sequence_length} frames is longer than every episode in {self.root} "
                               f"(longest: {max(self.lengths, default=0)} frames)")
        counts = [max(0, (n - sequence_length) // stride + 1) for n in self.lengths]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # window ids of episode e
        shapes = shard_shapes(self.files[0])
        self.image_shape = tuple(shapes["image"][1:])
        self.action_dim = shapes["action"][-1] if "action" in shapes and "action" in self.keys else 0
        self._cache: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()

    @property
    def num_frames(self) -> int:
        return int(sum(self.lengths))

    @property
    def cached_episodes(self) -> tuple[int, ...]:
        """Indices of the episodes in this process's cache, least recently used first."""
        return tuple(self._cache)

    @property
    def episodes(self) -> Sequence[dict[str, np.ndarray]]:
        """The episodes as a lazy sequence (each loaded through the cache when indexed)."""
        return _LazyEpisodes(self)

    def episode(self, index: int) -> dict[str, np.ndarray]:
        """Episode ``index`` of this split, from the cache or its shard."""
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        path = self.files[index]
        episode = load_episode(path, keys=self.keys)
        if len(episode["image"]) != self.lengths[index]:
            raise DatasetError(f"corrupt shard {path}: {len(episode['image'])} frames, the manifest says "
                               f"{self.lengths[index]}")
        self._cache[index] = episode
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return episode

    def window(self, i: int) -> tuple[int, int]:
        """``(episode, start frame)`` of window ``i``."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"window {i} out of range for {len(self)} windows")
        i %= len(self)
        episode = int(np.searchsorted(self.starts, i, side="right")) - 1
        return episode, int(i - self.starts[episode]) * self.stride

    def episode_windows(self, episode: int) -> range:
        """Window ids that lie in ``episode``."""
        return range(int(self.starts[episode]), int(self.starts[episode + 1]))

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        episode, start = self.window(i)
        return _window(self.episode(episode), self.keys, start, self.sequence_length)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": OrderedDict()}  # workers start with an empty cache


class SequenceDataset(StreamingSequenceDataset):
    """Fixed-length windows of ``sequence_length`` steps from the episodes of a dataset directory, in memory.

    Args:
        root: dataset directory (kp_rl manifest + shards, or reference-format ``.npz`` files).
        sequence_length: frames per window (T).
        split: ``train``, ``val`` (every k-th episode) or ``all``.
        val_fraction: fraction of episodes held out for validation.
        stride: step between window starts.
        keys: arrays to return; missing ones (e.g. actions in reference data) are filled with zeros.

    Items are dicts of tensors: ``image`` uint8 (T, H, W, 3), ``action`` (T, A), ``reward`` (T,), ... .
    Every episode is loaded up front (about 12 KB per 64x64 frame).
    """

    streaming = False

    def __init__(self, root: str | Path, sequence_length: int, split: str = "train", val_fraction: float = 0.1,
                 stride: int = 1, keys: Iterable[str] = ("image", "action", "reward")):
        super().__init__(root, sequence_length, split, val_fraction, stride, keys, cache_size=1)
        self.cache_size = len(self.files)
        for index in range(len(self.files)):
            self.episode(index)

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__


class _LazyEpisodes(Sequence):
    def __init__(self, dataset: StreamingSequenceDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset.files)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        return self.dataset.episode(index % len(self))


class EpisodeBlockSampler(Sampler[int]):
    """Window order for :class:`StreamingSequenceDataset`: shuffled, but a few episodes at a time.

    Each epoch the episodes are shuffled into blocks of ``block_episodes`` whose windows are shuffled together,
    so each shard is loaded about once per epoch. Rank ``r`` of ``num_replicas`` takes every
    ``num_replicas``-th window of that order (as :class:`~torch.utils.data.DistributedSampler` does).

    Args:
        dataset: a :class:`StreamingSequenceDataset`.
        block_episodes: episodes per block (default: the dataset's ``cache_size``).
        shuffle: random order (False: windows in index order).
        seed: base seed; the order of epoch ``e`` depends on ``seed`` and :meth:`set_epoch` (e).
        num_replicas, rank: distributed sharding.
        drop_last: drop the tail that does not divide among the replicas (else repeat the head to pad).
    """

    def __init__(self, dataset: StreamingSequenceDataset, block_episodes: int | None = None, shuffle: bool = True,
                 seed: int = 0, num_replicas: int = 1, rank: int = 0, drop_last: bool = False):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        self.dataset = dataset
        self.block_episodes = block_episodes or dataset.cache_size
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.num_replicas, self.rank, self.drop_last = num_replicas, rank, drop_last

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.dataset))
        rng = np.random.default_rng([self.seed, self.epoch])
        episodes = rng.permutation(len(self.dataset.files))
        blocks = [np.concatenate([np.asarray(self.dataset.episode_windows(int(e)), dtype=np.int64)
                                  for e in episodes[i:i + self.block_episodes]])
                  for i in range(0, len(episodes), self.block_episodes)]
        return np.concatenate([rng.permutation(block) for block in blocks])

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.num_replicas if self.drop_last else -(-n // self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        total = len(self) * self.num_replicas
        if total > len(order):
            order = np.resize(order, total)  # repeats the head
        return iter(order[:total][self.rank::self.num_replicas].tolist())


def sequence_dataset(root: str | Path, sequence_length: int, *, streaming: bool | None = None,
                     cache_size: int = 8, **kwargs: Any) -> SequenceDataset | StreamingSequenceDataset:
    """A :class:`SequenceDataset` (in memory) or :class:`StreamingSequenceDataset` (shards on demand).

    Args:
        streaming: True / False, or None: stream when the directory holds more than
            :data:`STREAMING_MIN_FRAMES` frames (counted from the manifest, without loading episodes).
        kwargs: ``split``, ``val_fraction``, ``stride``, ``keys``.
    """
    if streaming is None:
        streaming = count_frames(root) > STREAMING_MIN_FRAMES
    if streaming:
        return StreamingSequenceDataset(root, sequence_length, cache_size=cache_size, **kwargs)
    return SequenceDataset(root, sequence_length, **kwargs)


# -- encoded features (the VRNN's data) ------------------------------------------------------------------
@torch.inference_mode()
def encode_episodes(model: "PerceptionModel", episodes: list[dict[str, np.ndarray]], batch_size: int = 256) -> list[np.ndarray]:
    """Every frame of every episode through the (frozen) autoencoder: one ``(L, feature_dim)`` array each."""
    return [np.concatenate([model.encode(e["image"][i:i + batch_size]).float().cpu().numpy()
                            for i in range(0, len(e["image"]), batch_size)]) for e in episodes]


class FeatureSequences(Dataset):
    """Windows of in-memory episodes: per-episode ``features`` with their ``action`` and ``reward`` arrays (the
    VRNN's data), or other ``keys`` (``("image",)``: an autoencoder's, kept uint8).

    Args:
        episodes: dicts with ``features`` (L, D), ``action`` (L, A), ``reward`` (L,) arrays (or ``keys``).
        sequence_length: steps per window (observed + predicted).
        stride: step between window starts.
        keys: the arrays windows carry; all but ``image`` as float32.
    """

    def __init__(self, episodes: list[dict[str, Any]], sequence_length: int, stride: int = 1,
                 keys: tuple[str, ...] = ("features", "action", "reward")):
        self.sequence_length = sequence_length
        self.episodes = [{k: torch.as_tensor(np.asarray(e[k]), dtype=None if k == "image" else torch.float32)
                          for k in keys} for e in episodes]
        lengths = [len(e[keys[0]]) for e in self.episodes]
        if not lengths or max(lengths) < sequence_length:
            raise DatasetError(f"window of {sequence_length} steps is longer than every episode "
                               f"(longest: {max(lengths, default=0)})")
        self.index = [(e, s) for e, n in enumerate(lengths) for s in range(0, n - sequence_length + 1, stride)]

    @classmethod
    def from_frames(cls, model: "PerceptionModel", frames: SequenceDataset, sequence_length: int,
                    stride: int = 1) -> "FeatureSequences":
        """Encode every episode of ``frames`` (one at a time: streaming datasets never hold them all)."""
        episodes = [{"action": episode["action"], "reward": episode["reward"],
                     "features": encode_episodes(model, [episode])[0]} for episode in frames.episodes]
        return cls(episodes, sequence_length, stride)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        e, s = self.index[i]
        return {k: v[s:s + self.sequence_length] for k, v in self.episodes[e].items()}

    def reward_statistics(self) -> tuple[float, float]:
        """Mean and standard deviation of the rewards (each episode's first step, the reset frame, left out);
        a constant reward gives a scale of 1."""
        rewards = torch.cat([e["reward"][1:] for e in self.episodes]).double()
        std = float(rewards.std(unbiased=False)) if len(rewards) > 1 else 0.0
        return float(rewards.mean()) if len(rewards) else 0.0, std if std > 1e-8 else 1.0

    def stacked(self, limit: int) -> dict[str, Tensor]:
        """The first ``limit`` windows as one batch (for evaluation)."""
        items = [self[i] for i in range(min(limit, len(self)))]
        return {k: torch.stack([item[k] for item in items]) for k in items[0]}
