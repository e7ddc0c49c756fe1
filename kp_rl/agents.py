"""SB3 agents from the ``agents/*.yaml`` catalog, for every observation kind, with evaluation and resume.

Observation kinds: ``keypoints``, ``keypoints+belief`` (+ VRNN belief), ``cnn-vrnn`` (the unstructured
baseline's latent + belief), ``pixels`` and ``state`` (oracle). :func:`train_agent` writes ``agent.zip`` (+
``replay_buffer.pkl`` for off-policy agents), ``curve.json`` and TensorBoard logs to its run directory.

Example:
    >>> spec = get_agent("sac-state")
    >>> spec.algo, spec.observation, spec.policy
    ('SAC', 'state', 'MlpPolicy')
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np

from kp_rl.envs import catalog_dir
from kp_rl.files import read_json, read_yaml, write_json
from kp_rl.runs import check_output_dir, check_run, checkpoint_hash, start_run

if TYPE_CHECKING:
    from kp_rl.online import PerceptionSchedule

OBSERVATION_KINDS = ("keypoints", "keypoints+belief", "cnn-vrnn", "pixels", "state")
ALGOS = ("SAC", "PPO")
AUGMENTATIONS = ("none", "random-shift")
DEFAULTS_FILE = "defaults.yaml"  # in the catalog folder: what every agent of an algorithm shares


class UnknownAgentError(ValueError):
    """The agent name is not in the catalog."""


@dataclass(frozen=True)
class AgentSpec:
    """One catalog entry: algorithm, observation kind, policy and hyperparameters."""

    name: str
    algo: str
    observation: str
    policy: str = "MlpPolicy"  # an SB3 policy name, or DrQCnnPolicy (kp_rl.sb3: SAC on pixels, one encoder)
    model: str = "none"  # none | autoencoder | dynamics: what --model must provide
    frame_stack: int = 1
    n_envs: int = 1
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    policy_kwargs: dict[str, Any] = field(default_factory=dict)
    augmentation: str = "none"  # random-shift: DrQ-style shifts of sampled pixel batches (SAC on pixels)
    # keypoint / cnn-vrnn agents run without --model: perception learned from their own steps on this schedule
    # (kp_rl.online.PerceptionSchedule fields)
    perception: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        for name, allowed in (("algo", ALGOS), ("observation", OBSERVATION_KINDS), ("augmentation", AUGMENTATIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"agent {self.name}: {name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.frame_stack < 1 or self.n_envs < 1:
            raise ValueError(f"agent {self.name}: frame_stack and n_envs must be >= 1")
        if self.augmentation != "none" and (self.algo != "SAC" or self.observation != "pixels"):
            raise ValueError(f"agent {self.name}: augmentation {self.augmentation!r} is for SAC on pixels")
        if self.policy == "DrQCnnPolicy" and (self.algo != "SAC" or self.observation != "pixels"):
            raise ValueError(f"agent {self.name}: policy DrQCnnPolicy is for SAC on pixels")
        if self.perception is not None:
            if not self.needs_model or self.algo != "SAC" or self.n_envs != 1 or self.frame_stack != 1:
                raise ValueError(f"agent {self.name}: a perception schedule is for SAC keypoint / cnn-vrnn agents "
                                 f"on one env without frame stacking")
            self.schedule  # noqa: B018  (its fields are checked here)

    @property
    def schedule(self) -> "PerceptionSchedule | None":
        """The online perception schedule (None: the agent needs a trained ``--model``)."""
        from kp_rl.online import PerceptionSchedule

        return None if self.perception is None else PerceptionSchedule.from_dict(self.perception, f"agent {self.name}")

    @property
    def needs_model(self) -> bool:
        return self.observation in ("keypoints", "keypoints+belief", "cnn-vrnn")


def agents_dir() -> Path:
    """``$KP_RL_AGENTS``, the source tree's ``agents/`` or the installed copy."""
    return catalog_dir("agents")


def _shared(folder: Path) -> dict[str, dict[str, Any]]:
    """``defaults.yaml`` of the catalog: per algorithm the hyperparameters and policy_kwargs all agents share."""
    path = folder / DEFAULTS_FILE
    data = read_yaml(path) if path.is_file() else {}
    if not isinstance(data, dict) or set(data) - set(ALGOS):
        raise ValueError(f"{path}: expected a mapping of {ALGOS} to hyperparameters / policy_kwargs")
    return data


