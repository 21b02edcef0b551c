r"""Metrics for the proximal step: Euclidean, Fisher-weighted and data-aware.

A metric is a pair of symmetric positive definite matrices ``A`` (rows, ``m x m``) and ``B``
(columns, ``n x n``) defining the inner product ``<X, Y> = tr(X^T A Y B)`` on ``m x n``
matrices. In that metric the prox of ``tau ||A^{1/2} W B^{1/2}||_*`` (or of any spectral
regulariser ``g``: the rank penalty, a rank constraint) is

    prox(Y) = A^{-1/2} prox_g(A^{1/2} Y B^{1/2}) B^{-1/2},

because ``Z = A^{1/2} X B^{1/2}`` is an isometry from that metric to the Frobenius one. So a
metric maps ``W -> A^{1/2} W B^{1/2}`` before the backend and back after (:class:`Weighting`),
and the same map turns the Eckart-Young truncation into the weighted one:
``A^{-1/2} [A^{1/2} W B^{1/2}]_r B^{-1/2}`` minimises ``||A^{1/2} (W - X) B^{1/2}||_F`` over
``rank(X) <= r``.

Each :class:`Metric` turns statistics kept in a matrix's proxrank state into ``A`` and ``B``
(``None`` = identity; a vector = a diagonal matrix; a square matrix = a full one):

=================  ==================================  ==================================
``"euclidean"``    ``A = I``                            ``B = I``
``"fisher"``       ``diag(sum_j F_ij)`` (side="out")    or ``diag(sum_i F_ij)`` (side="in")
``"adam"``         as fisher, with ``F`` = the base optimizer's ``exp_avg_sq``
``"activation"``   ``A = I``                            ``E[x x^T]`` (its diagonal when wide)
``"two_sided"``    fisher, side="out"                   activation
=================  ==================================  ==================================

``F_ij`` is a running mean of squared gradients ``(dL/dW_ij)^2`` (the empirical Fisher, FWSVD);
``x`` the layer's input (ASVD, SVD-LLM). A statistic ``S`` becomes a weight by normalising it
to mean diagonal one and damping it:

    A = (S / mean(diag S) + damping I) / (1 + damping),

so ``A`` is SPD with eigenvalues ``>= damping / (1 + damping)`` and ``tr(A) = m``: the weights
are relative importances and ``tau = lam * lr`` keeps the scale it has in the Euclidean case
(this also makes the EMA's start-up bias irrelevant). A side with no statistics yet (no
gradient seen, no forward pass) is the identity.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .backends import compute_dtype
from .functional import project_rank, prox_step
from .prox import ProxMap, get_prox
from .selection import Target

__all__ = [
    "ActivationMetric",
    "AdamMetric",
    "EuclideanMetric",
    "FisherMetric",
    "Metric",
    "TwoSidedMetric",
    "Weighting",
    "damped",
    "get_metric",
    "weighted_prox",
    "weighted_truncate",
]

#: Base-optimizer state keys holding a running mean of squared gradients (``"adam"`` metric):
#: Adam/AdamW/NAdam/RAdam/SparseAdam, RMSprop/Adadelta, Adagrad (a running sum).
SECOND_MOMENT_KEYS = ("exp_avg_sq", "square_avg", "sum")
#: Layer kinds (:mod:`proxrank.selection`) whose matrix columns are the layer's input features,
#: so that input statistics weight them.
INPUT_KINDS = ("linear", "hf_conv1d")
#: torch optimizers known to keep no second moment.
_NO_SECOND_MOMENT = (
    torch.optim.SGD,
    torch.optim.ASGD,
    torch.optim.Rprop,
    torch.optim.LBFGS,
    torch.optim.Adamax,
)


# -- the change of variables -----------------------------------------------------------------
def _left(M: Tensor | None, W: Tensor) -> Tensor:
    if M is None:
        return W
    return M.unsqueeze(-1) * W if M.dim() == 1 else M @ W


def _right(W: Tensor, M: Tensor | None) -> Tensor:
    if M is None:
        return W
    return W * M if M.dim() == 1 else W @ M


def _sqrt_pair(M: Tensor | None, name: str) -> tuple[Tensor | None, Tensor | None]:
    """``(M^{1/2}, M^{-1/2})`` of an SPD matrix or of a positive vector (a diagonal matrix)."""
    if M is None:
        return None, None
    if M.dim() == 1:
        if not bool((M > 0).all()) or not bool(torch.isfinite(M).all()):
            raise ValueError(f"{name} must have finite entries > 0 (a diagonal SPD matrix)")
        return M.sqrt(), M.rsqrt()
    if M.dim() != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(f"{name} must be a vector or a square matrix, got shape {tuple(M.shape)}")
    lam, V = torch.linalg.eigh(0.5 * (M + M.mT))
    if not bool((lam > 0).all()) or not bool(torch.isfinite(lam).all()):
        raise ValueError(
            f"{name} must be symmetric positive definite (smallest eigenvalue "
            f"{float(lam.min()):.3g}); add damping, e.g. {name} + eps * I"
        )
    return (V * lam.sqrt()) @ V.mT, (V * lam.rsqrt()) @ V.mT


@dataclass(frozen=True)
class Weighting:
    """The isometry ``W -> A^{1/2} W B^{1/2}`` of a metric ``(A, B)`` and its inverse.

    Each factor is ``None`` (identity), a vector (diagonal) or a square matrix.
    """

    a_half: Tensor | None = None
    a_inv_half: Tensor | None = None
    b_half: Tensor | None = None
    b_inv_half: Tensor | None = None

    @classmethod
    def from_spd(cls, A: Tensor | None = None, B: Tensor | None = None) -> Weighting:
        """From SPD ``A`` (``m x m`` or its diagonal ``(m,)``) and ``B`` (``n x n`` or ``(n,)``),
        used exactly as given (no normalisation, no damping)."""
        a_half, a_inv_half = _sqrt_pair(A, "A")
        b_half, b_inv_half = _sqrt_pair(B, "B")
        return cls(a_half, a_inv_half, b_half, b_inv_half)

    def to_metric(self, W: Tensor) -> Tensor:
        """``A^{1/2} W B^{1/2}``."""
        return _left(self.a_half, _right(W, self.b_half))

    def from_metric(self, Z: Tensor) -> Tensor:
        """``A^{-1/2} Z B^{-1/2}``."""
        return _left(self.a_inv_half, _right(Z, self.b_inv_half))

    def apply(self, fn: Callable[[Tensor], Tensor], W: Tensor) -> Tensor:
        """``A^{-1/2} fn(A^{1/2} W B^{1/2}) B^{-1/2}``: a spectral map taken in this metric."""
        return self.from_metric(fn(self.to_metric(W)))

    def to(self, dtype: torch.dtype) -> Weighting:
        return Weighting(*(None if t is None else t.to(dtype) for t in self._factors()))

    def _factors(self) -> tuple[Tensor | None, ...]:
        return (self.a_half, self.a_inv_half, self.b_half, self.b_inv_half)


def weighted_prox(
    Y: Tensor,
    tau: float,
    A: Tensor | None = None,
    B: Tensor | None = None,
    prox: str | ProxMap = "soft",
) -> Tensor:
    """``A^{-1/2} prox(A^{1/2} Y B^{1/2}, tau) B^{-1/2}``: the prox of
    ``tau g(A^{1/2} X B^{1/2})`` in the metric ``||X||^2 = tr(X^T A X B)`` (``g`` the nuclear
    norm for ``prox="soft"``, the rank for ``"hard"``). ``A``, ``B``: SPD matrices, positive
    vectors (diagonal) or ``None`` (identity). ``Y``: one ``m x n`` matrix, float32/float64."""
    prox_map = get_prox(prox)
    if not isinstance(prox_map, ProxMap):
        raise ValueError(
            f"weighted_prox: prox={prox!r} acts on the entries, not on singular values; a "
            "metric weighs singular values: use prox='soft' or 'hard'"
        )
    return Weighting.from_spd(A, B).apply(lambda Z: prox_step(Z, tau, prox_map).X, Y)


def weighted_truncate(
    W: Tensor, rank: int, A: Tensor | None = None, B: Tensor | None = None
) -> Tensor:
    """``A^{-1/2} [A^{1/2} W B^{1/2}]_r B^{-1/2}`` (``[.]_r``: the ``r`` largest singular
    triplets): the minimiser of ``||A^{1/2} (W - X) B^{1/2}||_F`` over ``rank(X) <= r``."""
    return Weighting.from_spd(A, B).apply(lambda Z: project_rank(Z, rank), W)


# -- statistics --------------------------------------------------------------------------------
def damped(stat: Tensor | None, damping: float) -> Tensor | None:
    """``(S / mean(diag S) + damping I) / (1 + damping)`` for a PSD statistic ``S`` (a vector
    standing for a diagonal matrix, or a square matrix); ``None`` when ``S`` is ``None`` or zero
    (no information yet: identity)."""
    if stat is None:
        return None
    diag = stat if stat.dim() == 1 else stat.diagonal()
    mean = diag.mean()
    if not bool(torch.isfinite(stat).all()):
        raise ValueError("metric statistics are not finite (inf/NaN gradients or activations)")
    if float(mean) <= 0:
        return None
    normed = stat / mean
    if stat.dim() == 1:
        return (normed.clamp_min(0) + damping) / (1 + damping)
    eye = torch.eye(stat.shape[0], dtype=stat.dtype, device=stat.device)
    return (normed + damping * eye) / (1 + damping)


def _accumulate(
    state: dict[str, Any], key: str, value: Tensor, beta: float | None
) -> dict[str, Any]:
    """The updates ``{key: s_t, key + "_count": t}``: EMA ``s_t = beta s_{t-1} + (1 - beta) v_t``
    from ``s_0 = 0``, or with ``beta=None`` the plain mean of all ``v_t``. ``state`` is only
    read; a non-finite statistic raises (and so is never stored)."""
    count = int(state.get(f"{key}_count", 0)) + 1
    old = state.get(key)
    if beta is None:
        new = value if old is None else old + (value - old) / count
    else:
        new = (1 - beta) * value if old is None else beta * old + (1 - beta) * value
    if not bool(torch.isfinite(new).all()):
        raise FloatingPointError(
            f"the {key} statistic is not finite (inf/NaN or overflowing inputs or gradients); "
            "it was not stored. Check the data, or use metric='euclidean'"
        )
    return {key: new, f"{key}_count": count}


def _check_damping(damping: Any) -> float:
    if isinstance(damping, bool) or not isinstance(damping, int | float):
        raise TypeError(f"damping must be a real number > 0, got {damping!r}")
    if not math.isfinite(damping) or damping <= 0:
        raise ValueError(
            f"damping must be finite and > 0 (it keeps A^(-1/2) finite), got {damping!r}; try 1e-2"
        )
    return float(damping)


def _check_beta(beta: Any) -> float | None:
    if beta is None:
        return None
    if isinstance(beta, bool) or not isinstance(beta, int | float) or not 0 <= beta < 1:
        raise ValueError(f"beta must be in [0, 1) (EMA decay) or None (plain mean), got {beta!r}")
    return float(beta)


def _check_side(side: Any) -> str:
    if side not in ("out", "in"):
        raise ValueError(
            f"side must be 'out' (weights on output features: rows, A) or 'in' (input "
            f"features: columns, B), got {side!r}"
        )
    return side


def _as_pair(side: str, vec: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    return (vec, None) if side == "out" else (None, vec)


def _side_sum(side: str, M: Tensor) -> Tensor:
    """Row sums (``side="out"``, one per output feature) or column sums of ``M`` (``m x n``)."""
    return M.sum(dim=1) if side == "out" else M.sum(dim=0)


# -- metrics -----------------------------------------------------------------------------------
class Metric(abc.ABC):
    """A metric ``(A, B)`` for the prox, built from statistics in a matrix's proxrank state.

    ``needs_grads``: :meth:`observe_grad` is called once per optimizer step with the weight's
    gradient. ``needs_inputs``: :meth:`observe_input` is called on every forward pass of the
    layer (a forward pre-hook) with its input. Both only read ``state`` and return the updates
    to store (so a failed step stores nothing). ``base_state_keys``: the keys of the base
    optimizer's state of the parameter that :meth:`statistics` may read (with sharded
    parameters only these are gathered whole, on the matrix's owner: see
    :mod:`proxrank.distributed`; otherwise every tensor shaped like the parameter is given).
    """

    name: str = ""
    needs_grads: bool = False
    needs_inputs: bool = False
    base_state_keys: tuple[str, ...] = ()

    def __init__(self, *, damping: float = 1e-2) -> None:
        self.damping = _check_damping(damping)

    def observe_grad(self, state: dict[str, Any], grad: Tensor) -> dict[str, Any]:
        """Statistics updated from the gradient ``grad`` (``m x n``, compute dtype)."""
        return {}

    def observe_input(self, state: dict[str, Any], x: Tensor) -> dict[str, Any]:
        """Statistics updated from a layer input ``x`` (``(..., n)``, float32/float64)."""
        return {}

    def check_optimizer(self, optimizer: Optimizer) -> None:
        """Raise when this metric cannot work with ``optimizer``."""
        return None  # this metric needs nothing here

    def check_target(self, target: Target) -> None:
        """Raise when this metric cannot gather statistics for the selected matrix ``target``."""
        return None  # this metric can weight any matrix

    @abc.abstractmethod
    def statistics(
        self, state: dict[str, Any], base_state: dict[str, Any], shape: tuple[int, int]
    ) -> tuple[Tensor | None, Tensor | None]:
        """Raw statistics ``(S_A, S_B)`` for a matrix of ``shape`` (``None``: identity).
        ``base_state``: the base optimizer's state of the parameter."""

    def weighting(
        self, state: dict[str, Any], base_state: dict[str, Any], shape: tuple[int, int]
    ) -> Weighting | None:
        """The damped, normalised metric as a :class:`Weighting` (``None``: Euclidean)."""
        a, b = (damped(s, self.damping) for s in self.statistics(state, base_state, shape))
        if a is None and b is None:
            return None
        return Weighting.from_spd(a, b)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class EuclideanMetric(Metric):
    """``A = I``, ``B = I``: the plain prox (the default)."""

    name = "euclidean"

    def statistics(self, state, base_state, shape):
        return None, None


