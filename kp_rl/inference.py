"""Fast inference paths for the wrappers: uint8 pixels -> features (and belief steps), a few frames at a time.

On the CPU, :class:`FastEncoder` and :class:`FastBelief`; on a CUDA device, :class:`GraphedEncoder` and :class:`GraphedCall`, which
replay CUDA graphs (one launch instead of one per kernel: at these sizes a GPU step is launch-bound).

The wrappers encode one frame per env step (or one per sub-env). At that size PyTorch's default CPU conv
picks its generic im2col path for most of the small layers, and a dozen tiny elementwise ops (normalising
the pixels, coordinate channels, heatmap centres of mass) each cost more in dispatch than in arithmetic.
:class:`FastEncoder` computes the same function with fewer, larger ops:

* pixel normalisation and the coordinate channels are folded into the first conv: its response to them is
  the same for every frame, so it is computed once as a bias map and the conv sees only the raw RGB values;
* every conv runs through oneDNN on channels-last tensors, where a uint8 ``(N, H, W, 3)`` frame already is
  once viewed as ``(N, 3, H, W)``; the convolutions are compiled once per batch size and thread count into
  oneDNN Graph partitions (TorchScript's oneDNN fuser): each call then executes prebuilt primitives, where
  an eager oneDNN call spends ~20 us per layer rebuilding its primitive descriptor (more than the arithmetic
  of most of these layers). Where that compiler is missing or its result differs, the convs run eagerly on
  prepacked weights with the activation fused;
* the keypoint head's 1x1 conv is one matrix product (a 1x1 conv in the compiled graph), and the heatmaps'
  centres of mass and intensities a second one against a fixed ``[x, y, 1]`` grid; the last few operations
  on these ``3 K`` numbers run in numpy.

Results match :meth:`PerceptionModel.encode` to float rounding (~1e-6). The plan copies nothing but a few
reshaped kernels, and :class:`FastEncoder` rebuilds it whenever a parameter of the encoder changes
(in-place training updates, ``load_state_dict``), so it never serves stale weights.

    >>> import numpy as np, torch, kp_rl
    >>> cfg = kp_rl.get_preset("cpu").replace(keypoints={"image_size": 32, "num_keypoints": 4, "base_filters": 4})
    >>> model = kp_rl.PerceptionModel(cfg).eval()
    >>> frames = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), np.uint8)
    >>> with torch.inference_mode():
    ...     bool(torch.allclose(FastEncoder(model)(frames), model.encode(frames), atol=1e-5))
    True
"""

from __future__ import annotations

import functools
import operator
import warnings
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kp_rl.dynamics import VRNNState
from kp_rl.keypoints import CNNAutoencoder, KeypointAutoencoder, add_coord_channels, preprocess_frames

__all__ = ["FastBelief", "FastEncoder", "GraphedCall", "GraphedEncoder"]

_CHANNELS_LAST = torch.channels_last


def _fused_ops() -> tuple[Callable[..., Tensor], Callable[..., Tensor]] | None:
    """oneDNN's convolution with a fused activation on prepacked weights, and its weight packing: the ops
    PyTorch's own CPU compiler uses (``torch.ops.mkldnn``), where this build has them."""
    ops = torch.ops.mkldnn
    if (torch.backends.mkldnn.is_available() and hasattr(ops, "_convolution_pointwise")
            and hasattr(ops, "_reorder_convolution_weight")):
        return ops._convolution_pointwise, ops._reorder_convolution_weight
    return None


