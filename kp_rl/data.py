"""Rollout datasets: episode shards on disk, a manifest, and fixed-length sequence windows for PyTorch.

A dataset directory holds one compressed ``.npz`` shard per episode plus ``manifest.json``::

    data/cartpole/
      manifest.json                 # task spec, seed, policy, package versions, one entry per episode
      episode-000000.npz            # image (L+1, H, W, 3) uint8, action, reward, discount, state, physics,
      episode-000001.npz            # true_object_pos (L+1, bodies, 2): pixel (column, row) of every body
      ...

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

import json
import multiprocessing as mp
import os
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

MANIFEST = "manifest.json"
FORMAT = "kp_rl.episodes"
FORMAT_VERSION = 1
SHARD_KEYS = ("image", "action", "reward", "discount", "state", "physics", "true_object_pos")
POLICIES = ("random",)


class DatasetError(ValueError):
    """A dataset directory, shard or window request is invalid; the message names the file or value."""


# -- atomic writes ---------------------------------------------------------------------------------------
def atomic_write_bytes(path: Path, write: Any) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the permissions open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, lambda f: f.write(json.dumps(data, indent=2, sort_keys=True).encode()))


# -- episodes --------------------------------------------------------------------------------------------
def shard_name(index: int) -> str:
    return f"episode-{index:06d}.npz"


def episode_seed(seed: int, index: int) -> int:
    """Independent, reproducible seed of episode ``index`` in a collection seeded with ``seed``."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def rollout(env: Any, seed: int, policy: str = "random", max_steps: int | None = None) -> dict[str, np.ndarray]:
    """Run one episode and return its aligned arrays (see the module docstring)."""
    if policy not in POLICIES:
        raise DatasetError(f"unknown policy {policy!r}; expected one of {list(POLICIES)}")
    env.action_space.seed(seed)
    obs, info = env.reset(seed=seed)
    action_dim = env.action_space.shape[0]
    steps: dict[str, list] = {k: [] for k in SHARD_KEYS}

    def record(obs, action, reward, info):
        steps["image"].append(obs)
        steps["action"].append(action)
        steps["reward"].append(reward)
        steps["discount"].append(info["discount"])
        steps["state"].append(info["state"])
        steps["physics"].append(info["physics"])
        steps["true_object_pos"].append(info["body_pixels"])

    record(obs, np.zeros(action_dim, np.float32), 0.0, info)
    done, t = False, 0
    while not done and (max_steps is None or t < max_steps):
        action = env.action_space.sample()
        obs, reward, terminated, truncated, info = env.step(action)
        record(obs, action, reward, info)
        done, t = terminated or truncated, t + 1
    dtypes = {"image": np.uint8}
    return {k: np.asarray(v, dtype=dtypes.get(k, np.float32)) for k, v in steps.items()}


def save_episode(path: Path, episode: dict[str, np.ndarray]) -> None:
    """Write one episode shard atomically (compressed ``.npz``)."""
    atomic_write_bytes(Path(path), lambda f: np.savez_compressed(f, **episode))


