"""NN-BCD (Li, Chung, Du, Wang, Zhou, Shen): compressing a ReLU MLP as one non-convex problem,
solved by block coordinate descent whose every block update is in closed form (no gradients).

The MLP ``x -> W_N relu(... relu(W_1 x + b_1) ...) + b_N`` (``N`` Linear layers) is trained on
``n`` samples stored as rows: ``X`` (``n x d_0``), targets ``Y`` (``n x d_N``; class labels
become one-hot rows, the squared loss on them is the paper's classification loss). Auxiliary
variables hold each layer's pre-activations ``U_i`` and post-activations ``V_i`` (``n x d_i``,
``V_0 = X`` fixed), and each weight has a compressed copy ``G_i`` in a set ``C_i`` (TT rank at
most ``r`` in a TT-matrix layout, see :mod:`proxrank.tt`, or at most ``k_i`` nonzeros). The
objective is

    Phi = 1/2 ||V_N - Y||^2 + gamma/2 ||V_N - U_N||^2 + gamma/2 sum_{i<N} ||V_i - relu(U_i)||^2
        + rho/2 sum_i ||U_i - V_{i-1} W_i^T - 1 b_i^T||^2 + tau/2 sum_i ||W_i - G_i||^2,
    G_i in C_i,

all norms Frobenius, sums over samples (not means), as in the paper. One sweep visits the
blocks in the paper's backward order

    V_N, U_N, (W_N, b_N), G_N, then for i = N-1, ..., 1:  V_i, U_i, (W_i, b_i), G_i,

and sets each block to the exact minimiser of ``Phi + alpha/2 ||block - block_prev||^2`` with the
other blocks fixed (the functions below state each closed form). Every block thus lowers
``Phi`` by at least ``alpha/2 ||block - block_prev||^2``; summed over a sweep,

    Phi(x^{k+1}) <= Phi(x^k) - alpha/2 ||x^{k+1} - x^k||^2        (sufficient decrease),

so ``Phi`` never increases, ``sum_k ||x^{k+1} - x^k||^2 <= 2 (Phi(x^0) - inf Phi) / alpha``
(summable) and ``min_{j<k} ||x^{j+1} - x^j||^2 <= 2 (Phi(x^0) - Phi(x^k)) / (alpha k)``, the
paper's O(1/k) rate; with the Kurdyka-Lojasiewicz property of ``Phi`` the paper proves
convergence of the iterates to a critical point. Two choices where the paper is loose: the
proximal term ``alpha`` is applied to every block (the paper's code omits it on some blocks,
which voids the sufficient-decrease step the rate rests on), and the TT update is safeguarded
(TT-SVD with more than two cores is only quasi-optimal, see :func:`compressed_update`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import Tensor, nn

from .sparsity import keep_largest
from .tt import default_layout, to_tt_tensor, tt_round, tt_svd

__all__ = [
    "NNBCD",
    "activation_update",
    "compressed_update",
    "last_preactivation_update",
    "output_update",
    "relu_prox",
    "weight_update",
]

COMPRESS = ("tt", "prune")


def output_update(y: Tensor, u: Tensor, v_prev: Tensor, gamma: float, alpha: float) -> Tensor:
    """``V_N = argmin_V 1/2 ||V - Y||^2 + gamma/2 ||V - U_N||^2 + alpha/2 ||V - V_prev||^2
    = (Y + gamma U_N + alpha V_prev) / (1 + gamma + alpha)``."""
    return (y + gamma * u + alpha * v_prev) / (1 + gamma + alpha)


def last_preactivation_update(
    v: Tensor, a: Tensor, u_prev: Tensor, gamma: float, rho: float, alpha: float
) -> Tensor:
    """``U_N = argmin_U gamma/2 ||V_N - U||^2 + rho/2 ||U - A||^2 + alpha/2 ||U - U_prev||^2
    = (gamma V_N + rho A + alpha U_prev) / (gamma + rho + alpha)``, where
    ``A = V_{N-1} W_N^T + 1 b_N^T``."""
    return (gamma * v + rho * a + alpha * u_prev) / (gamma + rho + alpha)


def relu_prox(
    v: Tensor, a: Tensor, u_prev: Tensor, gamma: float, rho: float, alpha: float
) -> Tensor:
    """``U_i`` for a hidden layer, entrywise
    ``argmin_u gamma/2 (v - max(u, 0))^2 + rho/2 (u - a)^2 + alpha/2 (u - u_prev)^2``
    with ``a`` the entry of ``V_{i-1} W_i^T + 1 b_i^T``.

    With ``beta = rho + alpha`` and ``c = (rho a + alpha u_prev) / beta`` the last two terms are
    ``beta/2 (u - c)^2`` plus a constant. On ``u <= 0`` the minimiser is ``min(c, 0)`` (value
    ``gamma/2 v^2 + beta/2 max(c, 0)^2``); on ``u >= 0`` it is
    ``max((gamma v + beta c) / (gamma + beta), 0)``. The branch with the smaller value is the
    global minimiser (a tie goes to the non-positive branch)."""
    beta = rho + alpha
    c = (rho * a + alpha * u_prev) / beta
    neg = c.clamp(max=0)
    pos = ((gamma * v + beta * c) / (gamma + beta)).clamp(min=0)
    f_neg = gamma / 2 * v**2 + beta / 2 * (neg - c) ** 2
    f_pos = gamma / 2 * (v - pos) ** 2 + beta / 2 * (pos - c) ** 2
    return torch.where(f_pos < f_neg, pos, neg)


def _spd_solve_right(rhs: Tensor, m: Tensor) -> Tensor:
    """``rhs m^{-1}`` for a symmetric positive definite ``m`` (Cholesky)."""
    return torch.cholesky_solve(rhs.mT, torch.linalg.cholesky(m)).mT


def activation_update(
    u: Tensor,
    u_next: Tensor,
    w_next: Tensor,
    b_next: Tensor | None,
    v_prev: Tensor,
    gamma: float,
    rho: float,
    alpha: float,
) -> Tensor:
    """``V_i`` for a hidden layer: ``argmin_V gamma/2 ||V - relu(U_i)||^2
    + rho/2 ||U_{i+1} - V W_{i+1}^T - 1 b_{i+1}^T||^2 + alpha/2 ||V - V_prev||^2``, a least-squares
    problem with the normal equations
    ``V (rho W^T W + (gamma + alpha) I) = gamma relu(U_i) + rho (U_{i+1} - 1 b^T) W + alpha V_prev``
    (``W = W_{i+1}``, ``b = b_{i+1}``; no ``b`` for a layer without bias)."""
    target = u_next if b_next is None else u_next - b_next
    rhs = gamma * u.clamp(min=0) + rho * target @ w_next + alpha * v_prev
    m = rho * w_next.mT @ w_next
    m.diagonal().add_(gamma + alpha)
    return _spd_solve_right(rhs, m)


def weight_update(
    u: Tensor,
    v_in: Tensor,
    w_prev: Tensor,
    b_prev: Tensor | None,
    g: Tensor | None,
    rho: float,
    tau: float,
    alpha: float,
) -> tuple[Tensor, Tensor | None]:
    """``(W_i, b_i) = argmin rho/2 ||U_i - V_{i-1} W^T - 1 b^T||^2 + tau/2 ||W - G_i||^2
    + alpha/2 (||W - W_prev||^2 + ||b - b_prev||^2)``, jointly in ``W`` and ``b``.

    With ``Theta = [W b]`` and ``Z = [V_{i-1} 1]`` the normal equations are
    ``Theta (rho Z^T Z + alpha I + tau E) = rho U_i^T Z + alpha Theta_prev + tau [G_i 0]``,
    ``E = diag(1, ..., 1, 0)`` (the bias is not coupled to ``G_i``). Without a bias ``Z = V_{i-1}``
    and ``Theta = W``; an uncompressed layer (``g`` None) has no ``tau`` term."""
    n_in = v_in.shape[1]
    z = v_in if b_prev is None else torch.cat([v_in, v_in.new_ones(v_in.shape[0], 1)], 1)
    theta_prev = w_prev if b_prev is None else torch.cat([w_prev, b_prev[:, None]], 1)
    m = rho * z.mT @ z
    m.diagonal().add_(alpha)
    rhs = rho * u.mT @ z + alpha * theta_prev
    if g is not None:
        m.diagonal()[:n_in] += tau
        rhs[:, :n_in] += tau * g
    theta = _spd_solve_right(rhs, m)
    return (theta, None) if b_prev is None else (theta[:, :n_in], theta[:, n_in])


def compressed_update(
    w: Tensor, g_prev: Tensor, project: Callable[[Tensor], Tensor], tau: float, alpha: float
) -> Tensor:
    """``G_i = argmin_{G in C_i} tau/2 ||W_i - G||^2 + alpha/2 ||G - G_prev||^2
    = P_C(c)``, ``c = (tau W_i + alpha G_prev) / (tau + alpha)``, since the two terms are
    ``(tau + alpha)/2 ||G - c||^2`` plus a constant and ``P_C`` is the Euclidean projection
    onto ``C_i`` (:func:`proxrank.sparsity.keep_largest` over all entries; TT rounding,
    which is the exact projection for a two-core layout, the truncated SVD).

    TT-SVD with more than two cores is quasi-optimal only (within ``sqrt(d - 1)`` of the best),
    so ``project(c)`` replaces ``G_prev`` only when it is at least as close to ``c``; both lie
    in ``C_i``, so the block objective never increases and the sufficient decrease holds. For an
    exact projection the safeguard never rejects (up to rounding)."""
    c = (tau * w + alpha * g_prev) / (tau + alpha)
    candidate = project(c)
    if torch.sum((candidate - c) ** 2) <= torch.sum((g_prev - c) ** 2):
        return candidate
    return g_prev


def _layers(model: nn.Module) -> list[nn.Linear]:
    fix = (
        "NNBCD needs an nn.Sequential alternating Linear and ReLU and ending with a Linear "
        "(Linear, ReLU, Linear, ..., Linear)"
    )
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"{fix}; got a {type(model).__name__}")
    if len(model) % 2 == 0:
        raise TypeError(f"{fix}; got {len(model)} modules")
    for i, m in enumerate(model):
        want = nn.Linear if i % 2 == 0 else nn.ReLU
        if type(m) is not want:
            raise TypeError(f"{fix}; module {i} is {type(m).__name__}, expected {want.__name__}")
    layers = list(model)[::2]
    for i, m in enumerate(layers):
        for name, p in m.named_parameters():
            if not torch.isfinite(p).all():
                raise ValueError(
                    f"layer {i} ({name}) holds non-finite values; reinitialise the model"
                )
    return layers


def _per_layer(value, count: int, name: str, per_layer: tuple[type, ...]) -> list:
    """``value`` for every layer, or ``value`` itself when it is a per-layer list."""
    if not isinstance(value, per_layer):
        return [value] * count
    if len(value) != count:
        raise ValueError(
            f"{name} must be one value for every layer or a list of {count} (one per Linear "
            f"layer, None to leave a layer uncompressed), got {len(value)} entries"
        )
    return list(value)


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a positive number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


class NNBCD:
    """NN-BCD on a ReLU MLP (``nn.Sequential`` of Linear and ReLU, ending with a Linear): see
    the module docstring for the objective and the closed-form sweep.

    ``compress="tt"``: ``G_i`` has TT ranks at most ``ranks`` (an int for every bond or a tuple
    with one int per bond; a list gives one such entry per Linear layer, None leaving that layer
    uncompressed) in the TT-matrix layout ``layout`` (a list of ``(row_shape, col_shape)``, one
    per layer; default :func:`proxrank.tt.default_layout` with ``cores`` cores).
    ``compress="prune"``: ``G_i`` keeps the ``max(1, round(keep * m n))`` largest entries of an
    ``m x n`` weight (``keep`` in ``(0, 1]``, or a list with one per layer, None: uncompressed).
    An uncompressed layer has no ``G_i`` and no ``tau`` term. ``tau`` couples ``W_i`` to ``G_i``,
    ``gamma`` weighs the activation terms, ``rho`` the pre-activation terms, and ``alpha`` is the
    proximal weight of every block.

    :meth:`fit` starts from the model's weights (``U_i``, ``V_i`` from a forward pass, ``G_i``
    their projections), runs the sweeps in the model's dtype and device, writes ``W_i, b_i``
    into the model and returns ``Phi`` at the start and after each sweep; :meth:`load_compressed`
    writes the ``G_i`` instead. ``residuals`` holds ``||x^{k+1} - x^k||^2`` (all blocks) of each
    sweep of the last fit.
    """

    def __init__(
        self,
        model: nn.Module,
        compress: str = "tt",
        *,
        ranks: int | tuple[int, ...] | list | None = None,
        keep: float | list[float | None] | None = None,
        layout: list | None = None,
        cores: int = 3,
        tau: float = 1.0,
        gamma: float = 1.0,
        rho: float = 1.0,
        alpha: float = 1.0,
    ) -> None:
        self.layers = _layers(model)
        self.model = model
        self.tau, self.gamma = _positive("tau", tau), _positive("gamma", gamma)
        self.rho, self.alpha = _positive("rho", rho), _positive("alpha", alpha)
        count = len(self.layers)
        if compress == "tt":
            if keep is not None:
                raise ValueError("keep= is the pruning option; with compress='tt' give ranks=")
            if ranks is None:
                raise ValueError("compress='tt' needs ranks= (TT rank of every bond, e.g. 4)")
            if isinstance(cores, bool) or not isinstance(cores, int) or cores < 2:
                raise ValueError(f"cores must be an int >= 2, got {cores!r}")
            if layout is not None and not isinstance(layout, list):
                raise ValueError(
                    "layout must be a list with one (row_shape, col_shape) pair (or None) per "
                    f"Linear layer, got {type(layout).__name__}"
                )
            layouts = (
                [None] * count if layout is None else _per_layer(layout, count, "layout", (list,))
            )
            per_layer_ranks = _per_layer(ranks, count, "ranks", (list,))
            self.specs = [
                self._tt_spec(i, r, lay, cores)
                for i, (r, lay) in enumerate(zip(per_layer_ranks, layouts, strict=True))
            ]
        elif compress == "prune":
            if ranks is not None or layout is not None:
                raise ValueError(
                    "ranks= and layout= are TT options; with compress='prune' give keep="
                )
            if keep is None:
                raise ValueError("compress='prune' needs keep= (the fraction of weights kept)")
            self.specs = [
                self._prune_spec(i, k)
                for i, k in enumerate(_per_layer(keep, count, "keep", (list, tuple)))
            ]
        else:
            raise ValueError(f"compress must be one of {COMPRESS}, got {compress!r}")
        self.compress = compress
        self.residuals: list[float] = []
        self._state: dict[str, list] | None = None

    def _tt_spec(self, i: int, ranks, layout, cores: int) -> tuple | None:
        if ranks is None:
            return None
        bonds = (ranks,) if isinstance(ranks, int) else ranks
        if (
            not isinstance(bonds, tuple)
            or not bonds
            or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in bonds)
        ):
            raise ValueError(
                f"ranks for layer {i} must be an int >= 1 or a tuple of them (one per bond), "
                f"got {ranks!r}"
            )
        m, n = self.layers[i].weight.shape
        if layout is None:
            layout = default_layout(m, n, cores)
        if not (isinstance(layout, list | tuple) and len(layout) == 2):
            raise ValueError(f"layout for layer {i} must be a (row_shape, col_shape) pair")
        rows, cols = tuple(layout[0]), tuple(layout[1])
        if len(rows) != len(cols) or math.prod(rows) != m or math.prod(cols) != n:
            raise ValueError(
                f"layout for layer {i} ({m} x {n} weight) must be (row_shape, col_shape) of equal "
                f"length with products {m} and {n}, got {(rows, cols)}"
            )
        if len(rows) < 2 or (isinstance(ranks, tuple) and len(ranks) != len(rows) - 1):
            raise ValueError(
                f"ranks for layer {i}: its {len(rows)}-core layout has {len(rows) - 1} bonds "
                f"(needs >= 1), got ranks {ranks!r}"
            )
        return rows, cols, ranks

    def _prune_spec(self, i: int, keep) -> int | None:
        if keep is None:
            return None
        if isinstance(keep, bool) or not isinstance(keep, int | float) or not 0 < keep <= 1:
            raise ValueError(f"keep for layer {i} must be a fraction in (0, 1], got {keep!r}")
        return max(1, round(keep * self.layers[i].weight.numel()))

    def project(self, i: int, w: Tensor) -> Tensor:
        """The projection ``P_C`` of layer ``i`` (which must be compressed) applied to ``w``:
        TT-SVD rounding or :func:`proxrank.sparsity.keep_largest`."""
        spec = self.specs[i]
        if spec is None:
            raise ValueError(f"layer {i} is left uncompressed; it has no projection")
        if self.compress == "prune":
            return keep_largest(w.reshape(-1), spec).reshape(w.shape)
        rows, cols, ranks = spec
        return tt_round(w, rows, cols, ranks)

    # -- data -------------------------------------------------------------------------------

    def _data(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        ref = self.layers[0].weight
        d_in, d_out = self.layers[0].in_features, self.layers[-1].out_features
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != d_in:
            raise ValueError(
                f"x must be a 2-D tensor (samples x {d_in} features), got "
                f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}"
            )
        if not isinstance(y, Tensor) or y.shape[0] != x.shape[0]:
            raise ValueError(f"y must be a tensor with {x.shape[0]} rows, one per sample of x")
        if y.dim() == 1 and not y.is_floating_point():
            if y.min() < 0 or y.max() >= d_out:
                raise ValueError(
                    f"class labels y must lie in [0, {d_out}) for the model's {d_out} outputs"
                )
            y = nn.functional.one_hot(y.long(), d_out)
        elif y.dim() != 2 or y.shape[1] != d_out:
            raise ValueError(
                f"y must be integer class labels (shape (n,)) or targets of shape (n, {d_out}), "
                f"got {tuple(y.shape)}"
            )
        x, y = x.to(ref), y.to(ref)
        if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
            raise ValueError("x and y must be finite; drop or impute the non-finite samples")
        return x, y

    # -- state ------------------------------------------------------------------------------

    @torch.no_grad()
    def _start(self, x: Tensor, y: Tensor) -> dict[str, list]:
        W = [m.weight.detach().clone() for m in self.layers]
        b = [None if m.bias is None else m.bias.detach().clone() for m in self.layers]
        U, V, v = [], [], x
        for i in range(len(W)):
            U.append(_affine(v, W[i], b[i]))
            v = U[-1].clamp(min=0) if i < len(W) - 1 else U[-1].clone()
            V.append(v)
        G = [
            None if spec is None else self.project(i, w)
            for i, (spec, w) in enumerate(zip(self.specs, W, strict=True))
        ]
        return {"x": [x], "y": [y], "W": W, "b": b, "U": U, "V": V, "G": G}

    def objective(self) -> float:
        """``Phi`` at the current iterate (after :meth:`fit`)."""
        s = self._require_state()
        return _objective(s, self.gamma, self.rho, self.tau)

    def _require_state(self) -> dict[str, list]:
        if self._state is None:
            raise RuntimeError("NNBCD has no iterate yet; call fit(x, y, iterations) first")
        return self._state

    @torch.no_grad()
    def _sweep(self, s: dict[str, list]) -> float:
        """One backward sweep in place; returns ``||x^{k+1} - x^k||^2``."""
        g, r, t, a = self.gamma, self.rho, self.tau, self.alpha
        x, y = s["x"][0], s["y"][0]
        W, b, U, V, G = s["W"], s["b"], s["U"], s["V"], s["G"]
        last = len(W) - 1
        moved = 0.0

        def put(block: list, i: int, new: Tensor | None) -> None:
            nonlocal moved
            if new is not None:
                moved += float(torch.sum((new - block[i]) ** 2))
            block[i] = new

        put(V, last, output_update(y, U[last], V[last], g, a))
        for i in range(last, -1, -1):
            v_in = x if i == 0 else V[i - 1]
            pre = _affine(v_in, W[i], b[i])
            if i == last:
                put(U, i, last_preactivation_update(V[i], pre, U[i], g, r, a))
            else:
                put(V, i, activation_update(U[i], U[i + 1], W[i + 1], b[i + 1], V[i], g, r, a))
                put(U, i, relu_prox(V[i], pre, U[i], g, r, a))
            w_new, b_new = weight_update(U[i], v_in, W[i], b[i], G[i], r, t, a)
            put(W, i, w_new)
            put(b, i, b_new)
            if G[i] is not None:
                put(G, i, compressed_update(W[i], G[i], partial(self.project, i), t, a))
        return moved

    def fit(self, x: Tensor, y: Tensor, iterations: int) -> list[float]:
        """Run ``iterations`` sweeps from the model's current weights on ``x`` (``n x d_0``) and
        ``y`` (``n x d_N`` targets or ``n`` class labels, one-hot encoded); write the final
        ``W_i, b_i`` into the model. Returns ``[Phi(x^0), Phi(x^1), ..., Phi(x^K)]``.

        Raises ``FloatingPointError`` (the model left as it was) if an iterate turns non-finite.
        """
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations must be an int >= 1, got {iterations!r}")
        x, y = self._data(x, y)
        state = self._start(x, y)
        history = [_objective(state, self.gamma, self.rho, self.tau)]
        residuals: list[float] = []
        for k in range(iterations + 1):
            if not (math.isfinite(history[-1]) and all(map(math.isfinite, residuals[-1:]))):
                raise FloatingPointError(
                    f"the NN-BCD objective is not finite after {k} sweeps; the model is "
                    "unchanged (scale the inputs and targets down)"
                )
            if k < iterations:
                try:
                    residuals.append(self._sweep(state))
                except torch.linalg.LinAlgError as err:
                    raise FloatingPointError(
                        f"NN-BCD sweep {k + 1} met a non-finite system ({err}); the model is "
                        "unchanged (scale the inputs and targets down)"
                    ) from err
                history.append(_objective(state, self.gamma, self.rho, self.tau))
        self._state, self.residuals = state, residuals
        self._write(state["W"])
        return history

    @torch.no_grad()
    def _write(self, weights: Sequence[Tensor | None]) -> None:
        s = self._require_state()
        for m, w, bias in zip(self.layers, weights, s["b"], strict=True):
            if w is not None:
                m.weight.copy_(w)
            if bias is not None:
                m.bias.copy_(bias)

    def load_compressed(self) -> None:
        """Write the compressed copies ``G_i`` (and the biases) into the model's layers; a layer
        left uncompressed gets its ``W_i``."""
        s = self._require_state()
        self._write([w if gi is None else gi for w, gi in zip(s["W"], s["G"], strict=True)])

    def compressed_parameters(self) -> list[int]:
        """Numbers stored per layer by the compressed copies: the TT cores' sizes (ranks as
        reached by TT-SVD), the nonzeros of a pruned weight, ``m n`` for an uncompressed layer
        (biases not counted)."""
        s = self._require_state()
        counts = []
        for spec, w, gi in zip(self.specs, s["W"], s["G"], strict=True):
            if spec is None:
                counts.append(w.numel())
            elif self.compress == "prune":
                counts.append(int(torch.count_nonzero(gi)))
            else:
                rows, cols, ranks = spec
                cores = tt_svd(to_tt_tensor(gi, rows, cols), ranks, len(rows))
                counts.append(sum(c.numel() for c in cores))
        return counts


def _affine(v: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return v @ w.mT if b is None else torch.addmm(b, v, w.mT)


def _objective(s: dict[str, list], gamma: float, rho: float, tau: float) -> float:
    x, y = s["x"][0], s["y"][0]
    W, b, U, V, G = s["W"], s["b"], s["U"], s["V"], s["G"]
    last = len(W) - 1
    total = 0.5 * torch.sum((V[last] - y) ** 2) + gamma / 2 * torch.sum((V[last] - U[last]) ** 2)
    for i in range(last + 1):
        v_in = x if i == 0 else V[i - 1]
        total = total + rho / 2 * torch.sum((U[i] - _affine(v_in, W[i], b[i])) ** 2)
        if i < last:
            total = total + gamma / 2 * torch.sum((V[i] - U[i].clamp(min=0)) ** 2)
        if G[i] is not None:
            total = total + tau / 2 * torch.sum((W[i] - G[i]) ** 2)
    return float(total)
