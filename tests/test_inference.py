"""Tests of kp_rl.inference.FastEncoder: the same features as PerceptionModel.encode, fresh weights, bad input."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from torch import nn

import kp_rl
from kp_rl import inference
from kp_rl.inference import FastBelief, FastEncoder, GraphedCall, GraphedEncoder
from kp_rl.model import PerceptionModel

SIZE = 32
SMALL = dict(keypoints={"image_size": SIZE, "num_keypoints": 5, "base_filters": 4, "layers_per_scale": 1},
             cnn={"latent_dim": 6, "map_channels": 2})


def small_model(representation: str, seed: int = 0) -> PerceptionModel:
    torch.manual_seed(seed)
    model = PerceptionModel(kp_rl.get_preset("cpu").replace(**SMALL), representation).eval()
    with torch.no_grad():  # biases are zero at init: give them values so that folding them in is tested too
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model


def frames(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), np.uint8)


@pytest.mark.parametrize("representation", ["keypoints", "cnn"])
@pytest.mark.parametrize("batch", [1, 3])
def test_same_features_as_the_model(representation: str, batch: int) -> None:
    model = small_model(representation)
    x = frames(batch)
    with torch.inference_mode():
        expected = model.encode(x)
        got = FastEncoder(model)(x)
        assert got.shape == expected.shape == (batch, model.feature_dim) and got.dtype == torch.float32
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(FastEncoder(model)(torch.from_numpy(x)), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("representation", ["keypoints", "cnn"])
def test_builds_no_autograd_graph_outside_inference_mode(representation: str) -> None:
    """The wrappers call the fast paths without torch.inference_mode: nothing they return may require grad
    (a one-channel head's weight, viewed, once kept its parameter's requires_grad)."""
    config = kp_rl.get_preset("cpu").replace(**SMALL).replace(cnn={"map_channels": 1})
    model = PerceptionModel(config, representation, action_dim=1, with_dynamics=True)
    features = FastEncoder(model)(frames(2))
    state = FastBelief(model)(model.dynamics.initial_state(2), features, torch.zeros(2, 1))
    assert not any(t.requires_grad for t in (features, *state))
    with torch.no_grad():
        torch.testing.assert_close(features, model.encode(frames(2)), atol=1e-5, rtol=1e-5)


def test_one_hot_frame_gives_a_keypoint_where_the_model_puts_it() -> None:
    # A trained-looking case: a bright square moves; wherever the model puts its keypoints, the fast path agrees.
    model = small_model("keypoints", seed=1)
    x = np.zeros((2, SIZE, SIZE, 3), np.uint8)
    x[0, 2:8, 2:8], x[1, 20:28, 22:30] = 255, 255
    with torch.inference_mode():
        torch.testing.assert_close(FastEncoder(model)(x), model.encode(x), atol=1e-5, rtol=1e-5)


def test_follows_weight_updates() -> None:
    model, other = small_model("keypoints", seed=0), small_model("keypoints", seed=1)
    fast, x = FastEncoder(model), frames(2)
    with torch.inference_mode():
        before = fast(x)
    model.load_state_dict(other.state_dict())  # in-place copies into the same parameters
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), other.encode(x), atol=1e-5, rtol=1e-5)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    model.autoencoder.loss(torch.from_numpy(frames(4)).view(2, 2, SIZE, SIZE, 3))[0].backward()
    optimiser.step()
    with torch.inference_mode():
        after = fast(x)
        torch.testing.assert_close(after, model.encode(x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(before, after)


def test_follows_replaced_parameters_and_modules() -> None:
    """The parameter list is cached between calls; replacing a parameter, a layer or the whole encoder is seen."""
    model, other = small_model("keypoints", seed=0), small_model("keypoints", seed=1)
    fast, x = FastEncoder(model), frames(2)
    trunk = model.autoencoder.encoder.trunk
    def overwrite_on_conversion() -> None:  # Module._apply puts new Parameters straight into the dicts
        torch.__future__.set_overwrite_module_params_on_conversion(True)
        try:
            model.autoencoder.encoder._apply(lambda t: t * 1.5)
        finally:
            torch.__future__.set_overwrite_module_params_on_conversion(False)

    replacements = [
        overwrite_on_conversion,
        lambda: setattr(trunk[0], "weight", nn.Parameter(torch.randn_like(trunk[0].weight))),
        lambda: trunk.__setitem__(2, nn.Conv2d(trunk[2].in_channels, trunk[2].out_channels, 3, padding=1)),
        lambda: setattr(model.autoencoder, "encoder", other.autoencoder.encoder),
    ]
    with torch.inference_mode():
        for replace in replacements:
            before = fast(x)
            replace()
            after = fast(x)
            torch.testing.assert_close(after, model.encode(x), atol=1e-5, rtol=1e-5)
            assert not torch.allclose(before, after)


def test_generic_conv_when_onednn_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    model = small_model("keypoints")
    fast = FastEncoder(model)
    with torch.inference_mode():
        torch.testing.assert_close(fast(frames(2)), model.encode(frames(2)), atol=1e-5, rtol=1e-5)
    assert fast._plan.packed is None


@pytest.mark.parametrize("representation", ["keypoints", "cnn"])
def test_fused_prepacked_convs_are_checked_before_use(representation: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inference, "_onednn_graph", lambda: False)  # the eager path, not the compiled graph
    model = small_model(representation)
    fast = FastEncoder(model)
    with torch.inference_mode():
        fast(frames(1))
        if inference._fused_ops() is not None:  # this build has the ops: the plan uses them
            assert fast._plan.packed is not None
        pointwise, reorder = inference._fused_ops() or (None, None)
        if pointwise is None:
            pytest.skip("this PyTorch build has no fused oneDNN conv ops")
        # fused ops that compute something else are caught by the check against the unfused path, not used
        monkeypatch.setattr(inference, "_fused_ops", lambda: (lambda *a: torch.zeros_like(pointwise(*a)), reorder))
        model.load_state_dict(small_model(representation, seed=3).state_dict())  # new weights: a new plan
        torch.testing.assert_close(fast(frames(2)), model.encode(frames(2)), atol=1e-5, rtol=1e-5)
        assert fast._plan.packed is None


needs_onednn_graph = pytest.mark.skipif(not inference._onednn_graph(),
                                        reason="this PyTorch build cannot compile with oneDNN Graph")


@needs_onednn_graph
@pytest.mark.parametrize("representation", ["keypoints", "cnn"])
def test_convolutions_are_compiled_once_per_batch_size_and_thread_count(representation: str) -> None:
    model = small_model(representation)
    fast = FastEncoder(model)
    previous = torch.get_num_threads()
    try:
        with torch.inference_mode():
            for threads, batch in [(1, 1), (1, 3), (2, 1), (1, 1)]:
                torch.set_num_threads(threads)
                torch.testing.assert_close(fast(frames(batch, seed=batch)), model.encode(frames(batch, seed=batch)),
                                           atol=1e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(previous)
    # compiled primitives keep the thread count they were built with: one graph per (batch, threads)
    assert set(fast._plan.compiled) == {(1, 1), (3, 1), (1, 2)}
    assert all(compiled is not None for compiled in fast._plan.compiled.values())


@needs_onednn_graph
def test_compiled_graph_sees_the_strides_it_was_compiled_for() -> None:
    """``frame[None]`` in numpy has stride 0 on the batch axis: the graph's guard would reject it and run its
    slow unfused fallback (same numbers, 1.5x the time), so frames are re-strided before the call."""
    model = small_model("keypoints")
    fast = FastEncoder(model)
    frame = frames(1)[0]
    with torch.inference_mode():
        fast(frame[None])
        compiled = fast._plan.compiled[(1, torch.get_num_threads())]
        seen = []
        fast._plan.compiled[(1, torch.get_num_threads())] = lambda x: seen.append(x.stride()) or compiled(x)
        torch.testing.assert_close(fast(frame[None]), model.encode(frame[None]), atol=1e-5, rtol=1e-5)
    assert torch.from_numpy(frame[None]).stride()[0] == 0 and seen == [(SIZE * SIZE * 3, SIZE * 3, 3, 1)]


@pytest.mark.parametrize("representation", ["keypoints", "cnn"])
def test_a_compiled_graph_is_checked_before_use(representation: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiler that returns something else (or fails) leaves the eager convs in charge: same features."""
    model = small_model(representation)
    monkeypatch.setattr(torch.jit, "freeze", lambda module: (lambda x: module(x) + 1.0))
    fast = FastEncoder(model)
    with torch.inference_mode():
        torch.testing.assert_close(fast(frames(2)), model.encode(frames(2)), atol=1e-5, rtol=1e-5)
    assert list(fast._plan.compiled.values()) == [None]

    def broken(module: nn.Module) -> None:
        raise RuntimeError("no oneDNN Graph here")

    monkeypatch.setattr(torch.jit, "freeze", broken)
    model.load_state_dict(small_model(representation, seed=2).state_dict())  # new weights: a new plan
    with torch.inference_mode():
        torch.testing.assert_close(fast(frames(2)), model.encode(frames(2)), atol=1e-5, rtol=1e-5)
    assert list(fast._plan.compiled.values()) == [None]
    assert not torch.jit.onednn_fusion_enabled()  # the global switch is restored


