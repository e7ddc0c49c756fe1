"""Struct-VRNN dynamics: a variational RNN over flat feature vectors, with action input and a reward head.

The same class serves the structured model (features = keypoints flattened to ``K*3``) and the unstructured
CNN-VRNN baseline (features = a flat CNN latent): only ``feature_dim`` differs.

Time convention (aligned arrays, Dreamer-style): ``features[:, t]`` is the observation at step ``t``,
``actions[:, t]`` the action taken *before* observation ``t`` (zeros at the start of an episode) and
``rewards[:, t]`` the reward received together with observation ``t``. Step ``t`` of the recurrence::

    h_t  = GRU(h_{t-1}, [x_{t-1}, z_{t-1}, a_t])        # h_{-1} = 0, x_{-1} = 0, z_{-1} = 0
    p(z_t | h_t)                                          # prior
    q(z_t | h_t, x_t)                                     # posterior (observed steps)
    x̂_t = tanh(f(h_t, z_t)),   r̂_t = g(h_t, z_t)         # feature decoder, reward head

Features must be passed in **detached** (keypoints enter the dynamics with stop-gradient, so vision and
dynamics train together with separate gradients); nothing is detached here.

    >>> import torch
    >>> from kp_rl.config import DynamicsConfig
    >>> cfg = DynamicsConfig(rnn_units=16, latent_dim=4, prior_hidden=8, posterior_hidden=8, decoder_hidden=8,
    ...                      reward_hidden=8, observed_steps=3, predicted_steps=2, num_samples=4)
    >>> vrnn = KeypointVRNN(cfg, feature_dim=6, action_dim=1)
    >>> features, actions, rewards = torch.rand(2, 5, 6), torch.zeros(2, 5, 1), torch.rand(2, 5)
    >>> loss, info = vrnn.loss(features, actions, rewards, step=0, total_steps=100)
    >>> loss.shape, sorted(info)[:3]
    (torch.Size([]), ['coord_observed', 'coord_predicted', 'kl'])
    >>> state = vrnn.initial_state(2)
    >>> state, out = vrnn.observe_step(state, features[:, 0], actions[:, 0])
    >>> vrnn.belief(state).shape                          # (B, rnn_units + latent_dim)
    torch.Size([2, 20])
    >>> imagined, imagined_rewards = vrnn.imagine(state, torch.zeros(2, 7, 1), num_samples=3)
    >>> imagined.shape, imagined_rewards.shape
    (torch.Size([3, 2, 7, 6]), torch.Size([3, 2, 7]))
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kp_rl.config import DynamicsConfig
from kp_rl.losses import best_of_many, kl_divergence

__all__ = ["KeypointVRNN", "VRNNState", "StepOutput"]


class VRNNState(NamedTuple):
    """Recurrent state after step ``t``: GRU state ``h (B, H)``, latent ``z (B, Z)``, last features ``x (B, D)``.

    ``x`` is what the next step feeds to the GRU (the true observation after :meth:`KeypointVRNN.observe_step`,
    the model's own prediction during :meth:`KeypointVRNN.imagine`). ``Z = 0`` for a deterministic model.
    """

    h: Tensor
    z: Tensor
    x: Tensor


class StepOutput(NamedTuple):
    """Outputs of one step: predicted features ``(B, D)``, reward ``(B,)`` and prior/posterior ``(B, Z)``."""

    features: Tensor
    reward: Tensor
    prior_mean: Tensor
    prior_std: Tensor
    posterior_mean: Tensor
    posterior_std: Tensor


def _mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))


class _GaussianHead(nn.Module):
    """Dense hidden relu -> (mean, softplus std + min_std) of a diagonal Gaussian."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, min_std: float) -> None:
        super().__init__()
        self.net = _mlp(in_dim, hidden, 2 * out_dim)
        self.min_std = min_std

    def forward(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        mean, raw_std = self.net(inputs).chunk(2, dim=-1)
        return mean, F.softplus(raw_std) + self.min_std


def _check(name: str, tensor: Tensor, *shape: int | str) -> None:
    """Raise a ValueError naming the expected and the received shape; a str in ``shape`` matches any size."""
    if tensor.dim() != len(shape) or any(isinstance(s, int) and s != n for s, n in zip(shape, tensor.shape)):
        raise ValueError(f"{name}: expected shape ({', '.join(map(str, shape))}), got {tuple(tensor.shape)}")


class KeypointVRNN(nn.Module):
    """Variational RNN (Struct-VRNN) with actions and a reward head, on flat ``(B, T, D)`` features.

    Args:
        cfg: sizes, loss weights and training schedule (:class:`kp_rl.config.DynamicsConfig`).
            ``cfg.stochastic=False`` removes the latent ``z`` entirely (deterministic RNN ablation).
        feature_dim: ``D``, e.g. ``K * 3`` keypoint coordinates or the CNN latent size.
        action_dim: ``A``; 0 is allowed (pass ``(B, T, 0)`` actions, as in the reference without actions).
    """

    def __init__(self, cfg: DynamicsConfig, feature_dim: int, action_dim: int) -> None:
        super().__init__()
        if feature_dim < 1 or action_dim < 0:
            raise ValueError(f"need feature_dim >= 1 and action_dim >= 0, got {feature_dim} and {action_dim}")
        self.cfg = cfg
        self.feature_dim = feature_dim
        self.action_dim = action_dim
        self.latent_dim = cfg.latent_dim if cfg.stochastic else 0
        self.belief_dim = cfg.rnn_units + self.latent_dim  # (h, z): the input of decoder and reward head
        self.cell = nn.GRUCell(feature_dim + self.latent_dim + action_dim, cfg.rnn_units)
        if cfg.stochastic:
            self.prior = _GaussianHead(cfg.rnn_units, cfg.prior_hidden, self.latent_dim, cfg.min_std)
            self.posterior = _GaussianHead(cfg.rnn_units + feature_dim, cfg.posterior_hidden, self.latent_dim,
                                           cfg.min_std)
        self.decoder = _mlp(self.belief_dim, cfg.decoder_hidden, feature_dim)
        self.reward_head = _mlp(self.belief_dim, cfg.reward_hidden, 1)
        # the reward head predicts (r - reward_mean) / reward_scale; outputs are in env units
        self.register_buffer("reward_mean", torch.zeros(()))
        self.register_buffer("reward_scale", torch.ones(()))

    def set_reward_normalisation(self, mean: float, scale: float) -> None:
        """Train the reward head on ``(r - mean) / scale`` (statistics of the training split); outputs stay in env
        units. Stored with the weights (buffers), so a checkpoint predicts in the units it was trained on."""
        if not scale > 0:
            raise ValueError(f"reward scale must be > 0, got {scale}")
        self.reward_mean.fill_(float(mean))
        self.reward_scale.fill_(float(scale))

    def initial_state(self, batch_size: int, device: torch.device | str | None = None,
                      dtype: torch.dtype | None = None) -> VRNNState:
        """Zero state (``h``, ``z`` and the fed-back features ``x``) of ``batch_size`` examples, by default on the
        model's device and in its dtype."""
        weight = self.cell.weight_hh
        kwargs = {"device": device or weight.device, "dtype": dtype or weight.dtype}
        return VRNNState(torch.zeros(batch_size, self.cfg.rnn_units, **kwargs),
                         torch.zeros(batch_size, self.latent_dim, **kwargs),
                         torch.zeros(batch_size, self.feature_dim, **kwargs))

    def belief(self, state: VRNNState) -> Tensor:
        """The belief vector exposed to RL agents: ``concat(h, z)`` of shape ``(B, belief_dim)``."""
        return torch.cat([state.h, state.z], dim=-1)

    def _transition(self, state: VRNNState, action: Tensor) -> Tensor:
        return self.cell(torch.cat([state.x, state.z, action], dim=-1), state.h)

    def _decode(self, h: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """Features and the *normalised* reward (see :meth:`set_reward_normalisation`)."""
        hz = torch.cat([h, z], dim=-1)
        return torch.tanh(self.decoder(hz)), self.reward_head(hz).squeeze(-1)

    def _env_reward(self, normalised: Tensor) -> Tensor:
        return normalised * self.reward_scale + self.reward_mean

    @staticmethod
    def _no_latent(h: Tensor) -> tuple[Tensor, Tensor]:
        """The (mean, std) of a deterministic model's empty latent."""
        empty = h.new_zeros(*h.shape[:-1], 0)
        return empty, empty

    def _prior(self, h: Tensor) -> tuple[Tensor, Tensor]:
        return self.prior(h) if self.cfg.stochastic else self._no_latent(h)

    def _posterior(self, h: Tensor, features: Tensor) -> tuple[Tensor, Tensor]:
        return self.posterior(torch.cat([h, features], dim=-1)) if self.cfg.stochastic else self._no_latent(h)

    def _check_step(self, state: VRNNState, action: Tensor, features: Tensor) -> None:
        _check("action", action, state.h.shape[0], self.action_dim)
        _check("features", features, state.h.shape[0], self.feature_dim)

    def observe_step(self, state: VRNNState, features_t: Tensor, action_t: Tensor) -> tuple[VRNNState, StepOutput]:
        """One posterior step: update the belief with the action taken and the observation it produced.

        Args:
            state: state after step ``t-1`` (:meth:`initial_state` at the start of an episode).
            features_t: ``(B, D)`` observation ``x_t`` (detached).
            action_t: ``(B, A)`` the action taken before ``x_t`` (zeros at the episode's first step).
        Returns:
            ``(new_state, StepOutput)``: ``new_state`` has the true ``x_t`` and the posterior mean ``z_t``, the output
            holds ``x̂_t`` and ``r̂_t``.
        """
        self._check_step(state, action_t, features_t)
        h = self._transition(state, action_t)
        prior_mean, prior_std = self._prior(h)
        z, post_std = self._posterior(h, features_t)
        x_hat, r_hat = self._decode(h, z)
        return VRNNState(h, z, features_t), StepOutput(x_hat, self._env_reward(r_hat), prior_mean, prior_std, z,
                                                       post_std)

    def update_belief(self, state: VRNNState, features_t: Tensor, action_t: Tensor) -> VRNNState:
        """The state :meth:`observe_step` returns (same arguments), without its prior, decoder and reward head."""
        self._check_step(state, action_t, features_t)
        h = self._transition(state, action_t)
        z, _ = self._posterior(h, features_t)
        return VRNNState(h, z, features_t)

    def imagine_step(self, state: VRNNState, action: Tensor, sample: bool = True) -> tuple[VRNNState, StepOutput]:
        """One open-loop step: the prior's ``z`` (a sample, or its mean), the model's own ``x̂`` fed back.

        Returns:
            ``(new_state, StepOutput)`` (posterior fields empty); ``belief(new_state)`` is the predicted belief.
        """
        h = self._transition(state, action)
        mean, std = self._prior(h)
        z = mean + std * torch.randn_like(std) if sample else mean
        x_hat, r_hat = self._decode(h, z)
        return VRNNState(h, z, x_hat), StepOutput(x_hat, self._env_reward(r_hat), mean, std, *self._no_latent(h))

    def imagine(self, state: VRNNState, actions: Tensor, num_samples: int = 1,
                sample: bool = True) -> tuple[Tensor, Tensor]:
        """Open-loop prediction from a belief: sample the prior, feed back the model's own predictions.

        Args:
            state: state after the last observed step.
            actions: ``(B, M, A)``; ``actions[:, m]`` is taken before the ``m``-th imagined observation.
            num_samples: ``S`` independent rollouts per example.
            sample: sample ``z`` from the prior (``False``: use the prior mean, one deterministic rollout).
        Returns:
            ``(features (S, B, M, D), rewards (S, B, M))``.
        """
        batch = state.h.shape[0]
        _check("actions", actions, batch, "M", self.action_dim)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        state = VRNNState(*(t.repeat(num_samples, *([1] * (t.dim() - 1))) for t in state))  # (S*B, ...)
        actions = actions.repeat(num_samples, 1, 1)
        features, rewards = [], []
        for m in range(actions.shape[1]):
            state, out = self.imagine_step(state, actions[:, m], sample)
            features.append(out.features)
            rewards.append(out.reward)
        steps = actions.shape[1]
        if steps == 0:
            return (actions.new_zeros(num_samples, batch, 0, self.feature_dim),
                    actions.new_zeros(num_samples, batch, 0))
        return (torch.stack(features, 1).reshape(num_samples, batch, steps, self.feature_dim),
                torch.stack(rewards, 1).reshape(num_samples, batch, steps))

    def predict(self, features: Tensor, actions: Tensor, num_samples: int = 1,
                sample: bool = True) -> tuple[Tensor, Tensor]:
        """Observe ``T_obs`` steps with the posterior mean, then imagine the rest (video / reward prediction).

        Args:
            features: ``(B, T_obs, D)`` observed features.
            actions: ``(B, T_obs + M, A)``; ``M`` may exceed ``cfg.predicted_steps`` (long rollouts).
            num_samples: ``S`` rollouts per example (they share the observed part).
            sample: sample the prior while imagining (``False``: prior mean).
        Returns:
            ``(features (S, B, T_obs + M, D), rewards (S, B, T_obs + M))``: the VRNN's reconstructions on the
            observed steps followed by its predictions.
        """
        _check("features", features, "B", "T_obs", self.feature_dim)
        batch, observed = features.shape[:2]
        _check("actions", actions, batch, f">= {observed}", self.action_dim)
        if actions.shape[1] < observed:
            raise ValueError(f"actions: expected at least T_obs = {observed} steps, got shape {tuple(actions.shape)}")
        state = self.initial_state(batch, features.device, features.dtype)
        seen_x, seen_r = [], []
        for t in range(observed):
            state, out = self.observe_step(state, features[:, t], actions[:, t])
            seen_x.append(out.features)
            seen_r.append(out.reward)
        future_x, future_r = self.imagine(state, actions[:, observed:], num_samples, sample)
        if observed:
            seen = torch.stack(seen_x, 1).expand(num_samples, -1, -1, -1)
            future_x = torch.cat([seen, future_x], dim=2)
            future_r = torch.cat([torch.stack(seen_r, 1).expand(num_samples, -1, -1), future_r], dim=2)
        return future_x, future_r

    def schedules(self, step: int | Tensor, total_steps: int) -> tuple[float | Tensor, float | Tensor, float | Tensor]:
        """Annealed KL weight and scheduled-sampling probabilities of feeding the true features.

        Args:
            step: the training step, a number or a 0-dim tensor (a CUDA graph's step input: the results are
                then tensors on its device, computed without leaving it).
            total_steps: length of training.
        Returns:
            ``(kl_weight, teacher_prob_observed, teacher_prob_predicted)``.
        """
        cfg = self.cfg

        def unit(value: float | Tensor) -> float | Tensor:  # clamped to [0, 1]
            return value.clamp(0.0, 1.0) if isinstance(value, Tensor) else min(1.0, max(0.0, value))

        kl_weight = cfg.kl_weight * (unit(step / cfg.kl_anneal_steps) if cfg.kl_anneal_steps > 0 else 1.0)
        ramp = cfg.sampling_ramp_steps or cfg.sampling_ramp_fraction * total_steps
        frac = unit(step / ramp) if ramp > 0 else 1.0
        return (kl_weight, 1.0 + frac * (cfg.sampling_observed_end - 1.0),
                1.0 + frac * (cfg.sampling_predicted_end - 1.0))

    def loss(self, features: Tensor, actions: Tensor, rewards: Tensor, step: int | Tensor,
             total_steps: int) -> tuple[Tensor, dict[str, Tensor]]:
        """Training objective: observe ``N`` steps with the posterior, predict ``M`` with the prior.

        Every step draws ``S`` reparameterised ``z`` (posterior on observed steps, prior on predicted ones; one
        draw without best-of-many), decodes each and keeps, per example, the sample whose ``x̂_t`` is closest
        to ``x_t``; that ``z`` continues the recurrence. The GRU is fed ``x_{t-1}`` by scheduled sampling
        (one coin per batch and step; true features with the ramped probability, else the prediction).
        Coordinate and reward losses are squared errors, mean over batch, ``D`` and steps (rewards in the head's
        normalised units); KL(q || p) is summed over latent dims and averaged over batch and observed steps.

        Args:
            features: ``(B, N + M, D)`` true features, **detached** by the caller.
            actions: ``(B, N + M, A)``.
            rewards: ``(B, N + M)``.
            step: current training step (KL annealing, scheduled sampling); a 0-dim tensor on the features'
                device keeps the whole loss on the device (no host copies or synchronisation: CUDA-graph capture).
            total_steps: length of training (scheduled-sampling ramp).
        Returns:
            ``(loss, info)`` with info keys ``loss, kl, coord_observed, coord_predicted, reward_observed,
            reward_predicted, kl_weight, teacher_prob_observed`` (all detached scalars).
        """
        cfg = self.cfg
        observed, predicted = cfg.observed_steps, cfg.predicted_steps
        _check("features", features, "B", "T", self.feature_dim)
        batch, steps = features.shape[:2]
        if steps != observed + predicted:
            raise ValueError(f"sequence length {steps} != observed_steps {observed} + predicted_steps {predicted}")
        _check("actions", actions, batch, steps, self.action_dim)
        _check("rewards", rewards, batch, steps)
        kl_weight, p_observed, p_predicted = self.schedules(step, total_steps)
        rewards = (rewards - self.reward_mean) / self.reward_scale  # the head's units
        num_samples = cfg.num_samples if cfg.best_of_many and cfg.stochastic else 1
        index = torch.arange(batch, device=features.device)
        state = self.initial_state(batch, features.device, features.dtype)
        coord, reward, kls = [], [], []
        for t in range(steps):
            target = features[:, t]
            h = self._transition(state, actions[:, t])
            mean, std = self._prior(h)
            if t < observed and cfg.stochastic:
                post_mean, post_std = self._posterior(h, target)
                kls.append(kl_divergence(post_mean, post_std, mean, std))
                mean, std = post_mean, post_std
            elif cfg.stop_prior_gradient:  # predicted steps: the prior trains through the KL only (the reference)
                mean, std = mean.detach(), std.detach()
            z_all = mean + std * torch.randn(num_samples, *std.shape, device=std.device, dtype=std.dtype)
            x_all, r_all = self._decode(h.expand(num_samples, -1, -1), z_all)  # (S, B, D), (S, B)
            errors = (x_all - target).pow(2).mean(-1)  # (S, B)
            if num_samples > 1:
                best_error, best = best_of_many(errors)
                z, x_hat, r_hat = z_all[best, index], x_all[best, index], r_all[best, index]
            else:
                best_error, z, x_hat, r_hat = errors[0], z_all[0], x_all[0], r_all[0]
            coord.append(best_error.mean())
            reward.append((r_hat - rewards[:, t]).pow(2).mean())
            teacher = p_observed if t < observed else p_predicted
            coin = torch.rand((), device=features.device)  # on the device: no host round trip per step
            fed = torch.where(coin < teacher, target, x_hat)
            state = VRNNState(h, z, fed)
        coord_t, reward_t = torch.stack(coord), torch.stack(reward)
        kl = torch.stack(kls).mean() if kls else features.new_zeros(())
        loss = cfg.coord_weight * coord_t.mean() + cfg.reward_weight * reward_t.mean() + kl_weight * kl
        zero = features.new_zeros(())

        def scalar(value: float | Tensor) -> Tensor:  # torch.full: a fill on the device, not a copy from the host
            return value.detach() if isinstance(value, Tensor) else torch.full((), value, device=features.device)

        return loss, {
            "loss": loss.detach(),
            "kl": kl.detach(),
            "coord_observed": coord_t[:observed].mean().detach(),
            "coord_predicted": coord_t[observed:].mean().detach() if predicted else zero,
            "reward_observed": reward_t[:observed].mean().detach(),
            "reward_predicted": reward_t[observed:].mean().detach() if predicted else zero,
            "kl_weight": scalar(kl_weight),
            "teacher_prob_observed": scalar(p_observed),
        }

