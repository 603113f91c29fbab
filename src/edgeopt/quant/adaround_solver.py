"""AdaRound's per-layer problem: learned up/down rounding of a weight matrix (Nagel et al. 2020).

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

Layout: ``G`` independent problems ``W[G, N, K]`` (output channels by
inputs) with samples ``X[G, S, K]``; how a Conv, Gemm or MatMul maps onto it
is :mod:`edgeopt.quant.adaround`'s business.

Backends: numpy (float64, always) and torch (float32, autograd, faster on big
layers) when it is importable; ``Backend.AUTO`` picks torch then. Same math,
so the two agree up to float rounding of near-ties.
"""

from __future__ import annotations

import enum
import importlib.util
import math
from dataclasses import dataclass

import numpy as np

from edgeopt._scalars import is_integer
from edgeopt.errors import ConfigError
from edgeopt.quant.formats import INT8_SYMMETRIC

__all__ = ["AdaRoundConfig", "Backend", "adaround_layer", "backend_used", "channel_scales", "check_layout"]

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
            if not is_integer(value) or value < (0 if key == "seed" else 1):
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
# the relaxed problem and its solvers
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
    v = tensor(_initial_v(problem.rest))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: threads only contend (and one thread is deterministic)
    try:
        _torch_steps(v, floor, target, gram, samples, config)
    finally:
        torch.set_num_threads(threads)
    return v.detach().numpy().astype(np.float64)


def _torch_steps(v, floor, target, gram, samples, config: AdaRoundConfig) -> None:
    """Adam on ``v`` in place, with the gradient written out as :func:`_numpy_gradient` has it:
    autograd and torch's optimizer cost three times the arithmetic on these small layers."""
    import torch

    (beta1, beta2), span = _ADAM_BETAS, _ZETA - _GAMMA
    first, second = torch.zeros_like(v), torch.zeros_like(v)
    with torch.no_grad():
        for step in range(config.iterations):
            sigmoid = torch.sigmoid(v)
            stretched = sigmoid * span + _GAMMA
            soft = stretched.clamp(0.0, 1.0)
            value = floor + soft
            inside = (value >= _QMIN) & (value <= _QMAX) & (stretched > 0.0) & (stretched < 1.0)
            error = target - value.clamp(_QMIN, _QMAX)
            product = error @ gram if gram is not None else (error @ samples.transpose(1, 2)) @ samples
            gradient_soft = product.mul_(-2.0)
            beta = _beta(step, config)
            if beta is not None:
                centered = 2.0 * soft - 1.0
                gradient_soft -= config.regularization * 2.0 * beta * centered.abs().pow(beta - 1) * centered.sign()
            gradient = torch.where(inside, gradient_soft * sigmoid * (1.0 - sigmoid) * span, 0.0)
            first.mul_(beta1).add_(gradient, alpha=1 - beta1)
            second.mul_(beta2).addcmul_(gradient, gradient, value=1 - beta2)
            denominator = (second / (1 - beta2 ** (step + 1))).sqrt_().add_(_ADAM_EPS)
            v.sub_(config.learning_rate / (1 - beta1 ** (step + 1)) * first / denominator)


def _use_torch(backend: Backend) -> bool:
    return backend is Backend.TORCH or (backend is Backend.AUTO and _torch_available())


def backend_used(backend: Backend = Backend.AUTO) -> Backend:
    """The backend ``backend`` resolves to here (AUTO: torch when importable): the two optimize the
    same loss but round a few weights differently, so the report names it."""
    return Backend.TORCH if _use_torch(backend) else Backend.NUMPY


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
    grouped, samples = check_layout(weight, inputs)
    ints = _learned_ints(_problem(grouped, samples, channel_scales(scale, grouped)[..., None]), config)
    return ints.astype(np.int8).reshape(np.shape(weight))


def check_layout(weight, inputs) -> tuple[np.ndarray, np.ndarray]:
    """``weight`` and ``inputs`` as ``[G, N, K]`` and ``[G, S, K]``; a ValueError if they do not match."""
    grouped = _as_groups(np.asarray(weight), 3)
    samples = _as_groups(np.asarray(inputs), 3)
    if grouped.ndim != 3 or samples.ndim != 3 or samples.shape[::2] != grouped.shape[::2]:
        raise ValueError(f"weight {list(np.shape(weight))} and inputs {list(np.shape(inputs))} do not match "
                         "([N, K] with [S, K], or [G, N, K] with [G, S, K])")
    return grouped, samples


def channel_scales(scale, matrices: np.ndarray) -> np.ndarray:
    """A scalar or per-output-channel scale as ``[G, N]``, matching ``matrices[G, N, K]``."""
    flat = np.asarray(scale, dtype=np.float64).reshape(-1)
    return np.broadcast_to(flat, (matrices.shape[0] * matrices.shape[1],)).reshape(matrices.shape[:2])
