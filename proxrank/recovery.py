r"""Low-rank matrix recovery with deep linear networks (Kwon, Zhang, Song, Balzano, Qu 2024).

An unknown ``m x n`` matrix ``X*`` of rank ``r`` is recovered from

* :class:`Factorization`: ``X*`` itself, loss ``f(X) = 1/2 ||X - X*||_F^2``;
* :class:`Completion`: the entries on a mask ``Omega`` (observed fraction ``p``),
  ``f(X) = 1/(2p) ||P_Omega(X - X*)||_F^2``;
* :class:`Sensing`: ``k`` linear measurements ``y_i = <A_i, X*>``,
  ``f(X) = 1/(2k) sum_i (<A_i, X> - y_i)^2``.

The normalisations make ``E f(X) = 1/2 ||X - X*||_F^2`` over uniformly random masks and over
Gaussian measurements, and each problem's :meth:`~Problem.surrogate` is ``-grad f(0)``: ``X*``,
``P_Omega(X*) / p`` and ``(1/k) sum_i y_i A_i``, all unbiased estimates of ``X*``.

``X`` is parametrised by a :class:`DeepLinear` network, ``X = W_L ... W_1``, trained by plain
gradient descent from a small initialisation. The paper observes that the weights then move in a
``2r``-dimensional invariant subspace, so the intermediate width can be cut to ``2r``
(:meth:`DeepLinear.spectral`, :meth:`DeepLinear.compress`) with a spectral initialisation from
the surrogate. Quality is the relative recovery error :func:`relative_error`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

__all__ = [
    "Completion",
    "DeepLinear",
    "Factorization",
    "Problem",
    "Sensing",
    "relative_error",
]


def _check_matrix(X: Tensor, name: str) -> None:
    if not isinstance(X, Tensor) or X.dim() != 2 or not X.is_floating_point():
        raise TypeError(
            f"{name} must be a 2-D floating-point tensor (an m x n matrix), got "
            f"{type(X).__name__ if not isinstance(X, Tensor) else f'{X.dtype} {tuple(X.shape)}'}"
        )
    if not bool(torch.isfinite(X).all()):
        raise ValueError(f"{name} has non-finite entries; pass a finite matrix")


def _check_int(value: object, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def relative_error(X: Tensor, target: Tensor) -> float:
    """The relative recovery error ``||X - X*||_F / ||X*||_F`` (a Python float)."""
    _check_matrix(target, "target")
    if not isinstance(X, Tensor) or X.shape != target.shape:
        shape = tuple(X.shape) if isinstance(X, Tensor) else type(X).__name__
        raise ValueError(f"X has shape {shape}, the target {tuple(target.shape)}: they must match")
    norm = torch.linalg.matrix_norm(target)
    if norm == 0:
        raise ValueError("the target is zero: the relative error is undefined")
    return float(torch.linalg.matrix_norm(X.detach().to(target.dtype) - target) / norm)


def _low_rank(m: int, n: int, rank: int, g: torch.Generator, dtype: torch.dtype) -> Tensor:
    """``U diag(s) V^T``: Haar-random orthonormal ``U``, ``V``; ``s`` evenly spaced on [1, 2]."""
    _check_int(m, "m", 1)
    _check_int(n, "n", 1)
    if _check_int(rank, "rank", 1) > min(m, n):
        raise ValueError(f"rank {rank} exceeds min(m, n) = {min(m, n)}; choose rank <= {min(m, n)}")
    U = torch.linalg.qr(torch.randn(m, rank, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=torch.float64))[0]
    s = torch.linspace(2.0, 1.0, rank, dtype=torch.float64)
    return ((U * s) @ V.T).to(dtype)


class Problem(ABC):
    """A recovery problem: a loss on ``m x n`` matrices and a spectral surrogate of ``X*``."""

    #: The ground truth ``X*`` when known (``None`` for a :class:`Sensing` built without it).
    target: Tensor | None
    #: ``(m, n)``.
    shape: tuple[int, int]

    @abstractmethod
    def loss(self, X: Tensor) -> Tensor:
        """The differentiable data-fit loss ``f(X)`` (a scalar tensor)."""

    @abstractmethod
    def surrogate(self) -> Tensor:
        """``-grad f(0)``: an estimate of ``X*`` built from the data alone."""

    def error(self, X: Tensor) -> float:
        """:func:`relative_error` of ``X`` against :attr:`target`."""
        if self.target is None:
            raise ValueError(
                f"this {type(self).__name__} has no target: pass target= to know the error"
            )
        return relative_error(X, self.target)

    def _check_input(self, X: Tensor) -> None:
        if not isinstance(X, Tensor) or tuple(X.shape) != self.shape:
            shape = tuple(X.shape) if isinstance(X, Tensor) else type(X).__name__
            raise ValueError(f"X has shape {shape}; this problem's matrices are {self.shape}")


class Factorization(Problem):
    """Fit ``X*`` itself: ``f(X) = 1/2 ||X - X*||_F^2``; the surrogate is ``X*``."""

    def __init__(self, target: Tensor) -> None:
        _check_matrix(target, "target")
        self.target = target
        self.shape = (target.shape[0], target.shape[1])

    def loss(self, X: Tensor) -> Tensor:
        self._check_input(X)
        return 0.5 * (X - self.target).square().sum()

    def surrogate(self) -> Tensor:
        return self.target.clone()

    @classmethod
    def random(
        cls, m: int, n: int, rank: int, *, seed: int = 0, dtype: torch.dtype = torch.float64
    ) -> Factorization:
        """A random rank-``rank`` target ``U diag(s) V^T`` (Haar ``U``, ``V``; ``s`` on [1, 2])."""
        g = torch.Generator().manual_seed(seed)
        return cls(_low_rank(m, n, rank, g, dtype))


class Completion(Problem):
    """Observe ``X*`` where ``mask`` is true (fraction ``p``).

    ``f(X) = 1/(2p) ||P_Omega(X - X*)||_F^2``; the surrogate is ``P_Omega(X*) / p``, unbiased
    over masks drawn uniformly among those with the same number of observed entries.
    """

    def __init__(self, target: Tensor, mask: Tensor) -> None:
        _check_matrix(target, "target")
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError("mask must be a boolean tensor (True where an entry is observed)")
        if mask.shape != target.shape:
            raise ValueError(
                f"mask has shape {tuple(mask.shape)}, the target {tuple(target.shape)}: "
                "they must match"
            )
        count = int(mask.sum())
        if count == 0:
            raise ValueError("mask observes no entry: at least one entry must be True")
        self.target = target
        self.mask = mask
        self.shape = (target.shape[0], target.shape[1])
        #: The observed fraction ``p = |Omega| / (m n)``.
        self.fraction = count / mask.numel()
        self._observed = torch.where(mask, target, torch.zeros_like(target))

    def loss(self, X: Tensor) -> Tensor:
        self._check_input(X)
        return 0.5 / self.fraction * ((X - self.target) * self.mask).square().sum()

    def surrogate(self) -> Tensor:
        return self._observed / self.fraction

    @classmethod
    def random(
        cls,
        m: int,
        n: int,
        rank: int,
        fraction: float,
        *,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
    ) -> Completion:
        """A random rank-``rank`` target with ``round(fraction m n)`` entries observed, chosen
        uniformly without replacement."""
        if not isinstance(fraction, int | float) or not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
        g = torch.Generator().manual_seed(seed)
        target = _low_rank(m, n, rank, g, dtype)
        count = max(1, round(fraction * m * n))
        mask = torch.zeros(m * n, dtype=torch.bool)
        mask[torch.randperm(m * n, generator=g)[:count]] = True
        return cls(target, mask.view(m, n))


class Sensing(Problem):
    """Measurements ``y_i = <A_i, X*>`` with ``A`` of shape ``(k, m, n)``.

    ``f(X) = 1/(2k) sum_i (<A_i, X> - y_i)^2``; the surrogate ``(1/k) sum_i y_i A_i`` is unbiased
    when the entries of ``A_i`` are independent with mean 0 and variance 1 (Gaussian ensemble).
    ``target`` (optional) is the ground truth, used only by :meth:`error`.
    """

    def __init__(self, A: Tensor, y: Tensor, *, target: Tensor | None = None) -> None:
        if not isinstance(A, Tensor) or A.dim() != 3 or not A.is_floating_point():
            raise TypeError(
                "A must be a 3-D floating-point tensor (k, m, n) of measurement matrices"
            )
        if not isinstance(y, Tensor) or y.shape != (A.shape[0],):
            shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(f"y must have shape ({A.shape[0]},), one value per A_i; got {shape}")
        if A.shape[0] == 0:
            raise ValueError("A holds no measurement: k must be >= 1")
        if not bool(torch.isfinite(A).all()) or not bool(torch.isfinite(y).all()):
            raise ValueError("A and y must be finite")
        if target is not None:
            _check_matrix(target, "target")
            if target.shape != A.shape[1:]:
                raise ValueError(
                    f"target has shape {tuple(target.shape)}, the measurements "
                    f"{tuple(A.shape[1:])}: they must match"
                )
        self.A = A
        self.y = y.to(A.dtype)
        self.target = target
        self.shape = (A.shape[1], A.shape[2])
        self._flat = A.reshape(A.shape[0], -1)

    def measure(self, X: Tensor) -> Tensor:
        """``(<A_i, X>)_i``."""
        self._check_input(X)
        return self._flat @ X.reshape(-1)

    def loss(self, X: Tensor) -> Tensor:
        return 0.5 * (self.measure(X) - self.y).square().mean()

    def surrogate(self) -> Tensor:
        return (self.y @ self._flat).view(self.shape) / self.y.numel()

    @classmethod
    def random(
        cls,
        m: int,
        n: int,
        rank: int,
        measurements: int,
        *,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
    ) -> Sensing:
        """A random rank-``rank`` target and ``measurements`` Gaussian ``A_i`` (i.i.d. N(0, 1)
        entries); the target is kept for :meth:`error`."""
        _check_int(measurements, "measurements", 1)
        g = torch.Generator().manual_seed(seed)
        target = _low_rank(m, n, rank, g, torch.float64)
        A = torch.randn(measurements, m, n, generator=g, dtype=torch.float64)
        y = A.reshape(measurements, -1) @ target.reshape(-1)
        return cls(A.to(dtype), y.to(dtype), target=target.to(dtype))


class DeepLinear(nn.Module):
    r"""A deep linear network ``x -> W_L ... W_1 x``: ``depth`` bias-free ``nn.Linear`` layers.

    ``W_1`` is ``width x n``, the middle layers ``width x width``, ``W_L`` is ``m x width``; each is
    initialised as ``init_scale`` times a (semi-)orthogonal matrix (``nn.init.orthogonal_``), as in
    the paper, so the end-to-end matrix starts at norm ``~ init_scale^depth``. The layers are
    ``self.layers[l]`` (``nn.Linear`` weights: ``ProxRank(opt, net, lam=...)`` selects all of
    them). ``forward(x)`` maps ``(..., n)`` to ``(..., m)``: ``x @ matrix().T``.
    """

    def __init__(
        self,
        m: int,
        n: int,
        depth: int,
        width: int,
        init_scale: float = 1e-2,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        _check_int(m, "m", 1)
        _check_int(n, "n", 1)
        _check_int(depth, "depth", 2)
        _check_int(width, "width", 1)
        if isinstance(init_scale, bool) or not isinstance(init_scale, int | float):
            raise TypeError(f"init_scale must be a real number > 0, got {init_scale!r}")
        if not math.isfinite(init_scale) or init_scale <= 0:
            raise ValueError(f"init_scale must be finite and > 0, got {init_scale!r}")
        self.shape = (m, n)
        self.depth = depth
        self.width = width
        self.init_scale = float(init_scale)
        sides = [n] + [width] * (depth - 1) + [m]
        self.layers = nn.ModuleList(
            nn.Linear(sides[i], sides[i + 1], bias=False, dtype=dtype, device=device)
            for i in range(depth)
        )
        with torch.no_grad():
            for layer in self.layers:
                nn.init.orthogonal_(layer.weight, gain=self.init_scale, generator=generator)

    def matrix(self) -> Tensor:
        """The end-to-end matrix ``W_L ... W_1`` (``m x n``, differentiable)."""
        X = self.layers[0].weight
        for layer in self.layers[1:]:
            X = layer.weight @ X
        return X

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    @classmethod
    def spectral(
        cls, surrogate: Tensor, rank: int, depth: int, init_scale: float = 1e-2
    ) -> DeepLinear:
        r"""The paper's compressed network: width ``2 rank``, spectral initialisation.

        With ``U_hat``, ``V_hat`` the top ``2 rank`` left and right singular vectors of
        ``surrogate`` (``m x n``): ``W_1 = init_scale V_hat^T``, ``W_l = init_scale I`` in the
        middle, ``W_L = init_scale U_hat``; so the end-to-end matrix starts at
        ``init_scale^depth U_hat V_hat^T``, the orthogonal (polar) factor of the surrogate's best
        rank-``2 rank`` approximation. Dtype and device from ``surrogate``.
        """
        _check_matrix(surrogate, "surrogate")
        m, n = surrogate.shape
        width = 2 * _check_int(rank, "rank", 1)
        if width > min(m, n):
            raise ValueError(
                f"width 2 * rank = {width} exceeds min(m, n) = {min(m, n)}: there are not 2 * rank "
                f"singular vectors; choose rank <= {min(m, n) // 2}"
            )
        net = cls(m, n, depth, width, init_scale, dtype=surrogate.dtype, device=surrogate.device)
        U, _, Vh = torch.linalg.svd(surrogate.detach(), full_matrices=False)
        s = net.init_scale
        with torch.no_grad():
            net.layers[0].weight.copy_(s * Vh[:width])
            eye = torch.eye(width, dtype=surrogate.dtype, device=surrogate.device)
            for layer in net.layers[1:-1]:
                layer.weight.copy_(s * eye)
            net.layers[-1].weight.copy_(s * U[:, :width])
        return net

    def compress(self, rank: int, surrogate: Tensor | None = None) -> DeepLinear:
        """A new width-``2 rank`` network of the same depth and ``init_scale``, initialised by
        :meth:`spectral` from ``surrogate``, or, without one, from this network's own end-to-end
        matrix (a fresh network: random subspaces; a trained one: its learned subspaces). The
        new network restarts at scale ``init_scale``: it is an initialisation, not a copy."""
        if surrogate is None:
            with torch.no_grad():
                surrogate = self.matrix()
        elif surrogate.shape != self.shape:
            raise ValueError(
                f"surrogate has shape {tuple(surrogate.shape)}, the network's matrix {self.shape}"
            )
        return type(self).spectral(surrogate, rank, self.depth, self.init_scale)