def _onednn_graph() -> bool:
    """Whether this build can compile convolutions with TorchScript's oneDNN Graph fuser."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.jit, "enable_onednn_fusion")
            and hasattr(torch.jit, "onednn_fusion_enabled") and hasattr(torch.jit, "freeze"))


class _ConvStage(nn.Module):
    """What the plan compiles, as plain ops for tracing: uint8 ``(N, H, W, 3)`` -> :meth:`_Plan.conv_stage`'s output
    (keypoints: the heatmap sums, the 1x1 head as a convolution oneDNN Graph fuses; CNN: the last activations)."""

    def __init__(self, plan: "_Plan") -> None:
        super().__init__()
        self.slope = plan.slope
        self.first_geometry = plan.first_geometry
        self.register_buffer("first_weight", plan.first_weight, persistent=False)
        self.register_buffer("bias_map", plan.bias_map, persistent=False)
        self.geometry = []
        for i, (weight, bias, padding, stride) in enumerate(plan.convs):
            self.register_buffer(f"weight{i}", weight, persistent=False)
            self.register_buffer(f"bias{i}", bias, persistent=False)
            self.geometry.append((padding, stride))
        self.keypoints = plan.keypoints
        if plan.keypoints:
            channels, count = plan.head_weight.shape
            head = plan.head_weight.t().reshape(count, channels, 1, 1).contiguous(memory_format=_CHANNELS_LAST)
            self.register_buffer("head_weight", head, persistent=False)
            self.register_buffer("head_bias", plan.head_bias, persistent=False)
            self.register_buffer("grid", plan.grid, persistent=False)

    def forward(self, frames: Tensor) -> Tensor:
        x = frames.permute(0, 3, 1, 2).float()
        padding, stride = self.first_geometry
        x = F.leaky_relu(F.conv2d(x, self.first_weight, None, stride, padding) + self.bias_map, self.slope)
        for i, (padding, stride) in enumerate(self.geometry):
            x = F.leaky_relu(F.conv2d(x, getattr(self, f"weight{i}"), getattr(self, f"bias{i}"), stride, padding),
                             self.slope)
        if not self.keypoints:
            return x
        heatmaps = F.softplus(F.conv2d(x, self.head_weight, self.head_bias))
        n, count = heatmaps.shape[:2]
        return torch.matmul(self.grid, heatmaps.permute(0, 2, 3, 1).reshape(n, -1, count))


def _conv_fn() -> Callable[[Tensor, Tensor, Tensor | None, tuple[int, ...], tuple[int, ...]], Tensor]:
    """oneDNN's convolution where PyTorch was built with it, else the generic one (same results)."""
    if torch.backends.mkldnn.is_available() and hasattr(torch, "mkldnn_convolution"):
        return lambda x, w, b, padding, stride: torch.mkldnn_convolution(x, w, b, padding, stride, (1, 1), 1)
    return lambda x, w, b, padding, stride: F.conv2d(x, w, b, stride, padding)


# How many parameters, buffers and submodules any module of this process has registered (set or replaced)
# since import: torch's global registration hooks count them. Walking a module tree for its tensors costs
# ~20 us per call, more than the rest of a wrapper step's bookkeeping; a _TensorWatch walks it again only
# when this count moved. (The hooks return None: they change nothing.)
_registrations = [0]


def _count_registration(*_: object) -> None:
    _registrations[0] += 1


for _register in (torch.nn.modules.module.register_module_parameter_registration_hook,
                  torch.nn.modules.module.register_module_buffer_registration_hook,
                  torch.nn.modules.module.register_module_module_registration_hook):
    _register(_count_registration)


_VERSION = operator.attrgetter("_version")
_Key = tuple[tuple[int, ...], tuple[int, ...]]  # what _TensorWatch.key returns