def load_episode(path: Path, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Read a shard; a missing, corrupt or foreign file raises :class:`DatasetError` naming it."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            available = set(data.files)
            wanted = [k for k in (keys or data.files) if k in available]
            episode = {k: data[k] for k in wanted}
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
        probe = tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-", delete=True)
        probe.close()
    except OSError as exc:
        raise DatasetError(f"output directory {out} is not writable: {exc.strerror or exc}") from exc


_worker_env: Any = None


def _worker_init(env_name: str, env_kwargs: dict[str, Any]) -> None:
    global _worker_env
    import kp_rl.envs

    _worker_env = kp_rl.envs.make_env(env_name, **env_kwargs)


def _worker_rollout(job: tuple[int, int, str, str, int | None]) -> dict[str, Any]:
    index, seed, policy, out, max_steps = job
    episode = rollout(_worker_env, seed, policy, max_steps)
    save_episode(Path(out) / shard_name(index), episode)
    return {"index": index, "file": shard_name(index), "seed": seed, "frames": len(episode["image"]),
            "return": float(episode["reward"].sum())}


def _entry_from_shard(path: Path, index: int, seed: int) -> dict[str, Any]:
    episode = load_episode(path, keys=("image", "reward"))
    return {"index": index, "file": path.name, "seed": seed, "frames": len(episode["image"]),
            "return": float(episode["reward"].sum())}


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

    from kp_rl.envs import get_spec

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
    wanted = {"env_id": spec.env_id, "task": spec.to_dict(), "seed": seed, "policy": policy, "max_steps": max_steps}
    if manifest_path.exists():
        manifest = read_manifest(out)
        for key, value in wanted.items():
            if manifest.get(key) != value:
                raise DatasetError(f"{manifest_path}: holds a dataset with {key}={manifest.get(key)!r}, "
                                   f"not {value!r}; choose another --out directory")
    else:
        manifest = {"format": FORMAT, "version": FORMAT_VERSION, **wanted, "episodes": []}
    for stale in out.glob(".*.tmp"):  # temporaries of an interrupted write
        stale.unlink()

    done = {e["index"]: e for e in manifest["episodes"]}
    for index in range(episodes):  # shards written but not yet recorded (interrupted between the two)
        path = out / shard_name(index)
        if index not in done and path.exists():
            done[index] = _entry_from_shard(path, index, episode_seed(seed, index))
    todo = [i for i in range(episodes) if i not in done]

    def write_manifest() -> None:
        entries = sorted(done.values(), key=lambda e: e["index"])
        manifest.update(episodes=entries, num_episodes=len(entries), num_frames=sum(e["frames"] for e in entries),
                        versions=_versions())
        atomic_write_json(manifest_path, manifest)

    write_manifest()
    jobs = [(i, episode_seed(seed, i), policy, str(out), max_steps) for i in todo]
    expected = (max_steps + 1 if max_steps else spec.max_episode_steps + 1) * len(jobs)
    bar = tqdm(total=expected, unit="frame", desc=f"collect {spec.name}", disable=not progress)
    start = time.perf_counter()
    try:
        if workers == 1 or len(jobs) <= 1:
            _worker_init(spec.name, env_kwargs)
            try:
                for job in jobs:
                    entry = _worker_rollout(job)
                    done[entry["index"]] = entry
                    write_manifest()
                    bar.update(entry["frames"])
            finally:
                _worker_env.close()
        else:
            ctx = mp.get_context("spawn")
            with ctx.Pool(min(workers, len(jobs)), initializer=_worker_init, initargs=(spec.name, env_kwargs)) as pool:
                for entry in pool.imap_unordered(_worker_rollout, jobs):
                    done[entry["index"]] = entry
                    write_manifest()
                    bar.update(entry["frames"])
    finally:
        bar.close()
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


class SequenceDataset(Dataset):
    """Fixed-length windows of ``sequence_length`` steps from the episodes of a dataset directory.

    Args:
        root: dataset directory (kp_rl manifest + shards, or reference-format ``.npz`` files).
        sequence_length: frames per window (T).
        split: ``train``, ``val`` (every k-th episode) or ``all``.
        val_fraction: fraction of episodes held out for validation.
        stride: step between window starts.
        keys: arrays to return; missing ones (e.g. actions in reference data) are filled with zeros.

    Items are dicts of tensors: ``image`` uint8 (T, H, W, 3), ``action`` (T, A), ``reward`` (T,), ... .
    Episodes are held in memory (about 12 KB per 64x64 frame).
    """

    def __init__(
        self,
        root: str | Path,
        sequence_length: int,
        split: str = "train",
        val_fraction: float = 0.1,
        stride: int = 1,
        keys: Iterable[str] = ("image", "action", "reward"),
    ):
        if sequence_length < 1 or stride < 1:
            raise DatasetError(f"sequence_length and stride must be >= 1, got {sequence_length}, {stride}")
        self.root = Path(root)
        self.sequence_length = sequence_length
        self.keys = tuple(keys)
        self.files = split_episodes(episode_files(self.root), split, val_fraction)
        self.episodes = [load_episode(f, keys=self.keys) for f in self.files]
        lengths = [len(e["image"]) for e in self.episodes]
        if not lengths or max(lengths) < sequence_length:
            raise DatasetError(f"window of {sequence_length} frames is longer than every episode in {self.root} "
                               f"(longest: {max(lengths, default=0)} frames)")
        self.index = [(e, s) for e, n in enumerate(lengths) for s in range(0, n - sequence_length + 1, stride)]
        self.image_shape = tuple(self.episodes[0]["image"].shape[1:])
        self.action_dim = self.episodes[0]["action"].shape[-1] if "action" in self.episodes[0] else 0

    @property
    def num_frames(self) -> int:
        return sum(len(e["image"]) for e in self.episodes)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        episode_index, start = self.index[i]
        episode = self.episodes[episode_index]
        window = slice(start, start + self.sequence_length)
        item = {}
        for key in self.keys:
            if key in episode:
                item[key] = torch.from_numpy(np.ascontiguousarray(episode[key][window]))
            elif key == "action":
                item[key] = torch.zeros(self.sequence_length, 0)
            elif key in ("reward", "discount"):
                item[key] = torch.zeros(self.sequence_length)
        return item
