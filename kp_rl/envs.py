"""dm_control tasks as fast Gymnasium pixel environments, declared in the ``envs/*.yaml`` catalog.

One YAML file per task (domain, task, camera, image size, action repeat, episode length, render switches);
each becomes the Gymnasium id ``kp_rl/<domain>-<task>-v0`` when ``kp_rl`` is imported.

The usual pixel-DMC setup: ``visualize_reward=False`` (pixels do not leak the reward), actions rescaled to
[-1, 1], rewards summed over the repeated steps. Every step's ``info`` carries the low-dimensional state and the
pixel coordinates of the tracked objects (every body, then the catalog's ``objects:``), the ground truth of the
tracking evaluation.

Example:
    >>> import gymnasium as gym, kp_rl
    >>> env = gym.make("kp_rl/cartpole-swingup-v0")
    >>> obs, info = env.reset(seed=0)
    >>> obs.shape, obs.dtype, info["body_pixels"].shape
    ((64, 64, 3), dtype('uint8'), (2, 2))
    >>> env.close()
    >>> env = gym.make("kp_rl/reacher-easy-v0")
    >>> _, info = env.reset(seed=0)
    >>> info["object_names"], info["object_pixels"].shape
    (('arm', 'hand', 'finger', 'target'), (4, 2))
    >>> env.close()
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from kp_rl.files import read_yaml

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering on the CPU; must precede dm_control's import

ENV_PREFIX = "kp_rl/"
ENV_VERSION = "v0"


_RENDERING_PID: int | None = None  # the process whose renderers hold EGL state (see _render_frame)
_OPEN_RENDERERS: "weakref.WeakSet[Any]" = weakref.WeakSet()  # closed at interpreter exit (_close_open_renderers)
_EXIT_HOOK: list[bool] = []  # [True] once _close_open_renderers is registered with atexit


def _close_quietly(renderer: Any) -> None:
    """Release a renderer's GL context; a context the GL library has already torn down is not an error."""
    try:
        renderer.close()
    except Exception:  # noqa: BLE001 (EGL errors of a display terminated first: nothing left to release)
        pass


def _close_open_renderers() -> None:
    """Close every renderer still open. Registered with ``atexit`` after the first renderer exists, hence after
    MuJoCo's own ``eglTerminate`` hook, so it runs before it (atexit runs last-registered first)."""
    for renderer in list(_OPEN_RENDERERS):
        _close_quietly(renderer)


class UnknownTaskError(ValueError):
    """The environment id or task name is not in the catalog."""


@dataclass(frozen=True)
class TaskSpec:
    """One catalog entry: how a dm_control task becomes a pixel environment."""

    domain: str
    task: str
    camera: int = 0
    image_size: int = 64
    action_repeat: int = 1
    episode_steps: int = 1000  # physics control steps per episode (agent steps = episode_steps / action_repeat)
    shadows: bool = False
    reflections: bool = False
    objects: tuple[str, ...] = ()  # task-relevant geoms / sites that are not bodies (tracked like bodies)

    @property
    def name(self) -> str:
        return f"{self.domain}-{self.task}"

    @property
    def env_id(self) -> str:
        return f"{ENV_PREFIX}{self.name}-{ENV_VERSION}"

    @property
    def max_episode_steps(self) -> int:
        """Agent steps per episode."""
        return -(-self.episode_steps // self.action_repeat)

    def replace(self, **changes: Any) -> "TaskSpec":
        return dataclasses.replace(self, **changes)

    def __post_init__(self) -> None:
        if isinstance(self.objects, list):
            object.__setattr__(self, "objects", tuple(self.objects))
        if not isinstance(self.image_size, int) or isinstance(self.image_size, bool) or not 8 <= self.image_size <= 1024:
            raise ValueError(f"image_size must be an integer in [8, 1024], got {self.image_size!r}")
        if not isinstance(self.action_repeat, int) or self.action_repeat < 1:
            raise ValueError(f"action_repeat must be a positive integer, got {self.action_repeat!r}")
        if not isinstance(self.episode_steps, int) or self.episode_steps < 1:
            raise ValueError(f"episode_steps must be a positive integer, got {self.episode_steps!r}")
        if not isinstance(self.objects, tuple) or not all(isinstance(o, str) and o for o in self.objects):
            raise ValueError(f"objects must be a list of geom or site names, got {self.objects!r}")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "objects": list(self.objects)}  # JSON-shaped (manifests compare it)

    @classmethod
    def from_yaml(cls, path: Path) -> "TaskSpec":
        data = read_yaml(path)
        fields = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or not {"domain", "task"} <= set(data) or set(data) - fields:
            raise ValueError(f"{path}: expected a mapping with domain, task and some of {sorted(fields)}")
        return cls(**data)


