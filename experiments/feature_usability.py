"""Does SAC learn from an observation as well as from the state it carries? A check for the keypoint agents' level.

The state probes (``experiments/state_probe.py``) find the true state readable from keypoints + VRNN belief (MLP
R² >= 0.94), yet SAC on those observations stays near 450 on cartpole-swingup where SAC on the state reaches ~840.
This runs SAC (the catalog's shared hyperparameters, ``agents/defaults.yaml``) on:
  * ``state``        : the true state (the oracle),
  * ``state+kpb``    : the state with a frozen model's keypoints + belief appended (184 more values on the ``cpu``
                       preset): if this reaches the oracle, the extra inputs do not hinder SAC and the keypoint
                       agent's gap is what its features leave out or make hard to use;
  * ``state+noise``  : the state with as many standard-normal values appended (fresh each step): what the width
                       alone costs;
  * ``kpb``          : the keypoints + belief alone (what ``sac-keypoints-belief`` sees, on the frozen model);
  * ``belief``       : the belief alone (the keypoints of the current frame left out).
The keypoints are what the wrappers give: ``(mu x, mu y, mu)`` since the runs named ``kpb-gated`` (made when this
script gated them itself, the wrappers giving the raw ``(x, y, mu)``) showed the gain; earlier ``kpb``, ``belief``
and ``state+kpb`` runs saw the raw keypoints.
``--trunk N`` puts a DrQ-v2-style trunk in front of SAC's networks (Linear to N, LayerNorm, tanh; trained by each
network's own loss): does a learned bottleneck let SAC ignore what it does not need? ``--pca N`` projects the
``kpb`` observation on its first N principal components (whitened; fitted on 40 episodes of ``data/<task>``,
random-policy data the agent did not collect: a diagnostic of width, not a counted recipe). ``--gradient-steps N``
makes N SAC updates per agent step instead of the catalog's 1. ``--sac KEY=VALUE`` sets any other SAC
hyperparameter, e.g. ``n_steps=3`` (N-step returns in the critics' targets, DrQ-v2's) or ``learning_rate=1e-3``.
``--layer-norm`` normalises every hidden layer of SAC's actor and critics (LayerNorm
without gain or bias, before the ReLU), a known remedy for critics that extrapolate badly on wide inputs (Ball et
al. 2023, RLPD).
``--augment KIND:SIZE`` perturbs every sampled batch's observations and next observations (each its own draw)
in SAC's updates, as DrQ shifts images: ``shift:S`` moves all keypoints of a sample by one offset drawn from
[-S, S]^2 (on the gated keypoints ``(mu x, mu y, mu)``: ``mu d`` added; the belief untouched), ``noise:A`` adds
Gaussian noise of A times each value's standard deviation in the batch: does a critic that cannot memorise the
features' jitter learn more from them?
Evaluation as ``kp-rl rl``: every ``--eval-every`` agent steps, 10 episodes, deterministic policy.

    python experiments/feature_usability.py --model pretrained:cartpole-swingup --seed 0

Writes ``<out>/<variant>-seed<seed>.json`` (returns against agent steps, wall-clock) and prints the finals.
"""

from __future__ import annotations

import argparse
import ast
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.type_aliases import ReplayBufferSamples

from kp_rl.agents import get_agent
from kp_rl.envs import get_spec
from kp_rl.files import write_json
from kp_rl.model import PerceptionModel, load
from kp_rl.wrappers import KeypointObservation

VARIANTS = ("state", "state+kpb", "state+noise", "kpb", "belief")


class Trunk(BaseFeaturesExtractor):
    """Linear -> LayerNorm -> tanh to ``features_dim`` values (DrQ-v2's trunk after its encoder)."""

    def __init__(self, observation_space: gym.spaces.Box, features_dim: int = 50) -> None:
        super().__init__(observation_space, features_dim)
        self.net = torch.nn.Sequential(torch.nn.Linear(observation_space.shape[0], features_dim),
                                       torch.nn.LayerNorm(features_dim), torch.nn.Tanh())

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return self.net(observations)


