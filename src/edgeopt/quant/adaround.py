"""AdaRound: learned up/down rounding of weights (Nagel et al. 2020, "Up or Down?").

Rounding every weight to nearest minimizes each weight's error, not the
layer's. AdaRound chooses, per weight, ``floor`` or ``floor + 1`` to minimize
the output error over the layer's calibration inputs ``X``::

    min || W X - W~ X ||^2,   W~ = s * clip(floor(W / s) + h, qmin, qmax),  h in {0, 1}

relaxed to a continuous ``h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)``
(rectified sigmoid, ``zeta = 1.1``, ``gamma = -0.1``; ``V`` starts where
``h`` equals the fractional part, i.e. at round-to-nearest's soft value)
plus a regularizer that drives ``h`` to 0 or 1::

    lambda * sum(1 - |2 h(V) - 1| ** beta)

off for the first ``warmup`` fraction of the iterations, then with ``beta``
annealed linearly from ``beta_start`` (20) to ``beta_end`` (2). The result
rounds up where ``h(V) >= 0.5``.

Output channels are independent problems: row ``n``'s loss is
``mean_x ((w_n - w~_n) . x)^2``. It is measured in units of the row's
quantization step (divided by ``s_n^2``) and by the mean input power
``mean(x^2)``, so one ``lambda`` (default 1.0) weighs the regularizer alike
for every layer and data scale. Minimized by Adam over full batches of the sampled
inputs, through the Gram matrix ``X^T X / S`` when the input width ``K`` is at
most twice the sample count. At the end each row keeps whichever of the
learned and the nearest rounding has the smaller loss on the samples, so a
layer is never worse than round-to-nearest on its calibration sample.

Layouts: a layer is ``G`` independent problems ``W[G, N, K]``, ``X[G, S, K]``.
A Conv ``W[M, C/g, kh, kw]`` has ``G = g``, ``N = M/g`` and ``K = C/g kh kw``
with the im2col patches of the group's channels; Gemm/MatMul have ``G = 1``
and the input's rows (weight ``[K, N]`` viewed as ``[N, K]``).

Samples: up to ``max_samples`` rows (patch positions) per layer, reservoir-
sampled from the calibration stream with a seeded generator: deterministic
for a given data order, memory ``max_samples x K`` float32 per layer, all
layers at once (one pass over the data). Inputs are the float model's. A
layer with fewer samples than weights per output channel would overfit and
is left to round-to-nearest.

Backends: numpy (float64, always) and torch (float32, autograd, faster on big
layers) when it is importable; ``Backend.AUTO`` picks torch then. Same math,
so the two agree up to float rounding of near-ties.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.util
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from edgeopt import ir as eir
from edgeopt.errors import ConfigError
from edgeopt.quant.bias_correction import round_to_nearest
from edgeopt.quant.config import PerChannel, PerTensor
from edgeopt.quant.formats import INT8_SYMMETRIC
from edgeopt.quant.ops import weight_axis
from edgeopt.quant.primitives import dequantize, quantize_per_channel
from edgeopt.quant.registry import Batch, ProgressCallback
from edgeopt.runtime.ort import observing_session

__all__ = [
    "AdaRoundConfig",
    "AdaRoundResult",
    "Backend",
    "LayerInputSampler",
    "RoundedLayer",
    "adaround_layer",
    "adaround_model",
    "adaround_weights",
]

logger = logging.getLogger(__name__)

_ZETA, _GAMMA = 1.1, -0.1
_ADAM_BETAS, _ADAM_EPS = (0.9, 0.999), 1e-8
_QMIN, _QMAX = INT8_SYMMETRIC.qmin, INT8_SYMMETRIC.qmax


class Backend(enum.Enum):
    AUTO = "auto"  # torch when importable, else numpy
    NUMPY = "numpy"
    TORCH = "torch"


@dataclass(frozen=True, kw_only=True)
class AdaRoundConfig:
    """Settings of the rounding optimization.

    Defaults are the paper's (beta 20 -> 2, 20% warm-up) except
    ``regularization``: in the normalized loss of this module (squared
    quantization steps per unit input power), 1.0 leaves under 2% of the
    weights undecided after 1000 iterations; the paper's 0.01, set for its
    unnormalized loss, leaves about half undecided here.
    """

    iterations: int = 1000
    learning_rate: float = 0.01
    regularization: float = 1.0
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    max_samples: int = 1024
    seed: int = 0
    backend: Backend = Backend.AUTO

    def __post_init__(self) -> None:
        for key in ("iterations", "max_samples", "seed"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "seed" else 1):
                raise ConfigError(f"AdaRound {key} must be a {'non-negative' if key == 'seed' else 'positive'} "
                                  f"integer, got {value!r}")
        for key in ("learning_rate", "regularization", "beta_start", "beta_end"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"AdaRound {key} must be a positive number, got {value!r}")
        if not isinstance(self.warmup, (int, float)) or not 0 <= self.warmup < 1:
            raise ConfigError(f"AdaRound warmup must be a fraction in [0, 1), got {self.warmup!r}")
        if not isinstance(self.backend, Backend):
            raise ConfigError(f"AdaRound backend must be one of {', '.join(b.name for b in Backend)}, "
                              f"got {self.backend!r}")
        if self.backend is Backend.TORCH and not _torch_available():
            raise ConfigError("AdaRound backend TORCH needs torch: install edgeopt[torch] or use Backend.NUMPY")


def _torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


# --------------------------------------------------------------------------
# one layer
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Problem:
    """``rest`` = W/s - floor(W/s) and ``floor`` as [G, N, K]; the loss metric ``gram`` [G, K, K]
    or the normalized samples ``samples`` [G, S, K] (one of the two)."""

    floor: np.ndarray
    rest: np.ndarray
    gram: np.ndarray | None
    samples: np.ndarray | None

    def product(self, error: np.ndarray) -> np.ndarray:
        """``error @ C`` with ``C = X^T X / (S mean(x^2))``, batched over groups."""
        if self.gram is not None:
            return error @ self.gram
        return (error @ self.samples.transpose(0, 2, 1)) @ self.samples

    def row_loss(self, ints: np.ndarray) -> np.ndarray:
        error = self.floor + self.rest - ints
        return (self.product(error) * error).sum(axis=-1)


def _as_groups(array: np.ndarray, rank: int) -> np.ndarray:
    return array[None] if array.ndim == rank - 1 else array


def _problem(weight: np.ndarray, inputs: np.ndarray, scale: np.ndarray) -> _Problem:
    scaled = weight.astype(np.float64) / scale
    floor = np.floor(scaled)
    samples = inputs.astype(np.float64)
    power = np.mean(samples**2, axis=(1, 2), keepdims=True)
    samples = samples / np.sqrt(np.where(power > 0, power, 1.0) * samples.shape[1])
    width = samples.shape[2]
    if width <= 2 * samples.shape[1]:
        return _Problem(floor=floor, rest=scaled - floor, gram=samples.transpose(0, 2, 1) @ samples, samples=None)
    return _Problem(floor=floor, rest=scaled - floor, gram=None, samples=samples)


def _initial_v(rest: np.ndarray) -> np.ndarray:
    probability = np.clip((rest - _GAMMA) / (_ZETA - _GAMMA), 1e-6, 1 - 1e-6)
    return np.log(probability / (1 - probability))


def _beta(step: int, config: AdaRoundConfig) -> float | None:
    """The regularizer's exponent at ``step`` (None during warm-up)."""
    start = int(config.warmup * config.iterations)
    if step < start:
        return None
    progress = (step - start) / max(config.iterations - start, 1)
    return config.beta_end + (config.beta_start - config.beta_end) * max(0.0, 1.0 - progress)