class _TensorWatch:
    """Tells whether any parameter or buffer of a module changed: values in place, storage, or the tensor itself.

    Args:
        module: the module to watch, or a function returning it (read again when modules were re-registered:
            ``model.autoencoder = ...`` is then seen too).
    """

    def __init__(self, module: nn.Module | Callable[[], nn.Module]) -> None:
        self.source = module
        self._seen = -1
        # every parameter and buffer: the module's _parameters or _buffers dict holding it, its name, the tensor
        self._dicts: list[dict] = []
        self._names: list[str] = []
        self._tensors: list[Tensor] = []
        self._versioned: list[Tensor] = []  # those with a version counter (not made under inference_mode)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_seen": -1, "_dicts": [], "_names": [], "_tensors": [], "_versioned": []}

    def key(self) -> _Key:
        """Identity and in-place version counter of every parameter and buffer.

        Changes on optimiser steps, ``load_state_dict``, ``.to()``, replaced parameters and replaced modules.
        Tensors made under ``torch.inference_mode`` (a model built or loaded there) keep no version counter:
        their identity alone.
        """
        # (loops as map over C functions: this check runs on every call of the fast paths)
        if self._seen != _registrations[0] or any(map(operator.is_not, map(dict.get, self._dicts, self._names),
                                                      self._tensors)):
            # (the second test catches tensors put straight into a module's dicts, as Module._apply does when
            # torch.__future__ asks it to overwrite parameters on conversion)
            module = self.source if isinstance(self.source, nn.Module) else self.source()
            slots = [(d, name, t) for m in module.modules() for d in (m._parameters, m._buffers)
                     for name, t in d.items() if t is not None]
            self._dicts, self._names, self._tensors = ([slot[i] for slot in slots] for i in range(3))
            self._versioned = [t for t in self._tensors if not t.is_inference()]
            self._seen = _registrations[0]
        return tuple(map(Tensor.data_ptr, self._tensors)), tuple(map(_VERSION, self._versioned))


