"""Tests of the VRNN dynamics (kp_rl.dynamics): shapes, KL, best-of-many, errors, overfitting a moving dot."""

from __future__ import annotations

import pytest
import torch

from kp_rl.config import DynamicsConfig
from kp_rl.dynamics import KeypointVRNN, VRNNState
from kp_rl.losses import best_of_many, kl_divergence

B, D, A, N, M = 3, 6, 2, 3, 2
INFO_KEYS = {"loss", "kl", "coord_observed", "coord_predicted", "reward_observed", "reward_predicted",
             "kl_weight", "teacher_prob_observed"}


def tiny_config(**overrides) -> DynamicsConfig:
    values = dict(rnn_units=16, latent_dim=4, prior_hidden=8, posterior_hidden=8, decoder_hidden=8, reward_hidden=8,
                  observed_steps=N, predicted_steps=M, num_samples=4, kl_anneal_steps=10)
    values.update(overrides)
    return DynamicsConfig(**values)


def batch(steps: int = N + M, action_dim: int = A) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return (torch.rand(B, steps, D, generator=g) * 2 - 1, torch.randn(B, steps, action_dim, generator=g),
            torch.randn(B, steps, generator=g))


VARIANTS = [dict(), dict(best_of_many=False), dict(stochastic=False), dict(stochastic=False, best_of_many=False)]


@pytest.mark.parametrize("overrides", VARIANTS, ids=["stoch-bom", "stoch", "det-bom", "det"])
def test_shapes(overrides: dict) -> None:
    torch.manual_seed(0)
    cfg = tiny_config(**overrides)
    model = KeypointVRNN(cfg, D, A)
    z_dim = cfg.latent_dim if cfg.stochastic else 0
    features, actions, rewards = batch()

    loss, info = model.loss(features, actions, rewards, step=5, total_steps=20)
    assert loss.shape == () and torch.isfinite(loss)
    assert set(info) == INFO_KEYS and all(v.shape == () for v in info.values())
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())

    state = model.initial_state(B)
    assert isinstance(state, VRNNState) and state.z.shape == (B, z_dim)
    state, out = model.observe_step(state, features[:, 0], actions[:, 0])
    assert out.features.shape == (B, D) and out.reward.shape == (B,)
    assert out.prior_mean.shape == out.posterior_std.shape == (B, z_dim)
    assert model.belief(state).shape == (B, cfg.rnn_units + z_dim) == (B, model.belief_dim)

    imagined, imagined_rewards = model.imagine(state, actions[:, :4], num_samples=5)
    assert imagined.shape == (5, B, 4, D) and imagined_rewards.shape == (5, B, 4)
    assert imagined.abs().max() <= 1.0  # tanh output

    long_actions = torch.zeros(B, N + 7, A)  # longer than predicted_steps
    pred, pred_rewards = model.predict(features[:, :N], long_actions, num_samples=2)
    assert pred.shape == (2, B, N + 7, D) and pred_rewards.shape == (2, B, N + 7)


@pytest.mark.parametrize("overrides", VARIANTS)
def test_update_belief_is_observe_steps_state(overrides: dict) -> None:
    """The wrappers' cheaper belief update gives exactly the state observe_step gives."""
    torch.manual_seed(0)
    model = KeypointVRNN(tiny_config(**overrides), D, A)
    features, actions, _ = batch()
    state = fast = model.initial_state(B)
    for t in range(N + M):
        state, _ = model.observe_step(state, features[:, t], actions[:, t])
        fast = model.update_belief(fast, features[:, t], actions[:, t])
        for a, b in zip(fast, state):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="action: expected shape"):
        model.update_belief(state, features[:, 0], actions[:, 0, :1])


def test_zero_action_dim() -> None:
    model = KeypointVRNN(tiny_config(), D, 0)
    features, actions, rewards = batch(action_dim=0)
    loss, _ = model.loss(features, actions, rewards, step=0, total_steps=1)
    assert torch.isfinite(loss)


def test_kl_nonnegative_and_zero_when_equal() -> None:
    g = torch.Generator().manual_seed(0)
    q_mean, p_mean = torch.randn(100, 8, generator=g), torch.randn(100, 8, generator=g)
    q_std, p_std = torch.rand(100, 8, generator=g) + 0.1, torch.rand(100, 8, generator=g) + 0.1
    assert (kl_divergence(q_mean, q_std, p_mean, p_std) >= 0).all()
    assert torch.equal(kl_divergence(q_mean, q_std, q_mean, q_std), torch.zeros(100))
    two = torch.full((3,), 2.0)
    assert float(kl_divergence(two, two, torch.zeros(3), torch.ones(3))) == pytest.approx(8.4206, abs=1e-4)


