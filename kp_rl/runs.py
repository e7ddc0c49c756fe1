"""Run folders know what they hold: ``run.json`` records a run's identity, and a resuming command checks it.

A run folder (a training stage, an agent, an experiment cell) is resumed only by the kind of command that
wrote it: :func:`start_run` records the identity on the first start and every later start compares it with
what the resuming command asks for; a mismatch is a :class:`RunMismatchError` raised before anything is
written. Folders made before ``run.json`` existed are checked against what their files say (``found``).

Example:
    >>> import tempfile
    >>> out = tempfile.mkdtemp()
    >>> start_run(out, {"command": "rl", "stage": "agent", "agent": "sac-state", "env_id": "kp_rl/cartpole-swingup-v0"})
    >>> check_run(out, {"command": "rl", "stage": "agent", "agent": "sac-state"})["agent"]
    'sac-state'
    >>> check_run(out, {"command": "rl", "stage": "agent", "agent": "ppo-state"})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    kp_rl.runs.RunMismatchError: run folder ... holds agent='sac-state', not agent='ppo-state'; choose another output folder
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

RUN_FILE = "run.json"
# recorded for the reader, not compared: a model is the same model wherever its file lies (its hash decides)
INFORMATIVE = frozenset({"model", "kp_rl"})


class RunMismatchError(ValueError):
    """A run folder holds another run than the command resuming it asks for."""


def checkpoint_hash(path: str | Path) -> str:
    """First 12 hex digits of the sha256 of a checkpoint file's bytes (a run directory: its ``model.pt``; a
    ``pretrained:<task>`` name: the shipped bundle)."""
    from kp_rl.model import checkpoint_file

    path = checkpoint_file(path)
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:12]  # checkpoints are a few MB
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"checkpoint not found: {path}") from exc


def check_output_dir(out: str | Path) -> Path:
    """``out`` as a Path; an existing file there (or above it) is a ValueError, before anything is made."""
    out = Path(out)
    path = next((path for path in (out, *out.parents) if path.exists()), None)
    if path is not None and not path.is_dir():
        raise ValueError(f"output folder {out}: {path} is a file, not a folder")
    return out


def read_run(out: str | Path) -> dict[str, Any] | None:
    """The identity ``out/run.json`` records (None when there is none)."""
    path = Path(out) / RUN_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ValueError(f"corrupt {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"corrupt {path}: expected a mapping")
    return data


def check_run(out: str | Path, identity: dict[str, Any], found: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Compare ``identity`` with the run ``out`` holds; returns the recorded identity (None for a new folder).

    Args:
        out: the run folder.
        identity: what this command makes; keys with value None are not compared (not asked for).
        found: for a folder without ``run.json`` (made before it existed): the identity its files show.
    Raises:
        RunMismatchError: one line naming the differing fields on both sides.
    """
    out = check_output_dir(out)
    recorded = read_run(out)
    recorded = found if recorded is None else recorded
    if recorded is None:
        return None
    differ = [k for k, v in identity.items()
              if v is not None and k not in INFORMATIVE and k in recorded and recorded[k] != v]
    if differ:
        ours = ", ".join(f"{k}={recorded[k]!r}" for k in differ)
        theirs = ", ".join(f"{k}={identity[k]!r}" for k in differ)
        raise RunMismatchError(f"run folder {out} holds {ours}, not {theirs}; choose another output folder")
    return recorded


def start_run(out: str | Path, identity: dict[str, Any], found: dict[str, Any] | None = None) -> None:
    """:func:`check_run`, then create ``out`` and record the identity (fields it lacked are added)."""
    from kp_rl import __version__
    from kp_rl.files import write_json

    recorded = check_run(out, identity, found) or {}
    out = Path(out)
    merged = {**{k: v for k, v in identity.items() if v is not None}, **recorded}
    if read_run(out) == merged:
        return
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / RUN_FILE, {"kp_rl": __version__, **merged})