class LayerNormReLU(torch.nn.Module):
    """SB3's ``activation_fn`` slot (after every hidden Linear): LayerNorm without affine parameters, then ReLU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(torch.nn.functional.layer_norm(x, x.shape[-1:]))


class AugmentedReplayBuffer(ReplayBuffer):
    """SB3's replay buffer whose sampled observations and next observations are perturbed (``--augment``)."""

    def __init__(self, *args: Any, kind: str = "noise", size: float = 0.1, keypoint_values: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kind, self.size, self.keypoint_values = kind, size, keypoint_values

    def _perturb(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "noise":
            return x + self.size * x.std(0, keepdim=True) * torch.randn_like(x)
        keypoints = x[:, :self.keypoint_values].unflatten(1, (-1, 3))  # (B, K, (mu x, mu y, mu))
        offset = (torch.rand(len(x), 1, 2) * 2 - 1) * self.size
        moved = torch.cat([keypoints[..., :2] + keypoints[..., 2:] * offset, keypoints[..., 2:]], -1)
        return torch.cat([moved.flatten(1), x[:, self.keypoint_values:]], 1)

    def _get_samples(self, batch_inds: np.ndarray, env: Any = None) -> ReplayBufferSamples:
        samples = super()._get_samples(batch_inds, env)
        return samples._replace(observations=self._perturb(samples.observations),
                                next_observations=self._perturb(samples.next_observations))


class AppendState(gym.Wrapper):
    """Observation = the env's true state (``info["state"]``), then ``extra(observation)`` appended."""

    def __init__(self, env: gym.Env, extra: str, rng: np.random.Generator, width: int = 0) -> None:
        super().__init__(env)
        self.extra, self.rng = extra, rng
        state_dim = env.unwrapped.state_space.shape[0]
        self.width = {"features": env.observation_space.shape[0], "noise": width}.get(extra, 0)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (state_dim + self.width,), np.float32)

    def _observe(self, observation: Any, info: dict[str, Any]) -> np.ndarray:
        if self.extra == "features":
            tail = np.asarray(observation, np.float32)
        elif self.extra == "noise":
            tail = self.rng.standard_normal(self.width).astype(np.float32)
        else:
            tail = np.zeros(0, np.float32)
        return np.concatenate([np.asarray(info["state"], np.float32), tail])

    def reset(self, **kwargs: Any):
        observation, info = self.env.reset(**kwargs)
        return self._observe(observation, info), info

    def step(self, action: Any):
        observation, reward, terminated, truncated, info = self.env.step(action)
        return self._observe(observation, info), reward, terminated, truncated, info


class Project(gym.ObservationWrapper):
    """``(observation - mean) @ basis``: a fixed linear projection (PCA)."""

    def __init__(self, env: gym.Env, mean: np.ndarray, basis: np.ndarray) -> None:
        super().__init__(env)
        self.mean, self.basis = mean.astype(np.float32), basis.astype(np.float32)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (basis.shape[1],), np.float32)

    def observation(self, observation: np.ndarray) -> np.ndarray:
        return (observation - self.mean) @ self.basis


def pca(task: str, model: str | PerceptionModel, components: int,
        data: Path = Path("data")) -> tuple[np.ndarray, np.ndarray]:
    """Mean and whitened basis ``(dim, components)`` of the kpb observations of 40 episodes of ``data/<task>``."""
    from state_probe import observations

    from kp_rl.data import SequenceDataset
    from kp_rl.perception import Perception

    episodes = list(SequenceDataset(data / task, 1, split="all", keys=("image", "action")).episodes)[:40]
    x = np.concatenate(observations(Perception(model), episodes)["keypoints+belief"])
    mean = x.mean(0)
    _, singular, vt = np.linalg.svd(x - mean, full_matrices=False)
    return mean, vt[:components].T / (singular[:components] / np.sqrt(len(x)))


def make_env(task: str, variant: str, model: str | PerceptionModel, seed: int, width: int,
             projection: tuple[np.ndarray, np.ndarray] | None = None) -> gym.Env:
    from stable_baselines3.common.monitor import Monitor

    env = gym.make(get_spec(task).env_id)
    if variant in ("kpb", "belief"):
        env = perceiving = KeypointObservation(env, model, belief=True)
        env = Project(env, *projection) if projection is not None else env
        if variant == "belief":  # drop the current frame's keypoints: a projection on the belief's coordinates
            dim, features = env.observation_space.shape[0], perceiving.perception.model.feature_dim
            env = Project(env, np.zeros(dim), np.eye(dim)[:, features:])
    elif variant == "state+kpb":
        env = AppendState(KeypointObservation(env, model, belief=True), "features", np.random.default_rng(seed))
    else:
        env = AppendState(env, "noise" if variant == "state+noise" else "none", np.random.default_rng(seed), width)
    env = Monitor(env)
    env.reset(seed=seed)
    return env