def test_model_kl_nonnegative_and_zero_without_latent() -> None:
    torch.manual_seed(0)
    features, actions, rewards = batch()
    _, info = KeypointVRNN(tiny_config(), D, A).loss(features, actions, rewards, step=0, total_steps=10)
    assert info["kl"] > 0 and info["kl_weight"] == 0.0  # annealed from zero
    _, info = KeypointVRNN(tiny_config(stochastic=False), D, A).loss(features, actions, rewards, 50, 10)
    assert info["kl"] == 0.0


def test_schedules() -> None:
    model = KeypointVRNN(tiny_config(kl_weight=0.5, kl_anneal_steps=10), D, A)
    assert model.schedules(0, 100) == (0.0, 1.0, 1.0)
    kl, p_obs, p_pred = model.schedules(40, 100)  # half-way through the 80-step ramp
    assert kl == 0.5 and p_obs == pytest.approx(0.55) and p_pred == pytest.approx(0.75)
    assert model.schedules(100, 100)[1:] == pytest.approx((0.1, 0.5))


@pytest.mark.parametrize("step", [0, 5, 40, 100])
def test_a_tensor_step_gives_the_same_loss_as_a_number(step: int) -> None:
    """What a CUDA graph feeds the loss (the step as a device tensor): the same schedules, loss and gradients."""
    model = KeypointVRNN(tiny_config(kl_weight=0.5, kl_anneal_steps=10), D, A)
    for got, want in zip(model.schedules(torch.tensor(float(step)), 100), model.schedules(step, 100)):
        assert isinstance(got, torch.Tensor) and float(got) == pytest.approx(want)
    features, actions, rewards = batch()
    results = []
    for at in (step, torch.tensor(float(step))):
        torch.manual_seed(1)
        model.zero_grad()
        loss, info = model.loss(features, actions, rewards, at, 100)
        loss.backward()
        results.append((loss.detach(), {k: v.clone() for k, v in info.items()},
                        [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (loss_n, info_n, grads_n), (loss_t, info_t, grads_t) = results
    torch.testing.assert_close(loss_t, loss_n)
    assert info_t.keys() == info_n.keys() and all(info_t[k].shape == () for k in info_t)
    for key in info_n:
        torch.testing.assert_close(info_t[key], info_n[key])
    assert len(grads_t) == len(grads_n) > 0
    for a, b in zip(grads_t, grads_n):
        torch.testing.assert_close(a, b)


def test_best_of_many_picks_minimum_and_routes_gradient() -> None:
    errors = torch.tensor([[3.0, 0.5], [1.0, 2.0], [2.0, 4.0]], requires_grad=True)
    best, index = best_of_many(errors)
    assert torch.equal(index, torch.tensor([1, 0])) and torch.equal(best, torch.tensor([1.0, 0.5]))
    best.sum().backward()
    assert torch.equal(errors.grad, torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]]))


def test_errors_name_the_numbers() -> None:
    model = KeypointVRNN(tiny_config(), D, A)
    features, actions, rewards = batch(steps=N + M + 1)
    with pytest.raises(ValueError, match=rf"{N + M + 1}.*observed_steps {N}.*predicted_steps {M}"):
        model.loss(features, actions, rewards, 0, 1)
    features, actions, rewards = batch(action_dim=A + 1)
    with pytest.raises(ValueError, match=rf"\(3, 5, {A}\).*got \(3, 5, {A + 1}\)"):
        model.loss(features, actions, rewards, 0, 1)
    with pytest.raises(ValueError, match="rewards"):
        model.loss(features, actions[..., :A], rewards[:, :, None], 0, 1)
    with pytest.raises(ValueError, match=rf"\(B, T, {D}\)"):
        model.loss(features[..., :2], actions[..., :A], rewards, 0, 1)
    with pytest.raises(ValueError, match="action"):
        model.observe_step(model.initial_state(B), features[:, 0], actions[:, 0])