class _Plan:
    """Kernels of one encoder, reshaped for the fast path (built under ``torch.no_grad``)."""

    def __init__(self, autoencoder: KeypointAutoencoder | CNNAutoencoder) -> None:
        cfg = autoencoder.cfg
        self.slope = cfg.leaky_relu_slope
        self.eps = cfg.heatmap_eps
        self.size = cfg.image_size
        self.keypoints = isinstance(autoencoder, KeypointAutoencoder)
        if self.keypoints:
            trunk, head = autoencoder.encoder.trunk, autoencoder.encoder.heatmaps
        else:
            trunk, head = autoencoder.encoder[0], autoencoder.encoder[1]
            linear = autoencoder.encoder[4]
            self.linear_weight, self.linear_bias = linear.weight.detach().t().contiguous(), linear.bias.detach().clone()
        convs = [m for m in trunk if isinstance(m, nn.Conv2d)]
        first = convs[0]
        device = first.weight.device
        # The first conv's response to a frame of zeros (pixel value -0.5 after normalisation, plus the coordinate
        # channels and the bias) is what it adds to every frame; the rest is linear in the raw pixel values.
        zero = torch.zeros(1, self.size, self.size, 3, dtype=torch.uint8, device=device)
        self.bias_map = first(add_coord_channels(preprocess_frames(zero))).contiguous(memory_format=_CHANNELS_LAST)
        self.first_weight = (first.weight[:, :3] / 255.0).contiguous(memory_format=_CHANNELS_LAST)
        self.first_geometry = (first.padding, first.stride)
        self.convs = [(c.weight.detach().contiguous(memory_format=_CHANNELS_LAST), c.bias.detach().clone(),
                       c.padding, c.stride) for c in convs[1:]]
        self.head_weight = head.weight.detach()[:, :, 0, 0].t().contiguous()  # (C, K): the 1x1 conv as a matrix
        self.head_bias = head.bias.detach().clone()
        if self.keypoints:
            width = cfg.heatmap_width
            gx = torch.linspace(-1.0, 1.0, width, device=device).repeat(width)
            gy = torch.linspace(1.0, -1.0, width, device=device).repeat_interleave(width)
            self.grid = torch.stack([gx, gy, torch.ones_like(gx)])  # (3, h*w), rows: x, y, 1 per heatmap pixel
            # what adding eps per pixel adds to each sum (used in numpy, see __call__)
            self.grid_eps = (self.eps * self.grid.sum(1, keepdim=True)).numpy()
            self.eps_total = self.eps * width * width
        self.conv = _conv_fn()
        self.packed = self._pack()
        # (batch, torch threads) -> the conv stage compiled by oneDNN Graph, or None where that failed. The thread
        # count is part of the key: compiled primitives keep the count they were built with.
        self.compiled: dict[tuple[int, int], Callable[[Tensor], Tensor] | None] = {}

    def _pack(self) -> tuple[Callable[..., Tensor], Tensor, list[tuple[Tensor, Tensor, list[int], list[int]]]] | None:
        """Weights prepacked in oneDNN's layout for fused conv + leaky ReLU calls (one op per layer instead of
        two, and no weight reorder per call: ~10% of an encode at batch 1), if this build can, and if they give
        the unfused path's results on a test frame; else None (the unfused path)."""
        ops = _fused_ops()
        if ops is None or self.bias_map.device.type != "cpu":
            return None
        pointwise, reorder = ops
        try:
            shape = [1, 3, self.size, self.size]
            first = reorder(self.first_weight, list(self.first_geometry[0]), list(self.first_geometry[1]), [1, 1], 1,
                            shape)
            x = self.conv(torch.zeros(shape).contiguous(memory_format=_CHANNELS_LAST), self.first_weight, None,
                          *self.first_geometry)
            layers = []
            for weight, bias, padding, stride in self.convs:
                layers.append((reorder(weight, list(padding), list(stride), [1, 1], 1, list(x.shape)), bias,
                               list(padding), list(stride)))
                x = self.conv(x, weight, bias, padding, stride)
            packed = (pointwise, first, layers)
            frames = torch.randint(0, 256, (2, self.size, self.size, 3), dtype=torch.uint8,
                                   generator=torch.Generator().manual_seed(0))
            if not torch.allclose(self._trunk(frames, packed), self._trunk(frames, None), atol=1e-5, rtol=1e-5):
                return None
        except RuntimeError:  # a build or CPU without these kernels
            return None
        return packed

    def _compile(self, frames: Tensor) -> Callable[[Tensor], Tensor] | None:
        """:meth:`conv_stage` traced, frozen and fused by oneDNN Graph for ``frames``' batch size and the current thread
        count, if this build can and it gives the unfused path's results; else None. Takes ~0.1-0.3 s."""
        if not _onednn_graph() or frames.device.type != "cpu":
            return None
        test = torch.randint(0, 256, tuple(frames.shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        enabled = torch.jit.onednn_fusion_enabled()
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # TorchScript's deprecation notices and tracer warnings
                torch.jit.enable_onednn_fusion(True)
                compiled = torch.jit.freeze(torch.jit.trace(_ConvStage(self).eval(), test))
                for _ in range(3):  # profiling runs; the fused plan runs from the third call
                    out = compiled(test)
                fused = "oneDNNFusionGroup" in str(torch.jit.last_executed_optimized_graph())
                expected = self._trunk(test, None)
                expected = self._heatmap_sums(expected) if self.keypoints else expected
                if not fused or not torch.allclose(out, expected, atol=1e-5, rtol=1e-5):
                    return None
        except Exception:  # noqa: BLE001 - any failure of the (deprecated) compiler: the eager path serves
            return None
        finally:
            torch.jit.enable_onednn_fusion(enabled)
        return compiled

    def conv_stage(self, frames: Tensor) -> Tensor:
        """uint8 ``(N, H, W, 3)`` -> for keypoints :meth:`_heatmap_sums`, else the last conv's activations:
        compiled where it can be, else eager."""
        key = (frames.shape[0], torch.get_num_threads())
        compiled = self.compiled.get(key)
        if compiled is None and key not in self.compiled and len(self.compiled) < 8:
            compiled = self.compiled[key] = self._compile(frames)
        if compiled is not None:
            # a compiled graph checks its input's strides (else it runs its slow unfused fallback): contiguous
            # frames can still carry any stride on a size-1 dimension (``frame[None]`` in numpy gives 0)
            n, height, width, channels = frames.shape
            return compiled(frames.as_strided(frames.shape, (height * width * channels, width * channels, channels, 1)))
        x = self._trunk(frames, self.packed)
        return self._heatmap_sums(x) if self.keypoints else x

    def _head(self, x: Tensor) -> Tensor:
        """The last conv's activations -> the 1x1 head's maps, ``(N*h*w, K)`` (one matrix product)."""
        pixels = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])  # (N*h*w, C), a view of the channels-last maps
        return torch.addmm(self.head_bias, pixels, self.head_weight)

    def _heatmap_sums(self, x: Tensor) -> Tensor:
        """The last conv's activations -> ``(N, 3, K)``: per keypoint, the sums of x * m, y * m and m over its
        heatmap m (a second matrix product, against the ``[x, y, 1]`` grid)."""
        heatmaps = F.softplus(self._head(x)).view(x.shape[0], -1, self.head_weight.shape[1])  # (N, h*w, K)
        return torch.matmul(self.grid, heatmaps)

    def _trunk(self, frames: Tensor, packed: tuple | None) -> Tensor:
        """uint8 ``(N, H, W, 3)`` -> the last conv's activations, channels-last ``(N, C, h, w)``."""
        x = frames.permute(0, 3, 1, 2).float()  # channels-last (N, 3, H, W): the layout oneDNN wants
        if packed is None:
            x = self.conv(x, self.first_weight, None, *self.first_geometry).add_(self.bias_map)
            x = F.leaky_relu_(x, self.slope)
            for weight, bias, padding, stride in self.convs:
                x = F.leaky_relu_(self.conv(x, weight, bias, padding, stride), self.slope)
            return x
        pointwise, first, layers = packed
        padding, stride = self.first_geometry
        x = pointwise(x, first, None, list(padding), list(stride), [1, 1], 1, "none", [], "").add_(self.bias_map)
        x = F.leaky_relu_(x, self.slope)
        for weight, bias, padding, stride in layers:
            x = pointwise(x, weight, bias, padding, stride, [1, 1], 1, "leaky_relu", [self.slope], "")
        return x

    def __call__(self, frames: Tensor) -> Tensor:
        """uint8 ``(N, H, W, 3)`` -> float32 ``(N, feature_dim)``."""
        out = self.conv_stage(frames)
        n = out.shape[0]
        if not self.keypoints:
            maps = F.leaky_relu_(self._head(out), self.slope).view(n, -1, self.head_weight.shape[1])
            return torch.tanh(torch.addmm(self.linear_bias, maps.transpose(1, 2).reshape(n, -1), self.linear_weight))
        sums = out.numpy()  # (N, 3, K); the rest on these few numbers in numpy (cheaper calls)
        shifted = sums + self.grid_eps  # the same sums over (m + eps), as heatmaps_to_keypoints centres them
        xy = shifted[:, :2] / shifted[:, 2:]
        mass = sums[:, 2]  # mu = mean / (eps + max mean) = sum / (eps * h * w + max sum)
        mu = mass / (np.float32(self.eps_total) + mass.max(axis=-1, keepdims=True))
        return torch.from_numpy(np.concatenate([xy, mu[:, None]], axis=1).transpose(0, 2, 1).reshape(n, -1))