def _spec(path: Path, data: Any, shared: dict[str, dict[str, Any]]) -> AgentSpec:
    """An agent file's spec on top of the shared defaults of its algorithm (which it may add to, not change)."""
    known = {f.name for f in dataclasses.fields(AgentSpec)} - {"name"}
    if not isinstance(data, dict) or not {"algo", "observation"} <= set(data) or set(data) - known:
        raise ValueError(f"{path}: expected a mapping with algo, observation and some of {sorted(known)}")
    data = {k: v if v is not None else {} for k, v in data.items()}
    base = shared.get(data["algo"], {})
    for section in ("hyperparameters", "policy_kwargs"):
        common, own = base.get(section) or {}, data.get(section) or {}
        changed = sorted(k for k in own if k in common and own[k] != common[k])
        if changed:
            raise ValueError(f"{path}: {section} {changed} differ from the {data['algo']} values every agent shares "
                             f"({path.parent / DEFAULTS_FILE}); change them there, for all agents")
        data[section] = {**common, **own}
    return AgentSpec(name=path.stem, **data)


def load_agent_catalog() -> dict[str, AgentSpec]:
    folder = agents_dir()
    shared = _shared(folder)
    return {path.stem: _spec(path, read_yaml(path), shared) for path in sorted(folder.glob("*.yaml"))
            if path.name != DEFAULTS_FILE}


def get_agent(name: str | Path) -> AgentSpec:
    """An agent by catalog name (``sac-keypoints``) or by path to a YAML file of the same form."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise UnknownAgentError(f"agent file not found: {path}")
        return _spec(path, read_yaml(path), _shared(agents_dir()))
    catalog = load_agent_catalog()
    if str(name) not in catalog:
        raise UnknownAgentError(f"unknown agent {str(name)!r}; known agents: {', '.join(sorted(catalog))}")
    return catalog[str(name)]


def make_vec_env(env_id: str, spec: AgentSpec, model: Any = None, n_envs: int | None = None, seed: int = 0,
                 device: str = "cpu", env_kwargs: dict[str, Any] | None = None):
    """The SB3 VecEnv an agent of ``spec`` trains on: Monitor-wrapped envs (true returns) + perception.

    Args:
        env_id: a Gymnasium id whose observations are pixels (e.g. ``kp_rl/cartpole-swingup-v0``).
        spec: the agent spec (observation kind, frame stack, n_envs).
        model: PerceptionModel or checkpoint path, for the keypoint and cnn-vrnn kinds.
    """
    from kp_rl.model import load

    if spec.needs_model and model is None:
        raise ValueError(f"agent {spec.name} ({spec.observation}) needs --model: a trained kp-rl run")
    if isinstance(model, (str, Path)):
        model = load(model, device=device, representation="cnn" if spec.observation == "cnn-vrnn" else "keypoints",
                     require_dynamics=spec.observation != "keypoints")
    return _perceiving(_monitored_envs(env_id, spec, n_envs or spec.n_envs, seed, env_kwargs), spec, model, device)


def _monitored_envs(env_id: str, spec: AgentSpec, n_envs: int, seed: int, env_kwargs: dict[str, Any] | None):
    """Monitor-wrapped envs seeded ``seed``, ``seed + 1``, ...; the oracle's observe their state."""
    from stable_baselines3.common.monitor import Monitor
    from stable_baselines3.common.vec_env import DummyVecEnv

    from kp_rl.wrappers import StateObservation

    def make(rank: int) -> gym.Env:
        env = gym.make(env_id, **(env_kwargs or {}))
        env = Monitor(StateObservation(env) if spec.observation == "state" else env)
        env.reset(seed=seed + rank)
        return env

    venv = DummyVecEnv([functools.partial(make, i) for i in range(n_envs)])
    venv.seed(seed)
    return venv