def belief_model(seed: int = 0, action_dim: int = 2, **dynamics: object) -> PerceptionModel:
    torch.manual_seed(seed)
    config = kp_rl.get_preset("cpu").replace(**SMALL, dynamics={"rnn_units": 16, "latent_dim": 3, "posterior_hidden": 8,
                                                                **dynamics})
    model = PerceptionModel(config, action_dim=action_dim, with_dynamics=True).eval()
    with torch.no_grad():  # GRU and posterior weights at a scale where the gates saturate now and then
        for p in model.dynamics.parameters():
            p.normal_(0.0, 0.5)
    return model


@pytest.mark.parametrize("variant", [{}, {"stochastic": False}, {"action_dim": 0}])
def test_fast_belief_is_update_belief(variant: dict) -> None:
    variant = dict(variant)
    model = belief_model(action_dim=variant.pop("action_dim", 2), **variant)
    dynamics, fast = model.dynamics, FastBelief(model)
    steps, batch = 12, 3
    features = torch.rand(steps, batch, model.feature_dim)
    actions = torch.rand(steps, batch, model.action_dim) * 2 - 1
    with torch.inference_mode():
        state = mine = dynamics.initial_state(batch)
        for t in range(steps):
            state = dynamics.update_belief(state, features[t], actions[t])
            mine = fast(mine, features[t], actions[t])
            for got, want in zip(mine, state):
                assert got.shape == want.shape and got.dtype == torch.float32
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert state.z.shape[1] == (3 if variant.get("stochastic", True) else 0)
        with pytest.raises(ValueError, match="action: expected shape"):
            fast(mine, features[0], actions[0, :, :1] if model.action_dim else actions[0, :, :0].new_zeros(batch, 1))