def _numpy_gradient(v: np.ndarray, problem: _Problem, beta: float | None, config: AdaRoundConfig) -> np.ndarray:
    sigmoid = 1.0 / (1.0 + np.exp(-v))
    stretched = sigmoid * (_ZETA - _GAMMA) + _GAMMA
    soft = np.clip(stretched, 0.0, 1.0)
    value = problem.floor + soft
    inside = (value >= _QMIN) & (value <= _QMAX) & (stretched > 0.0) & (stretched < 1.0)
    error = problem.floor + problem.rest - np.clip(value, _QMIN, _QMAX)
    gradient_soft = -2.0 * problem.product(error)
    if beta is not None:
        centered = 2.0 * soft - 1.0
        gradient_soft -= config.regularization * 2.0 * beta * np.abs(centered) ** (beta - 1) * np.sign(centered)
    return np.where(inside, gradient_soft * sigmoid * (1.0 - sigmoid) * (_ZETA - _GAMMA), 0.0)


def _optimize_numpy(problem: _Problem, config: AdaRoundConfig) -> np.ndarray:
    v = _initial_v(problem.rest)
    first, second = np.zeros_like(v), np.zeros_like(v)
    (beta1, beta2) = _ADAM_BETAS
    for step in range(config.iterations):
        gradient = _numpy_gradient(v, problem, _beta(step, config), config)
        first = beta1 * first + (1 - beta1) * gradient
        second = beta2 * second + (1 - beta2) * gradient**2
        corrected_first = first / (1 - beta1 ** (step + 1))
        corrected_second = second / (1 - beta2 ** (step + 1))
        v = v - config.learning_rate * corrected_first / (np.sqrt(corrected_second) + _ADAM_EPS)
    return v