def catalog_dir(name: str = "envs") -> Path:
    """Where the ``<name>/*.yaml`` catalog lives: ``$KP_RL_<NAME>``, the source tree, or the installed copy."""
    variable = f"KP_RL_{name.upper()}"
    candidates = [Path(os.environ[variable]) if variable in os.environ else None,
                  Path(__file__).resolve().parent.parent / name, Path(sys.prefix) / "share" / "kp_rl" / name]
    for path in candidates:
        if path is not None and path.is_dir() and any(path.glob("*.yaml")):
            return path
    raise FileNotFoundError(f"kp_rl {name} catalog not found; looked in {[str(p) for p in candidates if p]}")


def load_catalog() -> dict[str, TaskSpec]:
    """All catalog entries by env id."""
    return {spec.env_id: spec for spec in map(TaskSpec.from_yaml, sorted(catalog_dir().glob("*.yaml")))}


def get_spec(name: str) -> TaskSpec:
    """Look up a task by env id (``kp_rl/cartpole-swingup-v0``) or name (``cartpole-swingup``)."""
    catalog = load_catalog()
    env_id = name if name.startswith(ENV_PREFIX) else f"{ENV_PREFIX}{name}-{ENV_VERSION}"
    if env_id not in catalog:
        known = ", ".join(sorted(s.name for s in catalog.values()))
        raise UnknownTaskError(f"unknown task {name!r}; known tasks: {known}")
    return catalog[env_id]


def camera_matrix(model: Any, data: Any, camera_id: int, height: int, width: int) -> np.ndarray:
    """The 3x4 matrix that projects homogeneous world points to (column, row, 1) pixel coordinates."""
    pos = data.cam_xpos[camera_id]
    rot = data.cam_xmat[camera_id].reshape(3, 3)
    focal = 0.5 * height / np.tan(np.deg2rad(model.cam_fovy[camera_id]) / 2.0)
    extrinsic = np.concatenate([rot.T, -rot.T @ pos[:, None]], axis=1)  # world -> camera frame
    # camera looks along -z with y up; image rows grow downwards
    intrinsic = np.array([[-focal, 0.0, (width - 1) / 2.0], [0.0, focal, (height - 1) / 2.0], [0.0, 0.0, 1.0]])
    return intrinsic @ extrinsic