def run(task: str, variant: str, model: str, seed: int, env_steps: int, eval_every: int, out: Path,
        trunk: int = 0, components: int = 0, gradient_steps: int = 1, layer_norm: bool = False,
        sac: dict[str, Any] | None = None, augment: str = "") -> dict:
    from stable_baselines3 import SAC
    from stable_baselines3.common.evaluation import evaluate_policy

    torch.set_num_threads(1)
    spec, agent = get_spec(task), get_agent("sac-state")
    loaded = load(model)  # once, shared by both envs' wrappers
    width = loaded.feature_dim + loaded.dynamics.belief_dim  # the keypoint + belief observation's
    projection = pca(task, loaded, components) if components and variant == "kpb" else None
    env = make_env(task, variant, loaded, seed, width, projection)
    eval_env = make_env(task, variant, loaded, seed + 1000, width, projection)
    policy_kwargs = dict(agent.policy_kwargs)
    if trunk:
        policy_kwargs.update(features_extractor_class=Trunk, features_extractor_kwargs={"features_dim": trunk})
    if layer_norm:
        policy_kwargs.update(activation_fn=LayerNormReLU)
    hyperparameters = {**agent.hyperparameters, "gradient_steps": gradient_steps, **(sac or {})}
    if augment:
        kind, size = augment.split(":")
        if kind not in ("shift", "noise") or (kind == "shift" and variant != "kpb"):
            raise ValueError(f"--augment: shift:S (variant kpb only) or noise:A, got {augment!r}")
        hyperparameters.update(replay_buffer_class=AugmentedReplayBuffer, replay_buffer_kwargs={
            "kind": kind, "size": float(size), "keypoint_values": loaded.feature_dim})
    algo = SAC("MlpPolicy", env, seed=seed, verbose=0, policy_kwargs=policy_kwargs, **hyperparameters)
    steps, curve = env_steps // spec.action_repeat, {"steps": [], "returns": [], "seconds": []}
    label = name(variant, trunk, components, gradient_steps, layer_norm, sac, augment)
    trained, seconds = 0, 0.0
    while trained < steps:
        chunk = min(eval_every, steps - trained)
        tick = time.perf_counter()
        algo.learn(chunk, reset_num_timesteps=False)
        seconds += time.perf_counter() - tick
        trained += chunk
        returns, _ = evaluate_policy(algo, eval_env, n_eval_episodes=10, deterministic=True, return_episode_rewards=True)
        curve["steps"].append(trained)
        curve["returns"].append(float(np.mean(returns)))
        curve["seconds"].append(round(seconds, 1))
        print(f"{label} seed {seed}: {trained} agent steps, return {np.mean(returns):.1f}", flush=True)
    result = {"task": task, "variant": variant, "trunk": trunk, "pca": components, "gradient_steps": gradient_steps,
              "layer_norm": layer_norm, "sac": sac or {}, "augment": augment, "keypoints_gated": True, "model": model,
              "seed": seed,
              "agent_steps": steps,
              "env_steps": steps * spec.action_repeat, "eval_episodes": 10, **curve}
    write_json(out / f"{label}-seed{seed}.json", result)
    return result


def name(variant: str, trunk: int, components: int = 0, gradient_steps: int = 1, layer_norm: bool = False,
         sac: dict[str, Any] | None = None, augment: str = "") -> str:
    return (variant + (f"-pca{components}" if components and variant == "kpb" else "")
            + (f"-trunk{trunk}" if trunk else "") + (f"-utd{gradient_steps}" if gradient_steps != 1 else "")
            + ("-ln" if layer_norm else "")
            + "".join(f"-{key}{value}" for key, value in sorted((sac or {}).items()))
            + (f"-aug{augment.replace(':', '')}" if augment else ""))


def _value(text: str) -> Any:
    """``"1e-3"`` -> 0.001, ``"2"`` -> 2, anything else (``"auto_0.1"``) as written."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="cartpole-swingup")
    parser.add_argument("--model", default="pretrained:cartpole-swingup", help="the frozen keypoint + VRNN model")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--env-steps", type=int, default=100_000)
    parser.add_argument("--eval-every", type=int, default=1250, help="agent steps")
    parser.add_argument("--trunk", type=int, default=0, help="a trunk of this width before SAC's networks (0: none)")
    parser.add_argument("--pca", type=int, default=0, help="kpb: project on this many principal components")
    parser.add_argument("--gradient-steps", type=int, default=1, help="SAC updates per agent step")
    parser.add_argument("--layer-norm", action="store_true", help="LayerNorm in SAC's hidden layers")
    parser.add_argument("--sac", nargs="+", default=[], metavar="KEY=VALUE",
                        help="other SAC hyperparameters instead of the catalog's, e.g. learning_rate=1e-3")
    parser.add_argument("--augment", default="", metavar="KIND:SIZE",
                        help="perturb sampled observations in SAC's updates: shift:S (keypoints) or noise:A")
    parser.add_argument("--out", type=Path, default=Path("results/structured_vs_unstructured_cpu/feature_usability"))
    args = parser.parse_args()
    sac = {key: _value(value) for key, value in (item.split("=", 1) for item in args.sac)}
    for variant in args.variants:
        label = name(variant, args.trunk, args.pca, args.gradient_steps, args.layer_norm, sac, args.augment)
        path = args.out / f"{label}-seed{args.seed}.json"
        if path.exists():
            print(f"{path} exists: skipped")
            continue
        run(args.task, variant, args.model, args.seed, args.env_steps, args.eval_every, args.out, args.trunk,
            args.pca, args.gradient_steps, args.layer_norm, sac, args.augment)


if __name__ == "__main__":
    main()