def _checked_frames(frames: np.ndarray | Tensor, size: int) -> Tensor:
    """uint8 ``(N, size, size, 3)`` frames (numpy or torch) as a contiguous tensor; anything else is named."""
    if (isinstance(frames, np.ndarray) and frames.dtype == np.uint8 and frames.shape[1:] == (size, size, 3)
            and frames.flags.c_contiguous):  # what an env gives: no copy, no conversion
        return torch.from_numpy(frames)
    frames = torch.as_tensor(np.ascontiguousarray(frames) if isinstance(frames, np.ndarray) else frames)
    if frames.dtype != torch.uint8 or frames.shape[1:] != (size, size, 3):
        raise ValueError(f"expected uint8 frames (N, {size}, {size}, 3), got {frames.dtype} of shape "
                         f"{tuple(frames.shape)}")
    return frames.contiguous()


class FastEncoder:
    """Pixels -> features of a :class:`~kp_rl.model.PerceptionModel`, for inference on the CPU.

    Call it under ``torch.inference_mode`` (or ``torch.no_grad``): it does not build autograd graphs.
    The reshaped kernels are rebuilt on the first call after any encoder parameter changed.

    Args:
        model: the perception model (keypoint or CNN representation), on the CPU.

    Raises:
        ValueError: the model is not on the CPU.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._check_cpu()
        self._key: _Key | None = None
        self._plan: _Plan | None = None
        self._watch = _TensorWatch(self._encoder)

    def _encoder(self) -> nn.Module:
        return self.model.autoencoder.encoder

    def __getstate__(self) -> dict:
        # the plan is derived (and holds a closure): a pickled copy rebuilds it on its first call
        return {**self.__dict__, "_key": None, "_plan": None}

    def _check_cpu(self) -> None:
        device = next(self.model.parameters()).device
        if device.type != "cpu":
            raise ValueError(f"FastEncoder runs on the CPU; the model is on {device}")

    def __call__(self, frames: np.ndarray | Tensor) -> Tensor:
        """uint8 ``(N, H, W, 3)`` frames (numpy or torch) -> float32 ``(N, feature_dim)``.

        Raises:
            ValueError: frames are not uint8 ``(N, S, S, 3)`` at the model's image size.
        """
        # contiguous (N, H, W, 3) rows: a channels-last (N, 3, H, W) image once permuted
        frames = _checked_frames(frames, self.model.image_size)
        key = self._watch.key()
        if key != self._key:  # also when the model was moved off the CPU since
            self._check_cpu()
            with torch.no_grad():
                self._plan = _Plan(self.model.autoencoder)
            self._key = key
        assert self._plan is not None
        return self._plan(frames)


class _BeliefPlan:
    """The weights of a :class:`~kp_rl.dynamics.KeypointVRNN` that its belief update reads, laid out for it.

    Matrix products run in torch (under the caller's torch thread count: numpy's OpenBLAS would start its own
    threads at a vector env's batch, and their spinning cost a vector step more than the update itself);
    the elementwise rest in numpy, on the same memory.
    """

    def __init__(self, dynamics: nn.Module) -> None:
        def weight(t: Tensor) -> Tensor:
            return t.detach().to("cpu", torch.float32).clone()

        cell = dynamics.cell
        units = self.units = cell.hidden_size
        # One matrix for the GRU: cat(x, z, action, h) -> [reset and update gates (input and hidden parts
        # summed) | the candidate's input part | its hidden part (scaled by the reset gate before adding)].
        w_ih, w_hh = weight(cell.weight_ih.t()), weight(cell.weight_hh.t())  # (inputs, 3H), (H, 3H)
        inputs = w_ih.shape[0]
        self.gru = torch.zeros(inputs + units, 4 * units)
        self.gru[:inputs, : 3 * units] = w_ih
        self.gru[inputs:, : 2 * units] = w_hh[:, : 2 * units]
        self.gru[inputs:, 3 * units:] = w_hh[:, 2 * units:]
        b_ih, b_hh = weight(cell.bias_ih), weight(cell.bias_hh)
        self.gru_bias = torch.cat([b_ih[: 2 * units] + b_hh[: 2 * units], b_ih[2 * units:], b_hh[2 * units:]])
        self.latent = dynamics.latent_dim
        if self.latent:  # the posterior's hidden layer and the mean half of its output layer
            first, last = dynamics.posterior.net[0], dynamics.posterior.net[2]
            self.w1, self.b1 = weight(first.weight.t()), weight(first.bias)
            self.w2, self.b2 = weight(last.weight[: self.latent].t()), weight(last.bias[: self.latent])

    def __call__(self, h: Tensor, z: Tensor, x: Tensor, features: Tensor, actions: Tensor) -> tuple[Tensor, Tensor]:
        units = self.units
        out = torch.addmm(self.gru_bias, torch.cat([x, z, actions, h], dim=1), self.gru).numpy()
        gates = out[:, : 2 * units]  # reset and update gates: sigmoid(v) = (1 + tanh(v / 2)) / 2
        gates *= 0.5
        np.tanh(gates, out=gates)
        gates *= 0.5
        gates += 0.5
        reset, update = gates[:, :units], gates[:, units:]
        new = out[:, 2 * units: 3 * units] + reset * out[:, 3 * units:]
        np.tanh(new, out=new)
        state = new + update * (h.numpy() - new)  # (1 - update) * new + update * h, as torch.nn.GRUCell
        h = torch.from_numpy(state)
        if not self.latent:
            return h, h.new_zeros(h.shape[0], 0)
        hidden = torch.addmm(self.b1, torch.cat([h, features], dim=1), self.w1)
        return h, torch.addmm(self.b2, hidden.relu_(), self.w2)


class FastBelief:
    """:meth:`KeypointVRNN.update_belief <kp_rl.dynamics.KeypointVRNN.update_belief>` for inference on the CPU.

    Call it under ``torch.inference_mode`` (or ``torch.no_grad``). The GRU step and the posterior mean in three
    matrix products (the GRU's two in one) and a few numpy operations instead of two dozen torch dispatches:
    21 vs 35 us for one env's step, back to back (the same at a batch of 8). What an observation wrapper with
    ``belief=True`` runs after every frame.
    The same state as the model's to float rounding (~1e-7); the weights are re-read whenever a parameter of
    ``model.dynamics`` changes (or the dynamics are replaced).

    Args:
        model: the perception model, with dynamics, on the CPU.

    Raises:
        ValueError: the model has no dynamics or is not on the CPU.
    """

    def __init__(self, model: nn.Module) -> None:
        if getattr(model, "dynamics", None) is None:
            raise ValueError("FastBelief needs a model with dynamics")
        device = next(model.dynamics.parameters()).device
        if device.type != "cpu":
            raise ValueError(f"FastBelief runs on the CPU; the dynamics are on {device}")
        self.model = model
        self._watch = _TensorWatch(functools.partial(getattr, model, "dynamics"))
        self._key: _Key | None = None
        self._plan: _BeliefPlan | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_key": None, "_plan": None}  # derived: rebuilt on the first call

    def __call__(self, state: VRNNState, features: Tensor, actions: Tensor) -> VRNNState:
        """The state after observing ``features (B, D)`` having taken ``actions (B, A)`` (CPU float32 tensors).

        Raises:
            ValueError: shapes that do not fit the model (named, as by ``update_belief``).
        """
        dynamics = self.model.dynamics
        dynamics._check_step(state, actions, features)
        key = self._watch.key()
        if key != self._key:
            self._plan, self._key = _BeliefPlan(dynamics), key
        assert self._plan is not None
        return VRNNState(*self._plan(state.h, state.z, state.x, features, actions), features)


class GraphedCall:
    """Run ``fn`` on a CUDA device by replaying a CUDA graph captured for each input signature.

    ``fn`` takes tensors and returns a tuple of tensors, with no host synchronisation and no randomness
    (CUDA graphs replay fixed kernels on fixed memory). Each distinct list of input shapes and dtypes gets one
    graph (``max_graphs`` of them, then ``fn`` runs eagerly for new signatures); inputs are copied into the
    graph's static buffers (asynchronously from pinned host memory), outputs are returned as fresh copies.
    All graphs are dropped and recaptured when a parameter or buffer of ``module`` changes
    (``load_state_dict``, optimiser steps). If a capture fails, a warning says why and ``fn`` runs eagerly
    from then on.

    Args:
        fn: the computation, ``fn(*tensors) -> tuple[Tensor, ...]``.
        module: the module whose parameters ``fn`` reads (on the CUDA device that ``fn`` runs on), or a picklable
            function returning it (``functools.partial(getattr, model, "autoencoder")``: a replaced submodule is
            then seen too).
        max_graphs: how many input signatures get a graph.
    """

    def __init__(self, fn: Callable[..., tuple[Tensor, ...]], module: nn.Module | Callable[[], nn.Module],
                 max_graphs: int = 8) -> None:
        device = next((module if isinstance(module, nn.Module) else module()).parameters()).device
        if device.type != "cuda":
            raise ValueError(f"GraphedCall replays CUDA graphs; the module is on {device}")
        self.fn, self.module, self.max_graphs, self.device = fn, module, max_graphs, device
        self.eager = False  # set when a capture failed
        self._watch = _TensorWatch(module)
        self._key: _Key | None = None
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[Tensor], tuple[Tensor, ...]]] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_key": None, "_graphs": {}}  # graphs are derived (and hold device memory)

    def __call__(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        key = self._watch.key()
        if key != self._key:
            self._graphs.clear()
            self._key = key
        signature = tuple((tuple(t.shape), t.dtype) for t in inputs)
        entry = self._graphs.get(signature)
        if entry is None:
            if self.eager or len(self._graphs) >= self.max_graphs:
                return self.fn(*(t.to(self.device, non_blocking=True) for t in inputs))
            entry = self._capture(inputs)
            if entry is None:
                return self.fn(*(t.to(self.device, non_blocking=True) for t in inputs))
            self._graphs[signature] = entry
        graph, static_inputs, static_outputs = entry
        for static, value in zip(static_inputs, inputs):
            static.copy_(value, non_blocking=True)
        graph.replay()
        return tuple(t.clone() for t in static_outputs)

    def _capture(self, inputs: Sequence[Tensor]):
        static_inputs = [torch.empty(t.shape, dtype=t.dtype, device=self.device) for t in inputs]
        for static, value in zip(static_inputs, inputs):
            static.copy_(value)
        try:
            side = torch.cuda.Stream(self.device)  # warm-up off the default stream, as capture requires
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.fn(*static_inputs)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_outputs = tuple(self.fn(*static_inputs))
        except RuntimeError as error:  # e.g. an op that synchronises with the host
            warnings.warn(f"CUDA graph capture failed, running eagerly instead: {error}", RuntimeWarning,
                          stacklevel=3)
            self.eager = True
            return None
        return graph, static_inputs, static_outputs


def _encode_flat(model: nn.Module, frames: Tensor) -> tuple[Tensor]:
    return (model.encode(frames),)


class GraphedEncoder:
    """Pixels -> features of a :class:`~kp_rl.model.PerceptionModel` on a CUDA device, from CUDA graphs.

    The same function as ``model.encode`` on uint8 ``(N, S, S, 3)`` frames; frames go through a reused pinned
    host buffer. Call it under ``torch.inference_mode`` (or ``torch.no_grad``).

    Args:
        model: the perception model, on a CUDA device.
        max_graphs: how many batch sizes get a graph (others run eagerly).

    Raises:
        ValueError: the model is not on a CUDA device.
    """

    def __init__(self, model: nn.Module, max_graphs: int = 8) -> None:
        self.model = model
        autoencoder = functools.partial(getattr, model, "autoencoder")  # read on each check: a replaced one is seen
        self.call = GraphedCall(functools.partial(_encode_flat, model), autoencoder, max_graphs)
        self._staging: Tensor | None = None
        self._done: torch.cuda.Event | None = None  # recorded after the last call's copy and replay

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_staging": None, "_done": None}

    def __call__(self, frames: np.ndarray | Tensor) -> Tensor:
        """uint8 ``(N, H, W, 3)`` frames (numpy or torch) -> float32 ``(N, feature_dim)`` on the model's device.

        Raises:
            ValueError: frames are not uint8 ``(N, S, S, 3)`` at the model's image size.
        """
        size = self.model.image_size
        frames = _checked_frames(frames, size)
        if frames.device.type != "cpu":
            return self.call(frames)[0]
        # Through a reused pinned buffer, so that the copy to the device is asynchronous; the previous call's
        # copy must have finished before the buffer is overwritten (it has when its features were read back).
        if self._done is not None:
            self._done.synchronize()
        staging = self._staging
        if staging is None or staging.shape[0] < len(frames):
            staging = self._staging = torch.empty((len(frames), size, size, 3), dtype=torch.uint8, pin_memory=True)
        features = self.call(staging[: len(frames)].copy_(frames))[0]
        self._done = self._done or torch.cuda.Event()
        self._done.record()
        return features