def project_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Project world points ``(N, 3)`` to pixel coordinates ``(N, 2)`` as (column, row)."""
    homogeneous = np.concatenate([points, np.ones((len(points), 1))], axis=1)
    projected = homogeneous @ matrix.T
    return (projected[:, :2] / projected[:, 2:3]).astype(np.float32)


def pixels_to_unit(pixels: np.ndarray, image_size: int) -> np.ndarray:
    """Pixel (column, row) -> keypoint coordinates (x: -1 left .. +1 right, y: +1 top .. -1 bottom)."""
    scale = 2.0 / (image_size - 1)
    return np.stack([pixels[..., 0] * scale - 1.0, 1.0 - pixels[..., 1] * scale], axis=-1).astype(np.float32)


class DMCPixelEnv(gym.Env, gym.utils.EzPickle):
    """A dm_control task with uint8 RGB frames ``(H, W, 3)`` as observations (a pickled copy needs a ``reset()``).

    Args:
        spec: the catalog entry (or pass ``domain``/``task`` and friends through :func:`make_env`).
        render_mode: ``None`` or ``"rgb_array"`` (``render()`` returns the last frame).

    ``info`` on reset and every step: ``state`` (float32 flat dm_control observation), ``physics`` (full
    physics state), ``body_pixels`` ((bodies, 2) float32 column/row of every non-world body's centre of mass),
    ``object_pixels`` ((objects, 2): the bodies, then the task's ``objects`` that are not bodies, e.g. reacher's
    target), ``object_names`` (tuple naming the rows of ``object_pixels``), ``discount``.
    Attributes: ``task_spec``, ``body_names``, ``object_names``, ``state_space`` (the space of
    ``info["state"]``).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 30}

    def __init__(self, spec: TaskSpec, render_mode: str | None = None):
        from dm_control import suite

        gym.utils.EzPickle.__init__(self, spec, render_mode)
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.task_spec = spec
        self.render_mode = render_mode
        try:
            self._env = suite.load(spec.domain, spec.task, visualize_reward=False)
        except ValueError as exc:
            raise UnknownTaskError(f"dm_control has no task {spec.domain}/{spec.task}: {exc}") from exc
        physics = self._env.physics
        self._model, self._data = physics.model.ptr, physics.data.ptr
        if not 0 <= spec.camera < self._model.ncam:
            raise ValueError(f"{spec.name}: camera {spec.camera} out of range (model has {self._model.ncam})")
        self._renderer: Any = None  # made on the first frame (see _render_frame)
        self.object_names = _tracked_names(physics, spec)
        self.body_names = list(self.object_names[:self._model.nbody - 1])
        self._objects = [_find_object(physics, name, spec.name) for name in spec.objects]  # (kind, id)

        action_spec = self._env.action_spec()
        self._action_low = action_spec.minimum.astype(np.float64)
        self._action_high = action_spec.maximum.astype(np.float64)
        size = spec.image_size
        self.observation_space = gym.spaces.Box(0, 255, (size, size, 3), np.uint8)
        self.action_space = gym.spaces.Box(-1.0, 1.0, action_spec.shape, np.float32)
        state_dim = sum(int(np.prod(v.shape)) for v in self._env.observation_spec().values())
        self.state_space = gym.spaces.Box(-np.inf, np.inf, (state_dim,), np.float32)  # info["state"]
        self._frame: np.ndarray | None = None
        self._control_steps = 0

    # -- gym API -----------------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self._env.task.random.seed(seed)
        elif self._control_steps == 0 and self._frame is None:
            self._env.task.random.seed(int(self.np_random.integers(2**31)))
        time_step = self._env.reset()
        self._control_steps = 0
        return self._render_frame(), self._info(time_step)

    def step(self, action: np.ndarray):
        action = np.asarray(action, dtype=np.float64)
        if action.shape != self.action_space.shape:
            raise ValueError(f"action shape {action.shape} != action space shape {self.action_space.shape}")
        scaled = self._action_low + (np.clip(action, -1.0, 1.0) + 1.0) * 0.5 * (self._action_high - self._action_low)
        reward = 0.0
        for _ in range(self.task_spec.action_repeat):
            time_step = self._env.step(scaled)
            reward += time_step.reward or 0.0
            self._control_steps += 1
            if time_step.last() or self._control_steps >= self.task_spec.episode_steps:
                break
        terminated = bool(time_step.last() and time_step.discount == 0.0)
        truncated = not terminated and (time_step.last() or self._control_steps >= self.task_spec.episode_steps)
        return self._render_frame(), float(reward), terminated, truncated, self._info(time_step)

    def render(self) -> np.ndarray | None:
        if self.render_mode != "rgb_array":
            return None
        return self._frame.copy() if self._frame is not None else self._render_frame()

    def close(self) -> None:
        if getattr(self, "_renderer", None) is not None:
            self._finalizer()  # closes the renderer (quietly) and detaches the finalizer
            self._renderer = None
        super().close()

    # -- helpers -----------------------------------------------------------------------------------------
    def _render_frame(self) -> np.ndarray:
        if self._renderer is None:
            # Made on first use: a process that only builds the env (as AsyncVectorEnv does before forking its
            # workers) holds no GL context, so its forked children can render; one forked after rendering would hang.
            global _RENDERING_PID
            if _RENDERING_PID not in (None, os.getpid()):
                raise RuntimeError(
                    f"{self.task_spec.name}: this process was forked from one that had already rendered, and its "
                    f"inherited EGL state would hang; start workers with 'spawn' or 'forkserver' "
                    f"(gymnasium.vector.AsyncVectorEnv(..., context='spawn'), SubprocVecEnv(..., "
                    f"start_method='spawn')), or build the vector env before rendering anything")
            _RENDERING_PID = os.getpid()
            import mujoco

            self._renderer = mujoco.Renderer(self._model, self.task_spec.image_size, self.task_spec.image_size)
            # An unclosed env's GL context is released when it is collected, else by our atexit hook, registered
            # after MuJoCo's eglTerminate hook so it runs first (weakref's exit hook may not: hence atexit=False).
            _OPEN_RENDERERS.add(self._renderer)
            self._finalizer = weakref.finalize(self, _close_quietly, self._renderer)
            self._finalizer.atexit = False
            if not _EXIT_HOOK:
                atexit.register(_close_open_renderers)
                _EXIT_HOOK.append(True)
            self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = self.task_spec.shadows
            self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = self.task_spec.reflections
        self._renderer.update_scene(self._data, camera=self.task_spec.camera)
        self._frame = self._renderer.render()
        return self._frame

    def body_pixels(self) -> np.ndarray:
        """(column, row) pixel coordinates of every non-world body in the current frame."""
        return self.object_pixels()[:len(self.body_names)]

    def object_pixels(self) -> np.ndarray:
        """(column, row) pixel coordinates of the tracked objects (``object_names``): every non-world body's
        centre of mass, then the task's non-body geoms / sites (their world position)."""
        size = self.task_spec.image_size
        matrix = camera_matrix(self._model, self._data, self.task_spec.camera, size, size)
        points = self._data.xipos[1:]
        if self._objects:
            positions = {"geom": self._data.geom_xpos, "site": self._data.site_xpos}
            points = np.concatenate([points, np.stack([positions[kind][i] for kind, i in self._objects])])
        return project_points(matrix, points)

    def _info(self, time_step: Any) -> dict[str, Any]:
        state = np.concatenate([np.asarray(v, np.float32).ravel() for v in time_step.observation.values()])
        pixels = self.object_pixels()
        return {
            "state": state,
            "physics": self._env.physics.get_state().astype(np.float32),
            "body_pixels": pixels[:len(self.body_names)],
            "object_pixels": pixels,
            "object_names": self.object_names,
            "discount": float(1.0 if time_step.discount is None else time_step.discount),
        }