class FisherMetric(Metric):
    """Diagonal empirical-Fisher weights (FWSVD): ``F_ij`` a running mean of ``(dL/dW_ij)^2``,
    stored summed over one side as ``state["fisher"]``.

    ``side="out"``: ``A = diag(sum_j F_ij)`` (one weight per output feature), ``B = I``;
    ``side="in"``: ``B = diag(sum_i F_ij)``, ``A = I``. ``beta``: EMA decay per observation, or
    ``None`` for the plain mean (one-shot compression). The gradient is the mini-batch gradient
    the optimizer sees (the usual cheap stand-in for per-sample gradients).
    """

    name = "fisher"
    needs_grads = True

    def __init__(
        self, *, side: str = "out", beta: float | None = 0.99, damping: float = 1e-2
    ) -> None:
        super().__init__(damping=damping)
        self.side = _check_side(side)
        self.beta = _check_beta(beta)

    def observe_grad(self, state, grad):
        return _accumulate(state, "fisher", _side_sum(self.side, grad * grad), self.beta)

    def statistics(self, state, base_state, shape):
        return _as_pair(self.side, state.get("fisher"))


class AdamMetric(Metric):
    """The fisher metric's weights taken from the base optimizer's second moment
    (``exp_avg_sq``; ``square_avg`` for RMSprop/Adadelta; ``sum`` for Adagrad) at no extra cost.
    ``side`` as for :class:`FisherMetric`."""

    name = "adam"
    base_state_keys = SECOND_MOMENT_KEYS

    def __init__(self, *, side: str = "out", damping: float = 1e-2) -> None:
        super().__init__(damping=damping)
        self.side = _check_side(side)

    def _error(self, what: str) -> ValueError:
        return ValueError(
            f"metric='adam' needs the base optimizer's second-moment state "
            f"({'/'.join(SECOND_MOMENT_KEYS)}), but {what}; use an Adam-type base optimizer "
            "or metric='fisher' (which gathers squared gradients itself)"
        )

    def check_optimizer(self, optimizer):
        if isinstance(optimizer, _NO_SECOND_MOMENT):
            raise self._error(f"{type(optimizer).__name__} keeps none")

    def statistics(self, state, base_state, shape):
        if not base_state:
            return None, None
        key = next((k for k in SECOND_MOMENT_KEYS if k in base_state), None)
        if key is None:
            raise self._error(f"its state has only {sorted(base_state)}")
        v = base_state[key].reshape(shape)
        return _as_pair(self.side, _side_sum(self.side, v.to(compute_dtype(v.dtype))))


