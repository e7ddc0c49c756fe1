"""kp_rl: unsupervised keypoints and keypoint dynamics (Minderer et al., NeurIPS 2019) as an RL perception plugin.

Importing ``kp_rl`` registers the ``kp_rl/<domain>-<task>-v0`` Gymnasium environments.
"""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # before anything imports dm_control / mujoco rendering

from kp_rl.config import Config, get_preset, load_config  # noqa: E402
from kp_rl.envs import make_env, register_envs  # noqa: E402
from kp_rl.model import PerceptionModel, load  # noqa: E402

__version__ = "0.1.0"

register_envs()

_SUBMODULES = ("agents", "data", "dynamics", "evaluate", "experiment", "keypoints", "losses", "metrics", "runs", "sb3",
               "train", "video", "wrappers")


def __getattr__(name: str):
    """``kp_rl.wrappers``, ``kp_rl.sb3``, ... import on first use (they pull in Stable-Baselines3)."""
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"kp_rl.{name}")
    raise AttributeError(f"module 'kp_rl' has no attribute {name!r}")


__all__ = ["Config", "PerceptionModel", "get_preset", "load", "load_config", "make_env", "register_envs", "__version__"]