def _tracked_names(physics: Any, spec: TaskSpec) -> tuple[str, ...]:
    """Every non-world body, in model order, then the spec's ``objects``."""
    return tuple(physics.model.id2name(i, "body") for i in range(1, physics.model.nbody)) + tuple(spec.objects)


def object_names(spec: TaskSpec) -> tuple[str, ...]:
    """The tracked objects of a task (the rows of ``info["object_pixels"]``), read from its model (no renderer)."""
    from dm_control import suite

    return _tracked_names(suite.load(spec.domain, spec.task, visualize_reward=False).physics, spec)


def _find_object(physics: Any, name: str, task: str) -> tuple[str, int]:
    """``("geom" | "site", id)`` of a catalog ``objects:`` entry (a geom of that name first, else a site)."""
    import mujoco

    for kind, obj in (("geom", mujoco.mjtObj.mjOBJ_GEOM), ("site", mujoco.mjtObj.mjOBJ_SITE)):
        index = mujoco.mj_name2id(physics.model.ptr, obj, name)
        if index >= 0:
            return kind, index
    raise ValueError(f"{task}: objects names {name!r}, which is no geom or site of the model")


def make_env(name: str, render_mode: str | None = None, **overrides: Any) -> DMCPixelEnv:
    """Build a catalog task by name or id; keyword arguments override spec fields (``image_size=84``)."""
    fields = {f.name for f in dataclasses.fields(TaskSpec)} - {"domain", "task"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"unknown environment option(s) {unknown}; expected some of {sorted(fields)}")
    return DMCPixelEnv(get_spec(name).replace(**overrides), render_mode=render_mode)


def register_envs() -> list[str]:
    """Register every catalog task with Gymnasium (idempotent); returns the ids."""
    ids = []
    for env_id, spec in load_catalog().items():
        if env_id not in gym.registry:
            gym.register(env_id, entry_point="kp_rl.envs:make_env", kwargs={"name": spec.name})
        ids.append(env_id)
    return ids