def moving_dot(batch_size: int, steps: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One keypoint (x, y, 1) circling at constant speed from a random phase; reward = x; zero actions."""
    g = torch.Generator().manual_seed(seed)
    angle = torch.rand(batch_size, 1, generator=g) * 6.28 + 0.4 * torch.arange(steps)
    x, y = 0.6 * torch.cos(angle), 0.6 * torch.sin(angle)
    return torch.stack([x, y, torch.ones_like(x)], -1), torch.zeros(batch_size, steps, 1), x


def train(cfg: DynamicsConfig, features, actions, rewards, steps: int = 300) -> KeypointVRNN:
    torch.manual_seed(0)
    model = KeypointVRNN(cfg, features.shape[-1], actions.shape[-1])
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(steps):
        loss, _ = model.loss(features, actions, rewards, step, steps)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model


DOT_CONFIG = dict(rnn_units=32, latent_dim=4, prior_hidden=32, posterior_hidden=32, decoder_hidden=32,
                  reward_hidden=32, observed_steps=4, predicted_steps=4, num_samples=5, kl_weight=1e-2,
                  kl_anneal_steps=50)


@pytest.fixture(scope="module")
def dot_models() -> dict[str, KeypointVRNN]:
    data = moving_dot(64, 8)
    return {"stochastic": train(DynamicsConfig(**DOT_CONFIG), *data),
            "deterministic": train(DynamicsConfig(**{**DOT_CONFIG, "stochastic": False}), *data)}


@pytest.mark.parametrize("kind", ["stochastic", "deterministic"])
def test_overfits_moving_dot(dot_models: dict[str, KeypointVRNN], kind: str) -> None:
    features, actions, rewards = moving_dot(64, 8)
    with torch.no_grad():
        pred, pred_rewards = dot_models[kind].predict(features[:, :4], actions, sample=False)
    error = (pred[0, :, 4:] - features[:, 4:]).pow(2).mean()
    constant = (features[:, 3:4] - features[:, 4:]).pow(2).mean()  # last observed position held
    assert error < 0.1 * constant, (float(error), float(constant))
    corr = torch.corrcoef(torch.stack([pred_rewards[0, :, 4:].flatten(), rewards[:, 4:].flatten()]))[0, 1]
    assert corr > 0.95


def test_sample_diversity(dot_models: dict[str, KeypointVRNN]) -> None:
    features, actions, _ = moving_dot(8, 8, seed=1)
    torch.manual_seed(0)
    with torch.no_grad():
        stochastic, _ = dot_models["stochastic"].predict(features[:, :4], actions, num_samples=4)
        deterministic, _ = dot_models["deterministic"].predict(features[:, :4], actions, num_samples=4)
    assert stochastic[:, :, 4:].std(0).mean() > 1e-3  # prior samples differ
    assert torch.equal(stochastic[0, :, :4], stochastic[1, :, :4])  # shared observed part
    assert (deterministic == deterministic[:1]).all()


def test_rewards_are_learnt_normalised_and_returned_in_env_units() -> None:
    torch.manual_seed(0)
    plain = KeypointVRNN(tiny_config(), D, A)
    scaled = KeypointVRNN(tiny_config(), D, A)
    scaled.load_state_dict(plain.state_dict())
    scaled.set_reward_normalisation(mean=5.0, scale=2.0)
    features, actions, rewards = batch()
    torch.manual_seed(1)
    plain_loss, plain_info = plain.loss(features, actions, rewards, 0, 100)
    torch.manual_seed(1)
    scaled_loss, scaled_info = scaled.loss(features, actions, rewards * 2.0 + 5.0, 0, 100)
    torch.testing.assert_close(scaled_loss, plain_loss)  # the same objective on the head's units
    state = plain.initial_state(B)
    _, a = plain.observe_step(state, features[:, 0], actions[:, 0])
    _, b = scaled.observe_step(state, features[:, 0], actions[:, 0])
    torch.testing.assert_close(b.reward, a.reward * 2.0 + 5.0)  # predictions in env units
    torch.manual_seed(2)
    _, ra = plain.imagine(state, actions[:, :2], num_samples=2)
    torch.manual_seed(2)
    _, rb = scaled.imagine(state, actions[:, :2], num_samples=2)
    torch.testing.assert_close(rb, ra * 2.0 + 5.0)
    with pytest.raises(ValueError, match="reward scale must be > 0"):
        plain.set_reward_normalisation(0.0, 0.0)


@pytest.mark.parametrize("stop", [False, True])
def test_stop_prior_gradient_keeps_predicted_steps_out_of_the_prior(stop: bool) -> None:
    torch.manual_seed(0)
    vrnn = KeypointVRNN(tiny_config(kl_weight=0.0, stop_prior_gradient=stop), D, A)
    loss, _ = vrnn.loss(*batch(), step=100, total_steps=100)
    loss.backward()
    prior_grad = sum(float(p.grad.abs().sum()) for p in vrnn.prior.parameters() if p.grad is not None)
    assert (prior_grad == 0.0) == stop  # with KL weight 0, only the predicted steps could reach the prior