def _optimize_torch(problem: _Problem, config: AdaRoundConfig) -> np.ndarray:
    import torch  # optional dependency: only this backend needs it

    def tensor(array):
        return None if array is None else torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))

    floor, target = tensor(problem.floor), tensor(problem.floor + problem.rest)
    gram, samples = tensor(problem.gram), tensor(problem.samples)
    v = torch.nn.Parameter(tensor(_initial_v(problem.rest)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: threads only contend (and one thread is deterministic)
    try:
        _torch_steps(v, floor, target, gram, samples, config)
    finally:
        torch.set_num_threads(threads)
    return v.detach().numpy().astype(np.float64)


def _torch_steps(v, floor, target, gram, samples, config: AdaRoundConfig) -> None:
    import torch

    optimizer = torch.optim.Adam([v], lr=config.learning_rate, betas=_ADAM_BETAS, eps=_ADAM_EPS)
    for step in range(config.iterations):
        soft = torch.clamp(torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA, 0.0, 1.0)
        error = target - torch.clamp(floor + soft, _QMIN, _QMAX)
        product = error @ gram if gram is not None else (error @ samples.transpose(1, 2)) @ samples
        loss = (product * error).sum()
        beta = _beta(step, config)
        if beta is not None:
            loss = loss + config.regularization * (1 - (2 * soft - 1).abs().pow(beta)).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _use_torch(backend: Backend) -> bool:
    return backend is Backend.TORCH or (backend is Backend.AUTO and _torch_available())


def _learned_ints(problem: _Problem, config: AdaRoundConfig) -> np.ndarray:
    v = _optimize_torch(problem, config) if _use_torch(config.backend) else _optimize_numpy(problem, config)
    learned = np.clip(problem.floor + (v >= 0.0), _QMIN, _QMAX)
    nearest = np.clip(np.rint(problem.floor + problem.rest), _QMIN, _QMAX)
    keep_nearest = problem.row_loss(nearest) < problem.row_loss(learned)
    return np.where(keep_nearest[..., None], nearest, learned)


def adaround_layer(weight: np.ndarray, inputs: np.ndarray, scale, config: AdaRoundConfig = AdaRoundConfig(),
                   ) -> np.ndarray:
    """Int8 weights ``q`` (``weight ~ q * scale``) of least output error on ``inputs``.

    ``weight`` is ``[N, K]`` (output channels by inputs) or ``[G, N, K]`` for
    ``G`` independent groups; ``inputs`` is ``[S, K]`` or ``[G, S, K]``;
    ``scale`` is a scalar, ``[N]`` or ``[G, N]`` (per output channel), e.g.
    from :func:`edgeopt.quant.primitives.quantize_per_channel`. Returns int8
    in ``weight``'s shape, in ``[-127, 127]``.
    """
    weight = np.asarray(weight)
    grouped = _as_groups(weight, 3)
    samples = _as_groups(np.asarray(inputs), 3)
    if grouped.ndim != 3 or samples.ndim != 3 or samples.shape[::2] != grouped.shape[::2]:
        raise ValueError(f"weight {list(weight.shape)} and inputs {list(np.shape(inputs))} do not match "
                         "([N, K] with [S, K], or [G, N, K] with [G, S, K])")
    ints = _learned_ints(_problem(grouped, samples, _row_scales(scale, grouped)[..., None]), config)
    return ints.astype(np.int8).reshape(weight.shape)


# --------------------------------------------------------------------------
# layer inputs from calibration data: im2col rows, reservoir-sampled
# --------------------------------------------------------------------------


class _Reservoir:
    """Algorithm R over a stream of rows, vectorized per offer; seeded, so deterministic."""

    def __init__(self, capacity: int, rng: np.random.Generator) -> None:
        self.capacity = capacity
        self.rng = rng
        self.seen = 0
        self.rows: np.ndarray | None = None

    def choose(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """``(candidates, slots)``: which of the ``count`` next rows are kept, and where."""
        index = self.seen + np.arange(count)
        slots = np.where(index < self.capacity, index, self.rng.integers(0, index + 1))
        kept = np.flatnonzero(slots < self.capacity)
        # Later rows overwrite earlier ones in the same slot, as the sequential algorithm does.
        _, last = np.unique(slots[kept][::-1], return_index=True)
        kept = kept[::-1][last]
        self.seen += count
        return kept, slots[kept]

    def store(self, slots: np.ndarray, rows: np.ndarray) -> None:
        if self.rows is None:
            self.rows = np.zeros((self.capacity, rows.shape[1]), dtype=np.float32)
        self.rows[slots] = rows

    def result(self) -> np.ndarray | None:
        return None if self.rows is None else self.rows[: min(self.capacity, self.seen)].copy()


def _conv_geometry(node: ir.Node, weight: np.ndarray, spatial: tuple[int, int]) -> tuple[list[int], ...]:
    """``(pads [top, left, bottom, right], strides, dilations, output size)`` of a 2-D Conv."""
    kernel = list(weight.shape[2:])
    strides = list(node.attributes.get_ints("strides", [1, 1]))
    dilations = list(node.attributes.get_ints("dilations", [1, 1]))
    auto_pad = node.attributes.get_string("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0, 0, 0, 0]
        for axis in range(2):
            total = max((math.ceil(spatial[axis] / strides[axis]) - 1) * strides[axis]
                        + (kernel[axis] - 1) * dilations[axis] + 1 - spatial[axis], 0)
            small = total // 2
            pads[axis], pads[axis + 2] = (small, total - small) if auto_pad == "SAME_UPPER" else (total - small, small)
    else:
        pads = list(node.attributes.get_ints("pads", [0, 0, 0, 0])) if auto_pad == "NOTSET" else [0, 0, 0, 0]
    size = [(spatial[a] + pads[a] + pads[a + 2] - (kernel[a] - 1) * dilations[a] - 1) // strides[a] + 1
            for a in range(2)]
    return pads, strides, dilations, size


def _conv_patches(node: ir.Node, weight: np.ndarray, batch: np.ndarray, reservoir: _Reservoir) -> None:
    pads, strides, dilations, (height, width) = _conv_geometry(node, weight, batch.shape[2:])
    candidates, slots = reservoir.choose(batch.shape[0] * height * width)
    if len(candidates) == 0:  # the reservoir is full and keeps none of this batch
        return
    image, y, x = np.unravel_index(candidates, (batch.shape[0], height, width))
    padded = np.pad(batch, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    rows = (y * strides[0])[:, None] + np.arange(weight.shape[2]) * dilations[0]
    cols = (x * strides[1])[:, None] + np.arange(weight.shape[3]) * dilations[1]
    channels = np.arange(batch.shape[1])
    patches = padded[image[:, None, None, None], channels[None, :, None, None], rows[:, None, :, None],
                     cols[:, None, None, :]]
    reservoir.store(slots, patches.reshape(len(candidates), -1))


def _dense_rows(node: ir.Node, batch: np.ndarray, reservoir: _Reservoir) -> None:
    if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
        batch = batch.T
    rows = batch.reshape(-1, batch.shape[-1])
    candidates, slots = reservoir.choose(rows.shape[0])
    reservoir.store(slots, rows[candidates])


def _layer_refusal(node: ir.Node | None) -> str | None:
    """Why ``node`` is not a layer AdaRound handles (None when it is)."""
    if node is None:
        return "no node of that name"
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("Conv", "Gemm", "MatMul"):
        return f"{node.op_type} is not a Conv/Gemm/MatMul"
    weight = eir.constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None or not np.issubdtype(weight.dtype, np.floating):
        return "the weight is not a float constant"
    if node.op_type == "Conv" and weight.ndim != 4:
        return f"only 2-D convolutions (weight rank {weight.ndim})"
    if node.op_type != "Conv" and weight.ndim != 2:
        return f"the weight has rank {weight.ndim}, not 2"
    return None


class LayerInputSampler:
    """A calibration hook collecting up to ``max_samples`` input rows per layer (im2col for Conv).

    ``tensors`` lists what the calibration pass must fetch; ``update(feed,
    outputs)`` streams a batch; ``result()`` maps node name to rows ``[S, K]``
    (``K = C kh kw`` for a Conv, channels outermost). Nodes AdaRound cannot
    handle are listed in ``skipped`` with the reason, and not sampled.
    """

    def __init__(self, model: ir.Model, nodes: Sequence[str], *, max_samples: int = 1024, seed: int = 0) -> None:
        by_name = {node.name: node for node in model.graph}
        refusals = {name: _layer_refusal(by_name.get(name)) for name in dict.fromkeys(nodes)}
        self.skipped = tuple((name, reason) for name, reason in refusals.items() if reason is not None)
        self._layers = {name: by_name[name] for name, reason in refusals.items() if reason is None}
        self._weights = {name: eir.constant_array(node.inputs[1]) for name, node in self._layers.items()}
        self._reservoirs = {name: _Reservoir(max_samples, np.random.default_rng([seed, index]))
                            for index, name in enumerate(self._layers)}
        self.tensors = tuple(dict.fromkeys(node.inputs[0].name for node in self._layers.values()))

    def update(self, feed: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        for name, node in self._layers.items():
            tensor = node.inputs[0].name
            batch = np.asarray(outputs[tensor] if tensor in outputs else feed[tensor], dtype=np.float32)
            if node.op_type == "Conv":
                _conv_patches(node, self._weights[name], batch, self._reservoirs[name])
            else:
                _dense_rows(node, batch, self._reservoirs[name])

    def result(self) -> dict[str, np.ndarray]:
        results = {name: reservoir.result() for name, reservoir in self._reservoirs.items()}
        return {name: rows for name, rows in results.items() if rows is not None}


# --------------------------------------------------------------------------
# a model
# --------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class RoundedLayer:
    """One layer's result: mean squared output error on its samples, nearest vs AdaRound."""

    node: str
    weight: str
    samples: int
    mse_nearest: float
    mse_adaround: float


@dataclass(frozen=True, kw_only=True)
class AdaRoundResult:
    """Int8 weights by weight tensor name (in the weight's own layout), their scales, and a report.

    ``weights[name]`` pairs with ``scales[name]`` along the QDQ builder's
    axis for that op (``quant.ops.weight_axis``; None when per tensor).
    """

    weights: Mapping[str, np.ndarray]
    scales: Mapping[str, np.ndarray]
    axes: Mapping[str, int | None]
    layers: tuple[RoundedLayer, ...]
    skipped: tuple[tuple[str, str], ...]
    granularity: PerTensor | PerChannel = PerChannel()

    def weight_quantizer(self):
        """``quantize_weight(weight, node)`` for bias correction: these weights, nearest for others."""
        nearest = round_to_nearest(self.granularity)

        def quantize_weight(weight: np.ndarray, node: ir.Node) -> np.ndarray:
            name = node.inputs[1].name
            if name not in self.weights:
                return nearest(weight, node)
            return dequantize(self.weights[name], self.scales[name], 0, axis=self.axes[name])

        return quantize_weight


def _row_scales(scale, matrices: np.ndarray) -> np.ndarray:
    """A scalar or per-output-channel scale as ``[G, N]``, matching ``matrices[G, N, K]``."""
    flat = np.asarray(scale, dtype=np.float64).reshape(-1)
    return np.broadcast_to(flat, (matrices.shape[0] * matrices.shape[1],)).reshape(matrices.shape[:2])


def _weight_matrices(node: ir.Node, weight: np.ndarray) -> np.ndarray:
    """The weight as ``[G, N, K]``: output channels of each group by that group's inputs."""
    if node.op_type == "Conv":
        group = node.attributes.get_int("group", 1)
        return weight.reshape(group, weight.shape[0] // group, -1)
    transposed = node.op_type == "Gemm" and node.attributes.get_int("transB", 0)
    return (weight if transposed else weight.T)[None]


def _sample_matrices(node: ir.Node, rows: np.ndarray) -> np.ndarray:
    """Input rows ``[S, K_total]`` as ``[G, S, K]`` (a Conv patch lists its channels outermost)."""
    group = node.attributes.get_int("group", 1) if node.op_type == "Conv" else 1
    return rows.reshape(rows.shape[0], group, -1).transpose(1, 0, 2)


def _from_matrices(node: ir.Node, ints: np.ndarray, weight: np.ndarray) -> np.ndarray:
    if node.op_type == "Conv":
        return ints.reshape(weight.shape)
    transposed = node.op_type == "Gemm" and node.attributes.get_int("transB", 0)
    return ints[0] if transposed else ints[0].T


def _output_mse(matrices: np.ndarray, samples: np.ndarray, quantized: np.ndarray) -> float:
    error = (matrices - quantized) @ samples.transpose(0, 2, 1)  # [G, N, S]
    return float(np.mean(error**2))


def _weight_axis(node: ir.Node, rank: int, granularity: PerTensor | PerChannel) -> int | None:
    if not isinstance(granularity, PerChannel):
        return None
    return granularity.axis if granularity.axis is not None else weight_axis(node, rank)


def _round_layer(node: ir.Node, rows: np.ndarray, config: AdaRoundConfig,
                 granularity: PerTensor | PerChannel) -> tuple[np.ndarray, np.ndarray, int | None, RoundedLayer]:
    weight = eir.constant_array(node.inputs[1])
    axis = _weight_axis(node, weight.ndim, granularity)
    nearest, scale, _ = quantize_per_channel(weight, axis)
    matrices = _weight_matrices(node, weight.astype(np.float64))
    samples = _sample_matrices(node, rows.astype(np.float64))
    row_scales = _row_scales(scale, matrices)[..., None]
    ints = adaround_layer(matrices, samples, row_scales[..., 0], config)
    report = RoundedLayer(
        node=eir.node_label(node), weight=node.inputs[1].name, samples=rows.shape[0],
        mse_nearest=_output_mse(matrices, samples, _weight_matrices(node, nearest) * row_scales),
        mse_adaround=_output_mse(matrices, samples, ints * row_scales))
    return _from_matrices(node, ints, weight), scale, axis, report


def _refusal(node: ir.Node | None, rows: np.ndarray, done: Mapping[str, np.ndarray]) -> str | None:
    reason = _layer_refusal(node)
    if reason is not None:
        return reason
    if node.inputs[1].name in done:
        return f"its weight {node.inputs[1].name!r} is shared with an earlier layer"
    width = _weight_matrices(node, eir.constant_array(node.inputs[1])).shape[2]
    if rows.shape[0] < width:
        return (f"{rows.shape[0]} input samples for {width} weights per output channel would overfit: "
                "give more calibration data")
    return None


def adaround_weights(model: ir.Model, samples: Mapping[str, np.ndarray], *,
                     config: AdaRoundConfig = AdaRoundConfig(),
                     granularity: PerTensor | PerChannel = PerChannel(),
                     progress: ProgressCallback | None = None) -> AdaRoundResult:
    """Learn the rounding of every layer in ``samples`` (node name -> rows, :class:`LayerInputSampler`).

    ``model`` is only read. Scales are the QDQ builder's: min/max int8
    symmetric per output channel (or per tensor with ``PerTensor()``). A
    layer with fewer samples than weights per output channel is skipped.
    ``progress(done, total)`` counts layers.
    """
    by_name = {node.name: node for node in model.graph}
    weights, scales, axes, layers, skipped = {}, {}, {}, [], []
    for done, (name, rows) in enumerate(samples.items(), start=1):
        node = by_name.get(name)
        refusal = _refusal(node, rows, weights)
        if refusal is not None:
            skipped.append((name, refusal))
        else:
            ints, scale, axis, report = _round_layer(node, rows, config, granularity)
            weights[report.weight], scales[report.weight], axes[report.weight] = ints, scale, axis
            layers.append(report)
            logger.info("adaround %s: output mse %.3g -> %.3g", name, report.mse_nearest, report.mse_adaround)
        if progress is not None:
            progress(done, len(samples))
    return AdaRoundResult(weights=weights, scales=scales, axes=axes, layers=tuple(layers), skipped=tuple(skipped),
                          granularity=granularity)


def adaround_model(model: ir.Model, data: Iterable[Batch], *, nodes: Sequence[str] | None = None,
                   config: AdaRoundConfig = AdaRoundConfig(),
                   granularity: PerTensor | PerChannel = PerChannel(),
                   progress: ProgressCallback | None = None) -> AdaRoundResult:
    """AdaRound for ``nodes`` (default: every Conv/Gemm/MatMul with a constant weight) of ``model``.

    One pass of ``data`` through ONNX Runtime samples each layer's inputs
    (:class:`LayerInputSampler`), then :func:`adaround_weights` learns the
    rounding. ``model`` is only read; the int8 weights are returned by
    weight tensor name for the QDQ builder.
    """
    names = list(nodes) if nodes is not None else [n.name for n in model.graph if _layer_refusal(n) is None]
    sampler = LayerInputSampler(model, names, max_samples=config.max_samples, seed=config.seed)
    inputs = {spec.name for spec in eir.model_inputs(model)}
    fetch = [name for name in sampler.tensors if name not in inputs]
    session = observing_session(model, fetch)
    for batch in data:
        sampler.update(batch, session.run(batch, fetch) if fetch else {})
    result = adaround_weights(model, sampler.result(), config=config, granularity=granularity, progress=progress)
    return dataclasses.replace(result, skipped=(*sampler.skipped, *result.skipped))