class ActivationMetric(Metric):
    """Data-aware ``B = E[x x^T]`` from the layer's inputs ``x`` (SVD-LLM), or its diagonal
    ``diag(E[x_k^2])`` (ASVD-like) when the layer has more than ``max_full`` input features;
    ``A = I``. Gathered by a forward pre-hook into ``state["activation"]`` (``beta``: EMA decay
    per forward call, ``None``: plain mean). Only ``nn.Linear`` layers: a convolution's columns
    are ``(in, kh, kw)`` patches, which this metric does not unfold."""

    name = "activation"
    needs_inputs = True

    def __init__(
        self, *, max_full: int = 4096, beta: float | None = 0.99, damping: float = 1e-2
    ) -> None:
        super().__init__(damping=damping)
        if isinstance(max_full, bool) or not isinstance(max_full, int) or max_full < 0:
            raise ValueError(f"max_full must be an int >= 0, got {max_full!r}")
        self.max_full = max_full
        self.beta = _check_beta(beta)

    def check_target(self, target):
        if target.module_type is None:
            raise ValueError(
                f"metric={self.name!r} gathers layer inputs with forward hooks and needs the "
                f"model: pass the nn.Module as model_or_named_params (weight {target.name!r})"
            )
        if target.kind not in INPUT_KINDS:
            raise ValueError(
                f"metric={self.name!r} supports nn.Linear and transformers' Conv1D weights "
                f"only; {target.name!r} belongs to a {target.module_type.__name__}: exclude it, "
                "or give its param group metric='fisher' or 'euclidean'"
            )

    def observe_input(self, state, x):
        X = x.reshape(-1, x.shape[-1])
        if X.shape[1] <= self.max_full:
            stat = X.mT @ X / X.shape[0]
        else:
            stat = (X * X).mean(dim=0)
        return _accumulate(state, "activation", stat, self.beta)

    def statistics(self, state, base_state, shape):
        return None, state.get("activation")