def _perceiving(venv: Any, spec: AgentSpec, model: Any, device: str):
    """``venv`` seen through ``model`` (keypoint and cnn-vrnn kinds), frame-stacked as ``spec`` says."""
    from stable_baselines3.common.vec_env import VecFrameStack

    from kp_rl.wrappers import VecKeypointObservation

    if spec.needs_model:
        venv = VecKeypointObservation(venv, model, belief=spec.observation != "keypoints", device=device)
    return VecFrameStack(venv, spec.frame_stack) if spec.frame_stack > 1 else venv


def build_agent(spec: AgentSpec, venv: Any, seed: int = 0, tensorboard_log: str | None = None,
                device: str = "cpu"):
    import stable_baselines3 as sb3

    algo = getattr(sb3, spec.algo)
    extra: dict[str, Any] = {}
    if spec.augmentation == "random-shift":
        from kp_rl.sb3 import RandomShiftReplayBuffer

        extra["replay_buffer_class"] = RandomShiftReplayBuffer
    policy: Any = spec.policy
    if policy == "DrQCnnPolicy":  # ours (kp_rl.sb3); other names are SB3's
        from kp_rl.sb3 import DrQCnnPolicy as policy

        if spec.augmentation == "random-shift":  # images normalised once per sample, not by each network
            extra["replay_buffer_kwargs"] = {"normalize_images": True}
    try:
        return algo(policy, venv, seed=seed, tensorboard_log=tensorboard_log, device=device, verbose=0,
                    policy_kwargs=dict(spec.policy_kwargs), **spec.hyperparameters, **extra)
    except TypeError as exc:  # an unknown hyperparameter or policy keyword of the agent's YAML
        raise ValueError(f"agent {spec.name}: {spec.algo} rejects its hyperparameters / policy_kwargs: {exc}") from exc


def _read_curve(out: Path) -> dict[str, Any] | None:
    try:
        curve = read_json(out / "curve.json")
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None
    return curve if isinstance(curve, dict) else None


def _finished(curve: dict[str, Any] | None, steps: int) -> bool:
    """Whether ``curve`` is of a run that finished a budget of ``steps`` agent steps."""
    return bool(curve and curve.get("done") and curve.get("budget") == steps)


def finished_curve(out: str | Path, steps: int) -> dict[str, Any] | None:
    """The learning curve of a run in ``out`` that finished ``steps`` agent steps, else None (nothing loaded)."""
    curve = _read_curve(Path(out))
    return curve if _finished(curve, steps) else None


