"""Perception learned from the agent's own steps: every frame it trains on is an env step the agent took.

An online keypoint (or ``cnn-vrnn``) agent starts from an untrained perception model. SAC's random-action
warm-up (the schedule's ``prefix``) gives its first data; when it ends the autoencoder and the VRNN train on it
and the replay buffer is re-encoded, and again every ``refit_every`` agent steps on all frames seen so far. The
schedule is the ``perception:`` field of an agent's catalog entry (:class:`PerceptionSchedule`).

The run folder keeps what a resume needs: ``perception/episodes/``, ``perception/state.json`` (the replay
buffer's map to episode steps, fits done) and the training runs ``perception/autoencoder/`` and ``dynamics/``.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kp_rl.config import Config, get_preset
from kp_rl.data import FeatureSequences, encode_episodes, load_episode, save_episode
from kp_rl.files import read_json, write_json
from kp_rl.keypoints import preprocess_frames
from kp_rl.model import PerceptionModel, load
from kp_rl.train import fit, training_seconds

_KEYS = ("image", "action", "reward")  # what an online run keeps of each episode
__all__ = ["OnlinePerception", "PerceptionSchedule", "fit_perception", "shared_prefix"]


@dataclass(frozen=True)
class PerceptionSchedule:
    """When and how long the perception of an online agent trains (all counts in agent steps or gradient steps).

    Attributes:
        prefix: random-action agent steps before the first fit (the agent's ``learning_starts``).
        refit_every: agent steps between fits after the first (0: never refit).
        autoencoder_steps, dynamics_steps: gradient steps of the first fit.
        refit_autoencoder_steps, refit_dynamics_steps: gradient steps each refit adds (fine-tuning).
        preset: model sizes (``kp_rl.get_preset``); ``config``: overrides on top, e.g. ``{train: {cpu_amp: true}}``.
    """

    prefix: int = 1000
    refit_every: int = 0
    autoencoder_steps: int = 2000
    dynamics_steps: int = 3000
    refit_autoencoder_steps: int = 500
    refit_dynamics_steps: int = 1000
    preset: str = "cpu"
    config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "PerceptionSchedule":
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or set(data) - known:
            raise ValueError(f"{where}: perception must be a mapping with some of {sorted(known)}")
        schedule = cls(**data)
        for name in known - {"preset", "config"}:
            value, low = getattr(schedule, name), 1 if name == "prefix" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{where}: perception.{name} must be an integer >= {low}, got {value!r}")
        schedule.model_config()  # an unknown preset or override fails here
        return schedule

    def model_config(self) -> Config:
        return get_preset(self.preset).replace(**self.config)


def fit_perception(model: PerceptionModel, episodes: list[dict[str, np.ndarray]], schedule: PerceptionSchedule,
                   index: int, root: Path, progress: bool = False) -> None:
    """Fit ``index`` of the schedule: the autoencoder, then (if the model has one) the VRNN on its features, trained
    to their cumulative budgets in ``root/autoencoder`` and ``root/dynamics`` (which they resume). The fits draw
    from their own random stream (restored from their checkpoints): the caller's (the agent's) is left as it was."""
    device, config = next(model.parameters()).device, model.config
    ae_steps = schedule.autoencoder_steps + index * schedule.refit_autoencoder_steps  # cumulative budgets
    dyn_steps = schedule.dynamics_steps + index * schedule.refit_dynamics_steps
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        frames = FeatureSequences(episodes, config.train.sequence_length, keys=("image",))
        ae = model.autoencoder
        model.config = config.replace(train={"steps": ae_steps})
        model.train()
        fit(model, list(ae.parameters()), lambda batch, step: ae.loss(preprocess_frames(batch["image"])), frames,
            None, root / "autoencoder", steps=ae_steps, batch_size=config.train.batch_size, stage="autoencoder",
            l2_parameters=list(ae.l2_parameters()), progress=progress)
        model.eval()
        if (dynamics := model.dynamics) is not None:
            with torch.inference_mode():
                features = encode_episodes(model, episodes)
            data = FeatureSequences([{**e, "features": f} for e, f in zip(episodes, features)],
                                    config.dynamics.sequence_length)
            if index == 0:
                dynamics.set_reward_normalisation(*data.reward_statistics())
            model.config = config.replace(train={"dynamics_steps": dyn_steps})
            dynamics.train()
            fit(model, list(dynamics.parameters()),
                lambda batch, step: dynamics.loss(batch["features"], batch["action"], batch["reward"], step, dyn_steps),
                data, None, root / "dynamics", steps=dyn_steps, batch_size=config.train.dynamics_batch_size,
                stage="dynamics", progress=progress)
    model.config = config
    model.eval()


def shared_prefix(schedule: PerceptionSchedule, task: str, representation: str, belief: bool, out: Path,
                  progress: bool = False, env_kwargs: dict[str, Any] | None = None) -> Path:
    """A random-action prefix shared by every seed of a grid, and the first fit on it: ``out/episodes`` (a
    dataset of whole random-policy episodes, at least ``schedule.prefix`` agent steps, seed 0) and the perception
    runs ``out/autoencoder`` / ``out/dynamics``. Each agent started on it (``train_agent(perception_prefix=out)``)
    counts these steps in its budget and fine-tunes its own copy of the model. Resumable; returns ``out``."""
    from kp_rl.data import collect, episode_files
    from kp_rl.envs import get_spec

    spec = get_spec(task).replace(**(env_kwargs or {}))
    episodes = -(-schedule.prefix // spec.max_episode_steps)
    collect(task, out / "episodes", episodes, seed=0, progress=progress, env_kwargs=env_kwargs)
    recipe = dataclasses.asdict(schedule)
    if (out / "fit.json").exists():  # fitted: by this schedule (a prefix fitted before schedules were recorded: as is)
        fitted = read_json(out / "fit.json").get("schedule", recipe)
        if fitted != recipe:
            differ = sorted(k for k in recipe if fitted.get(k) != recipe[k])
            raise ValueError(f"{out} was fitted with another perception schedule ({', '.join(differ)} differ); "
                             f"delete it to fit this one")
        return out
    data = [load_episode(path, keys=_KEYS) for path in episode_files(out / "episodes")]
    action_dim = data[0]["action"].shape[-1]
    model = PerceptionModel(schedule.model_config(), representation, action_dim, with_dynamics=belief,
                            data_spec={"env_id": spec.env_id, "action_dim": action_dim, "online": True})
    histories = [out / stage / "history.json" for stage in ("autoencoder", "dynamics")]
    earlier = sum(training_seconds(read_json(h)) for h in histories if h.exists())  # an interrupted fit's sessions
    tick = time.perf_counter()
    fit_perception(model, data, schedule, 0, out, progress)
    write_json(out / "fit.json", {"agent_steps": sum(len(e["image"]) - 1 for e in data),
                                  "frames": sum(len(e["image"]) for e in data),
                                  "seconds": round(earlier + time.perf_counter() - tick, 1), "shared": True,
                                  "schedule": recipe})
    return out


class OnlinePerception:
    """Records every step of a one-env ``VecKeypointObservation`` and trains its model on the schedule.

    Driven by :func:`kp_rl.agents.train_agent` through an SB3 callback: :meth:`record` after every env step,
    :meth:`maybe_fit` after the step's transition is in the replay buffer, :meth:`save` with every agent
    checkpoint.

    Args:
        schedule: when and how long to train.
        out: the agent's run folder (``perception/`` inside it).
        wrapper: the training env's ``VecKeypointObservation``; its model is the one trained (in place: give the
            evaluation env's wrapper the same model object).
        progress: progress bars for the fits.
        prefix: a :func:`shared_prefix` folder; a fresh run starts after it (:meth:`start_from_prefix`).
    """

    def __init__(self, schedule: PerceptionSchedule, out: Path, wrapper: Any, progress: bool = False,
                 prefix: Path | None = None) -> None:
        if wrapper.num_envs != 1:
            raise ValueError(f"online perception records one env, got {wrapper.num_envs}")
        self.schedule, self.wrapper, self.progress = schedule, wrapper, progress
        self.root = out / "perception"
        self.model: PerceptionModel = wrapper.model
        self.belief = wrapper.belief
        state = read_json(self.root / "state.json") if (self.root / "state.json").exists() else {}
        self.fits: list[dict[str, Any]] = state.get("fits", [])
        self.buffer_map: dict[int, tuple[int, int]] = {int(k): tuple(v) for k, v in state.get("buffer_map", {}).items()}
        # episodes as the dataset convention stores them: action[t] led to image[t]; zeros at t = 0
        self.episodes: list[dict[str, np.ndarray]] = [
            load_episode(self._episode_file(i), keys=_KEYS) for i in range(state.get("episodes", 0))]
        self.current: dict[str, list] | None = None
        self.prefix = prefix  # a shared_prefix folder a fresh run starts from

    def start_from_prefix(self, prefix: Path, algo: Any) -> None:
        """A fresh run begins where a :func:`shared_prefix` ends: its episodes become this run's first ones (in
        the replay buffer, encoded by the prefix's model, and counted in ``algo.num_timesteps``), its perception
        runs are copied here for the refits to fine-tune."""
        import shutil

        from kp_rl.data import episode_files

        stages = [s for s in ("autoencoder", "dynamics") if (prefix / s).is_dir()]
        for stage in stages:
            shutil.copytree(prefix / stage, self.root / stage, dirs_exist_ok=True)
        self.model.load_state_dict(load(prefix / stages[-1]).state_dict())
        self.fits = [{k: v for k, v in read_json(prefix / "fit.json").items() if k != "schedule"}]
        buffer = algo.replay_buffer
        for path in episode_files(prefix / "episodes"):
            episode = load_episode(path, keys=_KEYS)
            self.episodes.append(episode)
            save_episode(self._episode_file(len(self.episodes) - 1), episode)
            observations, _ = self.observations(episode)
            last = len(episode["image"]) - 1
            for t in range(last):
                self.buffer_map[buffer.pos] = (len(self.episodes) - 1, t)
                buffer.add(observations[t:t + 1], observations[t + 1:t + 2], episode["action"][t + 1][None],
                           episode["reward"][t + 1:t + 2], np.array([t + 1 == last]),
                           [{"TimeLimit.truncated": t + 1 == last}])
        algo.num_timesteps = sum(len(e["image"]) - 1 for e in self.episodes)

    def _episode_file(self, index: int) -> Path:
        return self.root / "episodes" / f"episode-{index:06d}.npz"

    def start(self, frame: np.ndarray) -> None:
        """The first frame of an episode (after a reset)."""
        self.current = {"image": [frame], "action": [np.zeros(self.model.action_dim, np.float32)], "reward": [0.0]}

    def record(self, action: np.ndarray, reward: float, frame: np.ndarray, buffer_pos: int, done: bool,
               reset_frame: np.ndarray | None) -> None:
        """One env step: the action taken, its reward, the frame it led to (the terminal one at an episode's
        end, then ``reset_frame`` starts the next); the transition goes to replay-buffer row ``buffer_pos``."""
        assert self.current is not None, "start() before record()"
        self.buffer_map[buffer_pos] = (len(self.episodes), len(self.current["image"]) - 1)
        self.current["image"].append(frame)
        self.current["action"].append(np.asarray(action, np.float32).reshape(-1))
        self.current["reward"].append(float(reward))
        if done:
            self.episodes.append(self._finish(self.current))
            save_episode(self._episode_file(len(self.episodes) - 1), self.episodes[-1])
            self.start(reset_frame)

    @staticmethod
    def _finish(episode: dict[str, list]) -> dict[str, np.ndarray]:
        return {"image": np.stack(episode["image"]).astype(np.uint8), "action": np.stack(episode["action"]),
                "reward": np.asarray(episode["reward"], np.float32)}

    def save(self) -> tuple[Path, Path]:
        """Persist what a resume needs (called with every agent checkpoint): the episode in progress is kept as a
        finished one (a resumed agent starts a new episode), with the replay buffer's map to episode steps. The
        state is written under a temporary name: returns ``(temporary, final)`` for the caller to rename when the
        rest of its checkpoint is written."""
        episodes = len(self.episodes)
        if self.current is not None and len(self.current["image"]) > 1:
            save_episode(self._episode_file(episodes), self._finish(self.current))
            episodes += 1
        staged = self.root / ".state.tmp.json", self.root / "state.json"
        write_json(staged[0], {"episodes": episodes, "fits": self.fits,
                               "buffer_map": {str(k): list(v) for k, v in self.buffer_map.items()}})
        return staged

    def maybe_fit(self, agent_steps: int, algo: Any) -> bool:
        """Fit when the schedule says so (fit n at ``prefix + n * refit_every`` agent steps; only the first if
        ``refit_every`` is 0); then re-encode ``algo``'s replay buffer and its last observation."""
        n, schedule = len(self.fits), self.schedule
        if agent_steps < schedule.prefix + n * schedule.refit_every or (n and not schedule.refit_every):
            return False
        tick = time.perf_counter()
        current = self._finish(self.current)
        episodes = self.episodes + ([current] if len(current["image"]) > 1 else [])
        fit_perception(self.model, episodes, self.schedule, len(self.fits), self.root, self.progress)
        fitted = time.perf_counter()
        self.reencode(algo, current)
        self.fits.append({"agent_steps": agent_steps, "frames": int(sum(len(e["image"]) for e in episodes)),
                          "seconds": round(time.perf_counter() - tick, 1),
                          "reencode_seconds": round(time.perf_counter() - fitted, 1)})
        return True

    def observations(self, episode: dict[str, np.ndarray]) -> tuple[np.ndarray, Any]:
        """Every step's observation as the wrapper gives it (features, + the belief when the agent has one), and
        the belief after the last step."""
        return self.wrapper.perception.replay(episode["image"], episode["action"], self.belief)

    def reencode(self, algo: Any, current: dict[str, np.ndarray]) -> None:
        """Replace the replay buffer's observations, the agent's last observation and the wrapper's belief with
        the new model's (``current``: the episode in progress, stacked)."""
        observations = [self.observations(e)[0] for e in self.episodes]
        latest, state = self.observations(current)
        observations.append(latest)
        # SB3 keeps the observation the next action is chosen from in _last_obs (no public setter)
        algo._last_obs = latest[-1:].copy()  # noqa: SLF001
        if self.belief:
            self.wrapper.perception.state = state
        buffer = algo.replay_buffer
        for row, (e, t) in self.buffer_map.items():
            buffer.observations[row, 0] = observations[e][t]
            buffer.next_observations[row, 0] = observations[e][t + 1]