def test_fast_belief_follows_new_weights_and_replaced_dynamics() -> None:
    model, other = belief_model(seed=0), belief_model(seed=1)
    fast = FastBelief(model)
    features, actions = torch.rand(2, model.feature_dim), torch.rand(2, model.action_dim)
    with torch.inference_mode():
        start = model.dynamics.initial_state(2)
        before = fast(start, features, actions).h
        model.dynamics.load_state_dict(other.dynamics.state_dict())  # in place
        torch.testing.assert_close(fast(start, features, actions).h,
                                   other.dynamics.update_belief(start, features, actions).h, atol=1e-5, rtol=1e-5)
        model.dynamics = belief_model(seed=2).dynamics  # replaced
        torch.testing.assert_close(fast(start, features, actions).h,
                                   model.dynamics.update_belief(start, features, actions).h, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(before, fast(start, features, actions).h)


def test_fast_belief_refuses_what_it_cannot_run() -> None:
    with pytest.raises(ValueError, match="FastBelief needs a model with dynamics"):
        FastBelief(small_model("keypoints"))
    with pytest.raises(ValueError, match="FastBelief runs on the CPU; the dynamics are on meta"):
        FastBelief(belief_model().to("meta"))


def test_bad_input_is_named() -> None:
    model = small_model("keypoints")
    fast = FastEncoder(model)
    with pytest.raises(ValueError, match=r"expected uint8 frames \(N, 32, 32, 3\), got torch.uint8 of shape \(1, 64, 64, 3\)"):
        fast(np.zeros((1, 64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="got torch.float32 of shape"):
        fast(np.zeros((1, SIZE, SIZE, 3), np.float32))
    with pytest.raises(ValueError, match="FastEncoder runs on the CPU; the model is on meta"):
        FastEncoder(small_model("keypoints").to("meta"))


def test_a_model_made_under_inference_mode() -> None:
    """Inference tensors keep no version counter: a model built (or loaded) under inference_mode still works."""
    with torch.inference_mode():
        model = small_model("keypoints")
        torch.testing.assert_close(FastEncoder(model)(frames(2)), model.encode(frames(2)), atol=1e-5, rtol=0)


def test_cuda_graph_paths_refuse_a_model_off_cuda() -> None:
    """GraphedEncoder / GraphedCall are the CUDA path (tested against eager on a GPU in tests/test_device.py)."""
    with pytest.raises(ValueError, match="GraphedCall replays CUDA graphs; the module is on cpu"):
        GraphedEncoder(small_model("keypoints"))
    with pytest.raises(ValueError, match="the module is on cpu"):
        GraphedCall(lambda x: (x,), small_model("cnn"))
    model = small_model("cnn")
    with pytest.raises(ValueError, match="the module is on cpu"):  # a function returning the module
        GraphedCall(lambda x: (x,), functools.partial(getattr, model, "autoencoder"))


def test_what_the_cuda_graphs_capture_is_the_eager_computation() -> None:
    """The functions GraphedEncoder / the wrappers capture, run eagerly here: same results as the model's own."""
    from kp_rl.inference import _encode_flat
    from kp_rl.wrappers import _observe_flat

    torch.manual_seed(0)
    model = PerceptionModel(kp_rl.get_preset("cpu").replace(**SMALL), action_dim=2, with_dynamics=True).eval()
    with torch.inference_mode():
        (features,) = _encode_flat(model, torch.from_numpy(frames(3)))
        torch.testing.assert_close(features, model.encode(frames(3)))
        state = model.dynamics.initial_state(3)
        actions = torch.randn(3, 2)
        expected_state, expected_out = model.dynamics.observe_step(state, features, actions)
        flat = _observe_flat(model, *state, features, actions)
        assert len(flat) == len(expected_state) + len(expected_out)
        for got, want in zip(flat, (*expected_state, *expected_out)):
            torch.testing.assert_close(got, want)


def test_docstring_examples_run() -> None:
    import doctest

    import kp_rl.inference

    result = doctest.testmod(kp_rl.inference)
    assert result.attempted > 0 and result.failed == 0
