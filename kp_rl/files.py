"""File helpers every module uses: atomic writes (bytes, text, JSON, matplotlib figures), JSON and YAML reading.

An atomic write goes to a temporary file beside the target and is renamed over it, so an interrupted run
leaves either the old file or the new one, never half of one.

Example:
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "cell" / "result.json"
    >>> write_json(path, {"return": 812.5, "seed": 3})
    >>> read_json(path)
    {'return': 812.5, 'seed': 3}
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["read_json", "read_yaml", "save_figure", "write_bytes", "write_json", "write_text"]


def write_bytes(path: str | Path, data: bytes | Callable[[IO[bytes]], Any]) -> None:
    """Write ``data`` (bytes, or a function that writes to a binary file) to ``path`` atomically.

    Parent folders are created. The file gets the permissions ``open()`` would give it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            data(handle) if callable(data) else handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes(path, text.encode())


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON with sorted keys to ``path`` atomically."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True))


def read_json(path: str | Path) -> Any:
    """Read a JSON file (errors name the file)."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc


def read_yaml(path: str | Path, what: str = "file") -> Any:
    """Read a YAML file; a missing file is a FileNotFoundError and bad YAML a ValueError, both naming ``path``."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from exc


def save_figure(fig: Any, path: str | Path, dpi: int = 100) -> None:
    """Save a matplotlib figure to ``path`` (format from its suffix) atomically and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, format=path.suffix.lstrip(".") or "png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    write_bytes(path, buffer.getvalue())