def train_agent(env_id: str, agent: str | AgentSpec, steps: int, out: str | Path, seed: int | None = None,
                model: Any = None, eval_every: int | None = None, eval_episodes: int | None = None,
                device: str = "cpu", checkpoint_every: int = 10_000, env_kwargs: dict[str, Any] | None = None,
                progress: bool = True, perception_prefix: str | Path | None = None) -> dict[str, Any]:
    """Train an agent for ``steps`` agent steps with periodic evaluation; resumes the run in ``out``.

    ``out/run.json`` records what the run is (:mod:`kp_rl.runs`); a folder that holds another run is refused
    before anything is written. A finished run returns its curve; a bigger ``steps`` extends it, a smaller one
    than it trained is refused. Evaluation is SB3's ``EvalCallback`` (deterministic policy, separate env): it
    writes ``out/evaluations.npz`` and ``out/best_model.zip`` and logs ``eval/*`` to TensorBoard (``out/tb``).

    Args:
        seed: None: the run's recorded seed (0 for a new run).
        model: the perception model or checkpoint of keypoint / cnn-vrnn agents; None on a resume: the recorded
            one; None for an agent with a perception schedule: learned from its own steps (:mod:`kp_rl.online`).
        eval_every: agent steps between evaluations (and one at the budget); None: the run's (5000 for a new run).
        eval_episodes: episodes per evaluation; None: the run's (5 for a new run; a resume cannot change it).
        checkpoint_every: agent steps between checkpoints of the agent, its replay buffer and the curve.
        perception_prefix: a :func:`kp_rl.online.shared_prefix` folder an online agent starts after (its steps
            count in the budget).

    Returns:
        The learning curve (also in ``out/curve.json``): ``steps``, ``seconds`` (wall-clock spent training,
        evaluation excluded, summed over resumed sessions), ``returns`` (mean eval return), ``returns_std``,
        ``budget`` (the ``steps`` asked for), ``agent_steps`` (trained at the last checkpoint), ``done``, and when
        done ``machine`` (:func:`kp_rl.bench.machine` of the one it finished on: its last seconds are that one's).
    """
    from kp_rl.model import checkpoint_file, resolve_device

    spec = agent if isinstance(agent, AgentSpec) else get_agent(agent)
    for name, value in (("steps", steps), ("eval_every", eval_every), ("eval_episodes", eval_episodes),
                        ("checkpoint_every", checkpoint_every)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if model is not None and not spec.needs_model:
        raise ValueError(f"agent {spec.name} ({spec.observation} observations) takes no model; drop --model")
    device = str(resolve_device(device))
    out = check_output_dir(out)
    previous = _read_curve(out)
    found = previous and {"command": "rl", "stage": "agent", **{k: previous.get(k) for k in ("agent", "env_id", "seed")}}
    model_file = checkpoint_file(model).resolve() if isinstance(model, (str, Path)) else None
    schedule = spec.schedule if model is None else None  # no model: perception learned online (kp_rl.online)
    identity = {"command": "rl", "stage": "agent", "agent": spec.name, "algo": spec.algo, "policy": spec.policy,
                "augmentation": spec.augmentation, "observation": spec.observation, "env_id": env_id, "seed": seed,
                "env_kwargs": env_kwargs or None, "model": str(model_file) if model_file else None,
                "model_sha256": checkpoint_hash(model_file) if model_file else None,
                "perception": dataclasses.asdict(schedule) if schedule else None,
                "perception_prefix": str(Path(perception_prefix).resolve()) if schedule and perception_prefix else None}
    recorded = check_run(out, identity, found) or {}
    seed = identity["seed"] = recorded.get("seed", 0) if seed is None else seed
    if model is None and spec.needs_model and recorded.get("model"):  # resume on the model the run was built on
        model, schedule = recorded["model"], None
        identity.update(model=model, model_sha256=checkpoint_hash(model), perception=None)
        check_run(out, identity, found)
    evaluated = (previous or {}).get("eval_episodes")
    if eval_episodes is not None and evaluated is not None and eval_episodes != evaluated:
        raise ValueError(f"{out} evaluates with {evaluated} episodes, not {eval_episodes}; resume it with its own "
                         f"count or choose another output folder")
    eval_episodes = eval_episodes or evaluated or 5
    if _finished(previous, steps):
        if eval_every is not None and previous.get("eval_every", eval_every) != eval_every:
            raise ValueError(f"{out} finished with an evaluation every {previous['eval_every']} agent steps, not "
                             f"{eval_every}; a bigger --steps continues on the new schedule")
        return previous
    eval_every = eval_every or (previous or {}).get("eval_every", 5000)
    trained = previous.get("agent_steps", 0) if previous else 0
    if steps < trained:
        raise ValueError(f"{out} has trained {trained} agent steps, more than the {steps} asked for; "
                         f"ask for {trained} or more to extend it")
    venv = eval_env = online = None
    try:
        if schedule is None:
            venv = make_vec_env(env_id, spec, model, seed=seed, device=device, env_kwargs=env_kwargs)
        else:  # the model an online agent starts from is shaped by its env
            from kp_rl.online import OnlinePerception

            venv = _monitored_envs(env_id, spec, spec.n_envs, seed, env_kwargs)
            model = _online_model(env_id, spec, schedule, out, venv)
            venv = _perceiving(venv, spec, model, device)
            online = OnlinePerception(schedule, out, venv, progress=progress,
                                      prefix=Path(perception_prefix) if perception_prefix else None)
        eval_env = make_vec_env(env_id, spec, model, n_envs=1, seed=seed + 10_000, device=device,
                                env_kwargs=env_kwargs)
        return _train(spec, venv, eval_env, steps, out, identity, found, seed, eval_every, eval_episodes, device,
                      checkpoint_every, progress, previous if (out / "agent.zip").exists() else None, online)
    finally:
        for env in (venv, eval_env):
            if env is not None:
                env.close()


def _online_model(env_id: str, spec: AgentSpec, schedule: "PerceptionSchedule", out: Path, venv: Any) -> Any:
    """The perception model an online agent on ``venv`` starts from: its latest fit on a resume, else untrained."""
    from kp_rl.model import PerceptionModel, load
    from kp_rl.train import MODEL_FILE

    action_dim, shape = gym.spaces.flatdim(venv.action_space), list(venv.observation_space.shape)
    size = schedule.model_config().keypoints.image_size
    if shape[:2] != [size, size]:
        raise ValueError(f"agent {spec.name}: {env_id} gives {shape[0]}x{shape[1]} frames, its perception preset "
                         f"{schedule.preset!r} expects {size}x{size}")
    belief = spec.observation != "keypoints"
    fitted = out / "perception" / ("dynamics" if belief else "autoencoder") / MODEL_FILE
    if fitted.exists():
        return load(fitted)
    return PerceptionModel(schedule.model_config(), "cnn" if spec.observation == "cnn-vrnn" else "keypoints",
                           action_dim, with_dynamics=belief,
                           data_spec={"env_id": env_id, "image_shape": shape, "action_dim": action_dim,
                                      "online": True}).eval()


def _size_replay_buffer(buffer: Any, transitions: int) -> None:
    """Give an SB3 replay buffer room for ``transitions`` (a run never stores more than its budget): its arrays are
    cut or grown, what they hold kept (SB3 allocates, and a checkpoint pickles, the whole ``buffer_size``)."""
    size = max(-(-transitions // buffer.n_envs), 1)
    held = buffer.buffer_size if buffer.full else buffer.pos
    if buffer.buffer_size == size or held > size or (buffer.full and buffer.pos):  # the last: it has evicted
        return
    for name in ("observations", "next_observations", "actions", "rewards", "dones", "timeouts"):
        old = getattr(buffer, name, None)
        if isinstance(old, np.ndarray):
            new = np.zeros((size, *old.shape[1:]), old.dtype)
            new[:held] = old[:held]
            setattr(buffer, name, new)
    buffer.buffer_size, buffer.pos, buffer.full = size, held % size, held == size


def _check_checkpoint(out: Path, algo: Any, curve: dict[str, Any]) -> None:
    """Refuse to resume from a torn checkpoint: an agent saved at other agent steps than its curve."""
    saved = curve.get("agent_steps", algo.num_timesteps)
    if algo.num_timesteps != saved:
        raise ValueError(f"{out} holds a torn checkpoint (the agent at {algo.num_timesteps} agent steps, its curve "
                         f"at {saved}); delete the folder to rerun the run")


def _train(spec: AgentSpec, venv: Any, eval_env: Any, steps: int, out: Path, identity: dict[str, Any],
           found: dict[str, Any] | None, seed: int, eval_every: int, eval_episodes: int, device: str,
           checkpoint_every: int, progress: bool, previous: dict[str, Any] | None,
           online: Any = None) -> dict[str, Any]:
    """:func:`train_agent` once its envs exist (they are closed by the caller); ``online``: a
    :class:`~kp_rl.online.OnlinePerception` training the envs' perception model on its schedule."""
    from stable_baselines3.common.callbacks import BaseCallback, CallbackList, EvalCallback
    from tqdm.auto import tqdm

    curve_path, agent_path, buffer_path = out / "curve.json", out / "agent.zip", out / "replay_buffer.pkl"
    curve: dict[str, Any] = {"env_id": identity["env_id"], "agent": spec.name, "seed": seed, "steps": [],
                             "seconds": [], "returns": [], "returns_std": [], "done": False}
    if previous is not None:
        import stable_baselines3 as sb3

        curve = previous
        algo = getattr(sb3, spec.algo).load(agent_path, env=venv, device=device, tensorboard_log=str(out / "tb"))
        if buffer_path.exists() and hasattr(algo, "load_replay_buffer"):
            algo.load_replay_buffer(buffer_path)
        _check_checkpoint(out, algo, curve)
    else:
        algo = build_agent(spec, venv, seed=seed, tensorboard_log=str(out / "tb"), device=device)
        if online is not None:  # the random-action prefix is the SAC warm-up: nothing learns before the first fit
            algo.learning_starts = max(algo.learning_starts, online.schedule.prefix)
            if online.prefix is not None:  # the prefix was taken (shared with other runs): start after it
                online.start_from_prefix(online.prefix, algo)
    if hasattr(algo, "replay_buffer"):  # off-policy: room for the run's budget, at most the algorithm's buffer_size
        _size_replay_buffer(algo.replay_buffer, min(algo.buffer_size, steps))
    curve.update(budget=steps, eval_every=eval_every, eval_episodes=eval_episodes, done=False)
    start_run(out, identity, found)  # the work starts: the folder and its run.json exist from here on

    def save() -> None:
        """A checkpoint: every part written under a temporary name first, then all renamed into place, so that a run
        stopped while saving keeps its previous checkpoint whole (not a newer agent beside an older buffer)."""
        staged = [(out / ".agent.tmp.zip", agent_path)]
        algo.save(staged[0][0])
        if hasattr(algo, "save_replay_buffer"):
            staged.append((out / ".replay_buffer.tmp.pkl", buffer_path))
            algo.save_replay_buffer(staged[-1][0])
        curve["agent_steps"] = int(algo.num_timesteps)
        if online is not None:
            staged.append(online.save())
            curve["perception_fits"] = online.fits
        staged.append((out / ".curve.tmp.json", curve_path))
        write_json(staged[-1][0], curve)
        for tmp, final in staged:
            tmp.replace(final)

    clock = {"start": time.perf_counter(), "spent": curve["seconds"][-1] if curve["seconds"] else 0.0}
    bar = tqdm(total=steps, initial=algo.num_timesteps, unit="step", desc=f"rl {spec.name}", disable=not progress)

    class Evaluation(EvalCallback):
        """SB3's EvalCallback on an agent-step schedule (every ``eval_every`` steps and at the budget), with the
        progress bar and the checkpoints."""

        def _on_step(self) -> bool:
            n, num_envs = self.num_timesteps, self.training_env.num_envs
            bar.update(num_envs)
            if n % eval_every < num_envs or n >= steps:
                clock["spent"] += time.perf_counter() - clock["start"]  # evaluation is not training time
                super()._on_step()  # eval_freq=1: evaluates on every call it gets
                episodes = self.evaluations_results[-1]
                curve["steps"].append(int(n))
                curve["seconds"].append(round(clock["spent"], 2))
                curve["returns"].append(float(np.mean(episodes)))
                curve["returns_std"].append(float(np.std(episodes)))
                bar.set_postfix(ret=f"{curve['returns'][-1]:.1f}")
                clock["start"] = time.perf_counter()
            if n % checkpoint_every < num_envs:
                save()
            return n < steps  # on-policy algorithms would otherwise finish their rollout past the budget

    evaluation = Evaluation(eval_env, n_eval_episodes=eval_episodes, eval_freq=1, log_path=str(out),
                            best_model_save_path=str(out), deterministic=True, verbose=0)
    if (out / "evaluations.npz").exists() and curve["steps"]:  # resume SB3's record where it stopped
        with np.load(out / "evaluations.npz") as record:
            kept = record["timesteps"] <= curve["steps"][-1]
            evaluation.evaluations_timesteps = record["timesteps"][kept].tolist()
            evaluation.evaluations_results = record["results"][kept].tolist()
            evaluation.evaluations_length = record["ep_lengths"][kept].tolist()
        evaluation.best_mean_reward = max(curve["returns"])

    class Online(BaseCallback):
        """Every step to the online perception; its fits when the schedule says (the step's transition stored)."""

        def _on_training_start(self) -> None:
            online.start(venv.last_frames[0])

        def _on_step(self) -> bool:
            done = bool(self.locals["dones"][0])
            online.record(self.locals["actions"][0], float(self.locals["rewards"][0]),
                          venv.last_terminal_frames[0] if done else venv.last_frames[0], algo.replay_buffer.pos,
                          done, venv.last_frames[0] if done else None)
            return True

        def _on_rollout_end(self) -> None:
            online.maybe_fit(self.num_timesteps, algo)

    from kp_rl.bench import machine
    from kp_rl.train import STAGE_THREADS, torch_threads

    remaining = steps - algo.num_timesteps
    callbacks = ([Online()] if online is not None else []) + [evaluation]
    with torch_threads(STAGE_THREADS["agent"]):
        algo.learn(remaining, callback=CallbackList(callbacks), reset_num_timesteps=False, tb_log_name="sb3")
    bar.close()
    curve.update(done=True, machine=machine())
    save()
    return curve
