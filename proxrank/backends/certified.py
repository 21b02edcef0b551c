"""Certified backends: a :class:`~proxrank.backends.planner.Planner` picks a kernel per
matrix, the kernels compute and certify, :class:`CertifiedBackend` orchestrates (rounds,
exact fallback, warm-start bases, random generators)."""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import Tensor

from .base import Backend, BackendError, State, SVDResult, check_positive, state_list
from .kernels import Part, exact_part, frobenius2, gram_eigenvalues, gram_part, subspace_part
from .planner import AutoPlanner, GramPlanner, Planner, SubspacePlanner

__all__ = ["AutoBackend", "CertifiedBackend", "GramBackend", "SubspaceBackend"]

SEED = 0x5EED
"""Seed of a fresh backend's generator on each device (probes and basis growth)."""


class CertifiedBackend(Backend):
    """A planner plus the certified kernels (see :mod:`proxrank.backends`).

    Args:
        planner: chooses the kernel per matrix and step and the width of the kept basis.
        tol: relative error bound; a result whose bound exceeds ``tol * ||Y||_F`` is redone
            with the exact SVD.
        iterations: most rounds per step. A matrix whose certificate fails gets another
            Rayleigh-Ritz round from its power-iterated basis, and after ``iterations`` rounds
            the exact SVD.
        probes, power: Gaussian probes and power steps of the randomized bound on the norm
            outside the basis (failure probability ``FAILURE = 1e-10``; the bound is loose by
            at most a factor ``(10^(10/probes) sqrt(2/pi))^(1/(2 power + 1))``, 1.3 for the
            defaults). The first power step rides along in the Rayleigh-Ritz products; each
            further one costs two thin passes over the matrix.
        spectrum: when a subspace result fails only because of the part outside its basis
            (values dense at the cutoff or at the ``min_rank``-th value), certify it again
            from the eigenvalues of ``Y Y^T`` (float64, no eigenvectors: a fraction of an
            SVD) before another round or the exact SVD. Off by default: on the encoder
            workload of ``make bench`` at frozen 25% ranks it cut the exact fallbacks from
            9-18 to 3-6 of 24 matrices a step but not the cost (the Gram product, the
            eigenvalues and the extra rounds cost what the SVDs did).

    A call decides, for a whole batch, with one host synchronisation per round. Inputs are
    scaled per matrix by a power of two (exact) to a largest entry in ``[0.5, 1)``, so that
    no square overflows or underflows. The per-device random generators (seeded ``SEED``)
    are saved by :meth:`state_dict`.
    """

    name = "certified"

    def __init__(
        self,
        planner: Planner,
        tol: float = 1e-4,
        *,
        iterations: int = 2,
        probes: int = 16,
        power: int = 2,
        spectrum: bool = False,
    ) -> None:
        if not isinstance(planner, Planner):
            raise ValueError(f"planner must be a proxrank.backends.Planner, got {planner!r}")
        check_positive(tol, "tol")
        for value, option in ((iterations, "iterations"), (probes, "probes")):
            check_positive(value, option, integer=True)
        if isinstance(power, bool) or not isinstance(power, int) or power < 0:
            raise ValueError(f"power must be an int >= 0, got {power!r}")
        if not isinstance(spectrum, bool):
            raise ValueError(f"spectrum must be True or False, got {spectrum!r}")
        self.planner, self.tol, self.spectrum = planner, float(tol), spectrum
        self.iterations, self.probes, self.power = iterations, probes, power
        self._generators: dict[str, torch.Generator] = {}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(planner={self.planner!r}, tol={self.tol:g}, "
            f"iterations={self.iterations}, probes={self.probes}, power={self.power}, "
            f"spectrum={self.spectrum})"
        )

    # -- generators ------------------------------------------------------------------------

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(SEED)
        return self._generators[key]

    def state_dict(self) -> dict[str, Any]:
        """``{"generators": {device: state}}``: the random generators' states."""
        return {"generators": {k: g.get_state() for k, g in self._generators.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (``{}``: fresh generators). Everything is
        checked before anything changes; a bad input raises ``ValueError``."""
        if not isinstance(state_dict, dict) or not set(state_dict) <= {"generators"}:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict expects {{'generators': {{device: "
                f"state}}}} from state_dict(); got {state_dict!r:.120}"
            )
        saved = state_dict.get("generators", {})
        if not isinstance(saved, dict):
            raise ValueError(f"'generators' must be a dict device -> state, got {saved!r:.80}")
        gens = {}
        for key, value in saved.items():
            if not isinstance(value, Tensor) or value.dtype != torch.uint8:
                raise ValueError(
                    f"generator state for {key!r} must be a uint8 tensor from "
                    f"torch.Generator.get_state(), got {value!r:.80}"
                )
            try:
                gen = torch.Generator(device=torch.device(key))
                gen.set_state(value.clone())
            except (RuntimeError, TypeError, ValueError) as err:
                raise ValueError(f"generator state for device {key!r} is invalid: {err}") from err
            gens[str(torch.device(key))] = gen
        self._generators = gens

    def _probes(self, Y: Tensor) -> Tensor:
        """Gaussian probes ``Omega`` (``(b, n, probes)``) for a batch ``Y``."""
        shape = (Y.shape[0], Y.shape[-1], self.probes)
        gen = self._generator(Y.device)
        return torch.randn(shape, generator=gen, dtype=Y.dtype, device=Y.device)

    # -- kernels ---------------------------------------------------------------------------

    def _run(
        self,
        method: str,
        Y: Tensor,
        c: Tensor,
        norm2: Tensor,
        min_rank: int,
        idx,
        bases: list[Tensor] | None,
    ) -> Part:
        if method == "exact":
            return exact_part(Y, c, min_rank, idx)
        if method == "gram":
            return gram_part(Y, c, norm2, min_rank, idx)
        assert bases is not None
        k = max(b.shape[-1] for b in bases)
        Q = Y.new_zeros(len(idx), Y.shape[-2], k)
        for j, b in enumerate(bases):
            Q[j, :, : b.shape[-1]] = b.to(device=Y.device, dtype=Y.dtype)
        Q = torch.where(torch.isfinite(Q), Q, 0)  # a NaN basis from an old checkpoint
        # one block power step on this step's matrix first (the stored basis has not seen
        # the update since the last step, which alone puts the Ritz residual above tol);
        # the probes of the tail bound ride along
        P = Y @ torch.cat([(Q.mT @ Y).mT, self._probes(Y)], dim=-1)
        return subspace_part(Y, c, min_rank, idx, P[..., :k], P[..., k:], norm2, self.power)

    # -- orchestration ---------------------------------------------------------------------

    def svd(self, Y: Tensor, cutoff: Tensor, state: State, min_rank: int = 0) -> SVDResult:
        batch_shape, (m0, n0) = Y.shape[:-2], Y.shape[-2:]
        transposed = m0 > n0
        Yb = Y.reshape(-1, m0, n0)
        Yb = Yb.mT if transposed else Yb
        m, n = Yb.shape[-2:]
        B = Yb.shape[0]
        c = torch.as_tensor(cutoff, dtype=Y.dtype, device=Y.device).expand(batch_shape)
        c = c.reshape(-1)
        states = state_list(state, B)
        for st in states:
            if st.get("shape", (m, n)) != (m, n):
                raise ValueError(
                    f"backend state was built for a {st['shape']} matrix but the matrix is now "
                    f"{(m, n)} (oriented with the smaller side first): the parameter changed "
                    "shape; rebuild the ProxRank (or clear this matrix's state) after resizing"
                )
        plan = [self.planner.plan(st, m, n) for st in states]
        # exact power-of-two scaling to a largest entry in [0.5, 1): no square overflows
        # (an all-exact plan needs neither scaling nor norms: LAPACK scales itself and
        # reports non-finite input, and the exact SVD needs no certificate nor retry)
        exact_only = all(p == "exact" for p in plan)
        if exact_only:
            scale, Ys, cs = torch.ones_like(c), Yb, c
            norm2 = torch.zeros(B, dtype=torch.float64, device=Y.device)
        else:
            _, expo = torch.frexp(torch.maximum(Yb.amax((-2, -1)), -Yb.amin((-2, -1))))
            scale = torch.ldexp(torch.ones_like(c), -expo)
            Ys, cs = Yb * scale[:, None, None], c * scale
            norm2 = frobenius2(Ys)
        pending = []
        for method in dict.fromkeys(plan):
            idx = [i for i, p in enumerate(plan) if p == method]
            whole = len(idx) == B
            sub = (Ys, cs, norm2) if whole else (Ys[idx], cs[idx], norm2[idx])
            bases = [states[i]["basis"] for i in idx] if method == "subspace" else None
            pending.append(self._run(method, *sub, min_rank, idx, bases))
        limit = (self.tol * norm2.sqrt()).to(Y.dtype)
        parts: list[Part] = []
        need: dict[int, int] = {}
        rounds: dict[int, int] = {}
        ritz = dict.fromkeys(range(B), 1)  # Rayleigh-Ritz rounds so far
        spectra: dict[int, tuple[Tensor, ...]] = {}  # Gram eigenvalues, once computed
        failed: set[int] = set()
        tried = {i for i, p in enumerate(plan) if p == "gram"}  # had the Gram route
        for r in itertools.count(1):  # each matrix ends with the exact SVD at the latest
            ok = []  # per matrix: 1 certified, 2 not but the spectrum may certify it, 0 not
            for p in pending:
                good = (p.bound <= limit[p.idx]) | (p.method == "exact")
                hope = (p.floor <= limit[p.idx]) if p.floor is not None else torch.zeros_like(good)
                ok.append(good.long() + 2 * (~good & hope).long())
            checks = [torch.cat(ok), *(p.need for p in pending)]
            if r == 1 and not exact_only:
                checks.append(torch.isfinite(norm2).long())
            flags = torch.cat(checks).tolist()  # one sync
            if r == 1 and not exact_only and not all(flags[-B:]):
                bad = flags[-B:].index(0)
                raise BackendError(
                    f"matrix {bad} of the batch has non-finite entries; the prox needs finite "
                    "weights (check the learning rate and gradients)",
                    bad,
                )
            order = [i for p in pending for i in p.idx]
            need.update(zip(order, flags[len(order) : 2 * len(order)], strict=True))
            bad_set = {i for i, good in zip(order, flags, strict=False) if good != 1}
            hopeful = {i for i, good in zip(order, flags, strict=False) if good == 2}
            retry: dict[int, list[tuple[Part, int, int]]] = {}
            recertify: list[tuple[Part, list[int]]] = []
            redo = []
            for p in pending:
                parts.append(p.select([j for j, i in enumerate(p.idx) if i not in bad_set]))
                rows = []
                for j, i in enumerate(p.idx):
                    rounds[i] = r
                    if i not in bad_set:
                        continue
                    if self.spectrum and i in hopeful and p.spectral is not None:  # the tail
                        rows.append(j)
                    elif ritz[i] < self.iterations:
                        ritz[i] += 1
                        retry.setdefault(p.next_src.shape[-1], []).append((p, j, i))
                    else:
                        redo.append(i)
                if rows:
                    recertify.append((p, rows))
            pending = []
            for p, rows in recertify:
                fresh = [p.idx[j] for j in rows if p.idx[j] not in spectra]
                if fresh:
                    spec = gram_eigenvalues(Ys[fresh], norm2[fresh], fresh)
                    spectra.update({i: tuple(x[t] for x in spec) for t, i in enumerate(fresh)})
                got = [spectra[p.idx[j]] for j in rows]
                spectrum = tuple(torch.stack([g[a] for g in got]) for a in range(3))
                pending.append(p.with_spectrum(rows, spectrum))
            for group in retry.values():  # one more Rayleigh-Ritz round, per basis width
                idx = [i for _, _, i in group]
                Q = torch.stack([p.next_src[j] for p, j, _ in group])
                sub = Ys[idx]
                YO = sub @ self._probes(sub)
                pending.append(
                    subspace_part(sub, cs[idx], min_rank, idx, Q, YO, norm2[idx], self.power)
                )
            # out of rounds: the planner's fallback (the Gram route for oblong matrices) once,
            # then the exact SVD
            late = [i for i in redo if i not in tried and self.planner.fallback(m, n) == "gram"]
            tried.update(late)
            if late:
                pending.append(gram_part(Ys[late], cs[late], norm2[late], min_rank, late))
            redo = [i for i in redo if i not in late]
            if redo:
                failed.update(redo)
                pending.append(exact_part(Ys[redo], cs[redo], min_rank, redo))
            if not pending:
                break
        parts = [p for p in parts if p.idx]
        K = max(need.values())
        U = Yb.new_zeros(B, m, K)
        S = Yb.new_zeros(B, K)
        Vh = Yb.new_zeros(B, K, n)
        bound = Yb.new_zeros(B)
        for p in parts:
            k = min(K, p.S.shape[-1])
            t = torch.tensor(p.idx, device=Y.device)
            keep = torch.arange(k, device=Y.device) < p.need.unsqueeze(-1)
            U[t, :, :k] = p.U[..., :k]
            S[t, :k] = torch.where(keep, p.S[..., :k], 0)
            Vh[t, :k] = p.vh(k)
            bound[t] = p.bound
        S = S / scale[:, None]
        bound = bound / scale
        updates = [self._record(p, states, need, rounds, ritz, failed, bound, m, n) for p in parts]
        for update in updates:  # nothing is assigned before everything succeeded
            for i, values in update.items():
                states[i].update(values)
        if transposed:
            U, Vh = Vh.mT, U.mT
        return SVDResult(
            U.reshape(*batch_shape, *U.shape[-2:]),
            S.reshape(*batch_shape, K),
            Vh.reshape(*batch_shape, *Vh.shape[-2:]),
            bound.reshape(batch_shape),
        )

    def _record(self, p: Part, states, need, rounds, ritz, failed, bound, m: int, n: int):
        """The new per-matrix entries of ``p``'s matrices: diagnostics and, when the planner
        keeps one, the next step's basis (fresh tensors), wider after a step that needed
        another Rayleigh-Ritz round or the exact SVD (not after a certificate from the
        spectrum: a wider block does not lower a dense tail)."""
        out: dict[int, dict[str, Any]] = {}
        sizes = []
        for i in p.idx:
            st = states[i]
            subspace = p.method == "subspace"
            k_cur = st["basis"].shape[-1] if subspace and st.get("basis") is not None else 0
            hard = i in failed or ritz[i] > 1
            sizes.append(Planner.block(need[i], k_cur, m, hard))
            out[i] = {
                "backend": p.method,
                "error_bound": bound[i].clone(),
                "triplets": need[i],
                "fallback": i in failed,
                "rounds": rounds[i],
                "spectrum": p.from_spectrum,
                "since_refresh": st.get("since_refresh", 0) + 1 if subspace else 0,
            }
        if not self.planner.keeps_basis:
            return out
        K = max(sizes)
        Qn = p.next_src[..., :K]  # finite: the input is finite and scaled
        if Qn.shape[-1] < K:  # grow: new directions at random
            extra = torch.randn(
                (len(p.idx), m, K - Qn.shape[-1]),
                generator=self._generator(Qn.device),
                dtype=Qn.dtype,
                device=Qn.device,
            )
            Qn = torch.cat([Qn, extra / m**0.5], dim=-1)
        for j, i in enumerate(p.idx):
            out[i]["basis"] = Qn[j, :, : sizes[j]].clone()
            out[i]["shape"] = (m, n)
        return out


class GramBackend(CertifiedBackend):
    """Eigendecomposition of the smaller Gram matrix in float64 (see :mod:`proxrank.backends`).

    Costs ``m^2 n`` (float64) plus an ``m x m`` eigendecomposition for ``m <= n``; about 3x
    cheaper than the SVD and rank independent, so it suits the full-rank phase. Small singular
    values lose relative accuracy in Gram form (``s^2`` is what is computed); the certificate
    accounts for it through the eigen-residuals. A failed certificate goes to the exact SVD.
    """

    name = "gram"

    def __init__(self, tol: float = 1e-4) -> None:
        super().__init__(GramPlanner(), tol, iterations=1)

    def __repr__(self) -> str:
        return f"GramBackend(tol={self.tol:g})"


class SubspaceBackend(CertifiedBackend):
    """Warm-started subspace iteration with Rayleigh-Ritz (see :mod:`proxrank.backends`):
    :class:`CertifiedBackend` with a :class:`~proxrank.backends.planner.SubspacePlanner`
    (``refresh``: steps between exact recomputations of the basis). A step costs about five
    ``m n k`` products (power step, Rayleigh-Ritz, reconstruction) and one host
    synchronisation per batch; another round about two more."""

    name = "subspace"

    def __init__(
        self,
        tol: float = 1e-4,
        *,
        iterations: int = 2,
        refresh: int = 100,
        probes: int = 16,
        power: int = 2,
        spectrum: bool = False,
    ) -> None:
        planner = SubspacePlanner(refresh)
        super().__init__(
            planner, tol, iterations=iterations, probes=probes, power=power, spectrum=spectrum
        )


class AutoBackend(CertifiedBackend):
    """Per matrix and step, exact SVD, Gram or subspace iteration, as an
    :class:`~proxrank.backends.planner.AutoPlanner` (``refresh``, ``max_ratio``,
    ``min_size``, ``gram_aspect``) chooses; other options as :class:`CertifiedBackend`."""

    name = "auto"

    def __init__(
        self,
        tol: float = 1e-4,
        *,
        max_ratio: float = 0.7,
        min_size: int = 160,
        gram_aspect: float = 2.0,
        iterations: int = 2,
        refresh: int = 100,
        probes: int = 16,
        power: int = 2,
        spectrum: bool = False,
    ) -> None:
        planner = AutoPlanner(refresh, max_ratio, min_size, gram_aspect)
        super().__init__(
            planner, tol, iterations=iterations, probes=probes, power=power, spectrum=spectrum
        )