class TwoSidedMetric(Metric):
    """K-FAC-like: ``A`` from gradients (:class:`FisherMetric`, ``side="out"``), ``B`` from
    inputs (:class:`ActivationMetric`); both gathered as those metrics gather them."""

    name = "two_sided"
    needs_grads = True
    needs_inputs = True

    def __init__(
        self, *, max_full: int = 4096, beta: float | None = 0.99, damping: float = 1e-2
    ) -> None:
        super().__init__(damping=damping)
        self.fisher = FisherMetric(side="out", beta=beta, damping=damping)
        self.activation = ActivationMetric(max_full=max_full, beta=beta, damping=damping)

    def observe_grad(self, state, grad):
        return self.fisher.observe_grad(state, grad)

    def observe_input(self, state, x):
        return self.activation.observe_input(state, x)

    def check_target(self, target):
        self.activation.check_target(target)

    def statistics(self, state, base_state, shape):
        return (
            self.fisher.statistics(state, base_state, shape)[0],
            self.activation.statistics(state, base_state, shape)[1],
        )


_METRICS: dict[str, type[Metric]] = {
    m.name: m for m in (EuclideanMetric, FisherMetric, AdamMetric, ActivationMetric, TwoSidedMetric)
}


def get_metric(metric: str | Metric, *, option: str = "metric", **kwargs: Any) -> Metric:
    """Resolve a metric name (its class built with ``kwargs``) or pass a :class:`Metric`
    instance through."""
    if isinstance(metric, Metric):
        return metric
    if isinstance(metric, str) and metric in _METRICS:
        return _METRICS[metric](**kwargs)
    raise ValueError(
        f"{option}={metric!r} is not a known metric; use one of {sorted(_METRICS)} "
        "or a proxrank.metrics.Metric instance"
    )
