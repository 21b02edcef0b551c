"""Training across processes (``torch.distributed``): the prox work shared across ranks.

Under data parallelism every rank would otherwise repeat the same decompositions. The engine
splits them: each selected **parameter** (all the matrices of it: the ``q``/``k``/``v`` blocks
of an attention weight go together) gets one owning rank, the owners are chosen by longest
processing time first on the cost ``m n min(m, n)`` of a matrix's decomposition, over every
selected matrix (so a matrix keeps its owner from step to step), and each rank makes the backend
calls for its own matrices only (same batching as one process). Then:

* **replicated parameters** (DDP, or any setting where every rank holds the whole weight):
  each owner broadcasts what every rank needs of its outcomes: the new matrix ``X``, the
  singular values ``S`` and thresholded ``S_new``, the error bound and the backend's new
  per-matrix state (warm-start basis included). Every rank then commits the same bits: weights
  and state stay identical on every rank.
* **sharded parameters** (FSDP2's ``fully_shard``: ``DTensor`` with ``Shard(0)`` on a 1-D mesh):
  the owner gathers the row shards of its parameters (``dist.gather``), applies the prox to the
  full matrices, and scatters the rows back (``dist.scatter``); a rank holds no full parameter
  but the ones it owns. ``S``, ``S_new``, the bound and the backend state are broadcast as
  above (never ``X``).

Everything else that needs a whole matrix is done the same way, by its owner, and only small
results travel (:meth:`Engine.on_owners`): the metric weighting of a matrix is computed by its
owner only; a budget schedule's spectra are computed by the owners and every rank allocates
from the same spectra; diagnostics are measured by the owner (norms of ``W``, ``Y``, ``X`` and
of the realised step, a few numbers per matrix; ``X_prev`` is kept there) and every rank
records the same figures, the loss averaged over the ranks.

Statistics are the same on every rank, and equal to one process's on the global batch (equal
batches per rank):

* **layer inputs** (``"activation"``, the ``B`` of ``"two_sided"``) differ per rank, since every
  rank sees other data: every tensor of such a matrix's ``metric`` state is averaged across
  ranks at each step, before it is used. The statistics are running means or EMAs, affine in
  each input's statistic, so the average is the statistic of the global batch.
* **gradients** (``"fisher"``, the ``A`` of ``"two_sided"``): DDP and FSDP2 have averaged the
  gradients. Replicated, every rank updates every statistic from its whole gradient (the same
  bits); sharded, the owner gathers the whole gradient of its parameters, updates the statistic
  (a vector per matrix) and sends it to every rank. Reducing per-shard statistics instead would
  need the layout of every matrix view (blocks, transposed ``Conv1D`` weights) in the shards.
* **base optimizer state** (``"adam"``): read only where the weighting is computed, on the
  owner; sharded, the owner gathers the keys the metric names
  (:attr:`proxrank.metrics.Metric.base_state_keys`) of its parameters. Nothing is stored.

The backend's random generators (used by the fast backends' probes) are set to rank 0's after
every step, so that a checkpoint of any rank resumes every rank exactly.

A failure on one rank (a decomposition that does not converge, a statistic or weighting that
cannot be computed) is raised on every rank, before anything is written, so no rank is left
waiting in a collective.
"""

from __future__ import annotations

import heapq
import math
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .metrics import Metric
from .selection import Target

__all__ = ["Checkpointed", "Engine", "Traffic", "assign_owners", "finite_operand", "is_sharded"]

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # torch without DTensor: nothing can be sharded
    DTensor, Shard = (), ()  # type: ignore[assignment,misc]


def is_sharded(t: Any) -> bool:
    """Whether ``t`` is a ``DTensor`` (a parameter sharded by FSDP2 or tensor parallelism)."""
    return bool(DTensor) and isinstance(t, DTensor)


def finite_operand(target: Target, t: Tensor) -> Tensor:
    """What the finite check reads of ``t`` (the weight or gradient of ``target``'s parameter):
    its matrix, or of a sharded tensor this rank's whole shard (each rank checks its rows, the
    verdicts are combined by :meth:`Engine.all_ranks`)."""
    return t.to_local() if is_sharded(t) else target.view.read(t)


def assign_owners(costs: Sequence[float], world: int) -> list[int]:
    """An owning rank per unit of work, longest processing time first: units in decreasing
    cost (ties by position) each go to the least loaded rank (ties: the lowest rank). The
    largest load is at most ``sum(costs) / world + max(costs)``; the same inputs give the same
    owners on every rank."""
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    owners = [0] * len(costs)
    loads = [(0.0, r) for r in range(world)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, r = heapq.heappop(loads)
        owners[i] = r
        heapq.heappush(loads, (load + costs[i], r))
    return owners


def _equal(a: Any, b: Any) -> bool:
    """Equality of nested state: tensors by value (dtype, shape and entries)."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (
            isinstance(a, Tensor) and isinstance(b, Tensor) and a.dtype == b.dtype
            and a.shape == b.shape and bool(torch.equal(a.cpu(), b.cpu()))
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(_equal, a, b))
    return bool(a == b)


@dataclass(frozen=True, eq=False)
class Checkpointed:
    """proxrank's state in a checkpoint as one opaque value. ``ProxRank.state_dict`` puts it in
    ``param_groups[-1]["proxrank"]`` (next to the ``"proxrank"`` key, the same object), because
    ``torch.distributed.checkpoint.state_dict.get_state_dict`` keeps only ``state`` and
    ``param_groups`` and keeps a group's extra keys; ``torch.distributed.checkpoint`` saves an
    opaque value whole (pickled once, by rank 0: it is the same on every rank) instead of
    matching the shapes of the tensors inside it, which change as ranks move."""

    state: dict[str, Any]

    def __eq__(self, other: object) -> bool:
        """Equal states (tensors compared by value)."""
        return isinstance(other, Checkpointed) and _equal(self.state, other.state)

    __hash__ = None  # type: ignore[assignment]


if hasattr(torch.serialization, "add_safe_globals"):  # torch.load(weights_only=True) accepts it
    torch.serialization.add_safe_globals([Checkpointed])


@dataclass(frozen=True)
class Traffic:
    """What the last step did on this rank: the matrices whose prox this rank computed, the
    bytes of tensor payload it sent and received (broadcasts counted once per receiver; gathers
    and scatters by their shards; the prox's and those of the owners' other work: gradients,
    optimizer state, spectra, diagnostics) and of pickled metadata it exchanged."""

    matrices: int = 0
    sent: int = 0
    received: int = 0
    metadata: int = 0


@dataclass(frozen=True)
class _Slot:
    """A tensor's place in a packed structure."""

    index: int


@dataclass(frozen=True)
class _Node:
    """A named tuple in a packed structure."""

    kind: type
    children: tuple[Any, ...]


def _pack(obj: Any, tensors: list[Tensor]) -> Any:
    """``obj`` with each tensor replaced by its index in ``tensors`` (appended to)."""
    if isinstance(obj, Tensor):
        tensors.append(obj)
        return _Slot(len(tensors) - 1)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return _Node(type(obj), tuple(_pack(v, tensors) for v in obj))
    if isinstance(obj, dict):
        return {k: _pack(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_pack(v, tensors) for v in obj)
    return obj


def _unpack(obj: Any, tensors: list[Tensor]) -> Any:
    if isinstance(obj, _Slot):
        return tensors[obj.index]
    if isinstance(obj, _Node):
        return obj.kind(*(_unpack(v, tensors) for v in obj.children))
    if isinstance(obj, dict):
        return {k: _unpack(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_unpack(v, tensors) for v in obj)
    return obj


def _by_dtype(meta: list[tuple[torch.dtype, tuple[int, ...]]]) -> dict[torch.dtype, list[int]]:
    groups: dict[torch.dtype, list[int]] = {}
    for i, (dtype, _) in enumerate(meta):
        groups.setdefault(dtype, []).append(i)
    return dict(sorted(groups.items(), key=lambda kv: str(kv[0])))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _rows(d0: int, world: int, rank: int) -> tuple[int, int]:
    """``(start, size)`` of ``rank``'s rows of a ``Shard(0)`` tensor with ``d0`` rows
    (``torch.chunk``'s split: ``ceil(d0 / world)`` rows each, the last ranks fewer or none)."""
    chunk = -(-d0 // world)
    start = min(rank * chunk, d0)
    return start, min(chunk, d0 - start)


class Engine:
    """The shared prox of one :class:`proxrank.ProxRank` across the ranks of a process group
    (see the module docstring). Built by :meth:`detect`; the optimizer calls :meth:`prepare`
    first in each step, then :meth:`all_ranks`, :meth:`on_owners`, :meth:`gather`,
    :meth:`compute` and :meth:`commit`."""

    def __init__(self, group: Any, sharded: bool, device: torch.device) -> None:
        self.group = group
        self.sharded = sharded
        self.device = device
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        #: What the last step did on this rank (:class:`Traffic`).
        self.traffic = Traffic()
        self._scatters: list[tuple[int, list[Tensor]]] = []
        self._full: dict[int, Tensor] = {}
        self._owner_of: dict[int, int] = {}

    def __deepcopy__(self, memo: dict[int, Any]) -> Engine:
        """A copy on the same process group (groups are not copied)."""
        return type(self)(self.group, self.sharded, self.device)

    @classmethod
    def detect(cls, targets: Sequence[Target], option: bool | None) -> Engine | None:
        """The engine for these matrices: sharded when their parameters are ``DTensor``s,
        replicated when a process group of several ranks is initialised, none otherwise or
        with ``option=False``. ``option=True`` requires one."""
        if option is not None and not isinstance(option, bool):
            raise TypeError(f"distributed must be None, True or False, got {option!r}")
        sharded = [t for t in targets if is_sharded(t.param)]
        if option is False or not targets:  # nothing to share: no matrix is selected
            if sharded:
                raise ValueError(
                    f"weight {sharded[0].name!r} is sharded (a DTensor): its prox needs the "
                    "distributed engine; leave distributed=None"
                )
            return None
        if sharded:
            return cls._sharded(targets, sharded)
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            if option:
                raise ValueError(
                    "distributed=True, but no torch.distributed process group of more than one "
                    "rank is initialised; call torch.distributed.init_process_group first, or "
                    "leave distributed=None"
                )
            return None
        return cls(dist.group.WORLD, sharded=False, device=targets[0].param.device)

    @classmethod
    def _sharded(cls, targets: Sequence[Target], sharded: list[Target]) -> Engine:
        first = sharded[0].param
        mesh = first.device_mesh
        for t in targets:
            p = t.param
            if not is_sharded(p) or p.device_mesh != mesh or tuple(p.placements) != (Shard(0),):
                where = p.placements if is_sharded(p) else "a plain tensor"
                raise NotImplementedError(
                    f"weight {t.name!r} is {where}: proxrank shares the prox of parameters "
                    "sharded as FSDP2's fully_shard shards them (Shard(0) on one 1-D device "
                    "mesh, every selected weight alike); HSDP and tensor parallelism are not "
                    "supported yet. Exclude the weight (exclude=...)"
                )
        return cls(mesh.get_group(), sharded=True, device=first.to_local().device)

    # -- before the step -------------------------------------------------------------------
    def prepare(self, records: Sequence[Any], metrics: Sequence[Metric]) -> dict[int, dict]:
        """Start a step: settle the owner of every selected matrix (:meth:`owner`) and return
        the ``metric`` updates that make input statistics the same on every rank: each tensor
        in the state of a matrix whose metric gathers inputs, averaged across ranks (one
        all-reduce per dtype)."""
        self.traffic = Traffic()
        self._owner_of = self._assign([rec.target for rec in records])
        tensors: list[Tensor] = []
        packed = {}
        for i, (rec, metric) in enumerate(zip(records, metrics, strict=True)):
            if metric.needs_inputs and rec.metric:
                packed[i] = _pack(rec.metric, tensors)
        if not tensors:
            return {}
        meta = [(t.dtype, tuple(t.shape)) for t in tensors]
        out: list[Tensor] = [torch.empty(0)] * len(tensors)
        for idx in _by_dtype(meta).values():
            buf = torch.cat([tensors[i].reshape(-1).to(self.device) for i in idx])
            dist.all_reduce(buf, group=self.group)
            buf /= self.world
            for i, piece in zip(idx, buf.split([_numel(meta[i][1]) for i in idx]), strict=True):
                out[i] = piece.reshape(meta[i][1]).to(tensors[i].device)
        return {i: _unpack(p, out) for i, p in packed.items()}

    def first_error(self, message: str | None) -> str | None:
        """The first rank's error message (prefixed with that rank), on every rank (one
        all-gather): an error only some ranks saw must stop every rank."""
        messages: list[str | None] = [None] * self.world
        dist.all_gather_object(messages, message, group=self.group)
        for r, m in enumerate(messages):
            if m is not None:
                return m if self.world == 1 else f"on rank {r}: {m}"
        return None

    def raise_first(self, error: Exception | None) -> None:
        """Raise on every rank the first rank's error (this rank's own, when it had one; the
        other ranks' with their type and message, prefixed with the rank), or return when no
        rank had one (one all-gather)."""
        mine = None if error is None else (type(error), str(error))
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, mine, group=self.group)
        self._raise(gathered, error)

    def _raise(self, errors: Sequence[tuple[type, str] | None], error: Exception | None) -> None:
        for r, err in enumerate(errors):
            if err is None:
                continue
            if error is not None:
                raise error
            kind, message = err
            try:
                other = kind(f"on rank {r}: {message}")
            except Exception:  # an exception type that takes other arguments
                other = RuntimeError(f"on rank {r}: {kind.__name__}: {message}")
            raise other

    def all_ranks(self, finite: Tensor) -> Tensor:
        """Per-tensor finite flags combined over ranks (sharded: each rank checked its own
        rows; replicated: every rank checked the same tensors, nothing to combine)."""
        if not self.sharded:
            return finite
        flags = finite.to(torch.int32)
        dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=self.group)
        return flags.bool()

    def mean(self, value: Tensor | float | None) -> Tensor:
        """The mean over the ranks of a number each rank has (its loss: the mean over the
        ranks of per-rank mean losses is the global batch's, for equal per-rank batches), the
        same on every rank, as a 0-dim float64 tensor on the engine's device; NaN when a rank
        has none. One all-reduce, no host synchronisation."""
        v = torch.as_tensor(math.nan if value is None else value)
        buf = v.detach().reshape(()).to(self.device, torch.float64).clone()
        dist.all_reduce(buf, group=self.group)
        return buf / self.world

    # -- ownership -------------------------------------------------------------------------
    def _assign(self, targets: Sequence[Target]) -> dict[int, int]:
        """The owning rank of each parameter (by ``id``): its matrices' costs summed, the
        parameters balanced by :func:`assign_owners`."""
        units: dict[int, int] = {}
        costs: list[float] = []
        for t in targets:
            m, n = t.shape2d
            u = units.setdefault(id(t.param), len(costs))
            if u == len(costs):
                costs.append(0.0)
            costs[u] += float(m) * n * min(m, n)
        owner_of = assign_owners(costs, self.world)
        return {key: owner_of[u] for key, u in units.items()}

    def owner(self, target: Target) -> int:
        """The rank that owns ``target``'s parameter: settled by :meth:`prepare` over every
        selected matrix (not only those with a prox at this step), so a matrix keeps its owner
        from step to step while the selection and the shapes stay."""
        return self._owner_of[id(target.param)]

    def owners(self, targets: Sequence[Target]) -> list[int]:
        """The owner of each of ``targets`` (:meth:`owner`)."""
        return [self.owner(t) for t in targets]

    # -- work done by the owners -----------------------------------------------------------
    def on_owners(
        self,
        targets: Sequence[Target],
        operands: Sequence[Tensor],
        fn: Callable[[int, Tensor], Any],
    ) -> list[Any]:
        """``fn(i, whole)`` for each item ``i``, computed once, on the owner of
        ``targets[i]``, with ``whole`` the whole of ``operands[i]`` (a tensor shaped like the
        target's parameter: the parameter, its gradient, its optimizer state; gathered on the
        owner when sharded); the results (tensors in nested containers: small ones, such as
        spectra or statistics) on every rank, bit-identical. An error raised by ``fn`` on any
        rank is raised on every rank. No item (the same on every rank): nothing exchanged."""
        if not targets:
            return []
        owners = self.owners(targets)
        whole, _ = self._collect(operands, owners)
        results: dict[int, Any] = {}
        error = None
        try:
            for i, (op, o) in enumerate(zip(operands, owners, strict=True)):
                if o == self.rank:
                    results[i] = fn(i, whole[id(op)])
        except Exception as err:  # raised below on every rank, after the exchange
            error = err
        return self._exchange(results, len(targets), error)[0]

    def gather(self, targets: Sequence[Target], operands: Sequence[Tensor]) -> dict[int, Tensor]:
        """The whole of each of ``operands`` (shaped like its target's parameter) whose target
        this rank owns, keyed by ``id(operand)``: a sharded one gathered from every rank's row
        shards, a replicated one as it is. Nothing of the other ranks' operands is held here."""
        return self._collect(operands, self.owners(targets))[0]

    def compute(
        self,
        targets: Sequence[Target],
        batches: Sequence[list[int]],
        run: Callable[[list[int], dict[int, Tensor]], list[Any]],
        backend: Any,
    ) -> list[Any]:
        """Every job's outcome on every rank. ``targets[j]`` is job ``j``'s matrix; each batch
        (job indices) is run by ``run(members, full)`` on the members this rank owns, ``full``
        mapping ``id(param)`` to the gathered parameter (sharded); each outcome is reduced to
        ``outcome.shared(weights)`` and sent to every rank."""
        if not targets:  # the same on every rank: nothing to exchange
            return []
        owners = self.owners(targets)
        full: dict[int, Tensor] = {}
        if self.sharded:
            full, self._scatters = self._collect([t.param for t in targets], owners)
            self._full = full
        results: dict[int, Any] = {}
        error = None
        try:
            for members in batches:
                own = [j for j in members if owners[j] == self.rank]
                if not own:
                    continue
                for j, out in zip(own, run(own, full), strict=True):
                    if self.sharded:
                        targets[j].view.write(full[id(targets[j].param)], out.X)
                    results[j] = out.shared(weights=not self.sharded)
        except Exception as err:  # raised below on every rank, after the exchange
            error = err
        state = backend.state_dict() if self.rank == 0 else None
        outcomes, state = self._exchange(results, len(targets), error, state)
        if self.rank != 0:
            backend.load_state_dict(state)
        self._count(matrices=owners.count(self.rank))
        return outcomes

    def _exchange(
        self, results: dict[int, Any], count: int, error: Exception | None, extra: Any = None
    ) -> tuple[list[Any], Any]:
        """Every rank's ``results`` (item index -> tensors in nested containers) as one list
        of ``count`` items on every rank, and rank 0's ``extra``: the structures and errors in
        one all-gather of pickled metadata, the tensors in one broadcast per rank and dtype.
        Raises the first error on every rank."""
        tensors: list[Tensor] = []
        skeleton = _pack(results, tensors)
        meta = [(t.dtype, tuple(t.shape)) for t in tensors]
        mine = (None if error is None else (type(error), str(error)), skeleton, meta, extra)
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, mine, group=self.group)
        self._count(metadata=len(pickle.dumps(mine)) * self.world)
        self._raise([g[0] for g in gathered], error)
        out: list[Any] = [None] * count
        for r, (_, skel, their_meta, _) in enumerate(gathered):
            got, nbytes = self._broadcast(r, tensors if r == self.rank else None, their_meta)
            if r == self.rank:
                self._count(sent=nbytes * (self.world - 1))
            else:
                self._count(received=nbytes)
            for j, value in _unpack(skel, got).items():
                out[j] = value
        return out, gathered[0][3]

    def _count(
        self, matrices: int = 0, sent: int = 0, received: int = 0, metadata: int = 0
    ) -> None:
        t = self.traffic
        self.traffic = Traffic(
            t.matrices + matrices, t.sent + sent, t.received + received, t.metadata + metadata
        )

    def _broadcast(
        self, src: int, tensors: list[Tensor] | None, meta: list[tuple[torch.dtype, tuple]]
    ) -> tuple[list[Tensor], int]:
        """Rank ``src``'s tensors on every rank: one broadcast per dtype (``src`` keeps its
        own tensors: the bytes it sent are theirs)."""
        out: list[Tensor] = [torch.empty(0)] * len(meta)
        nbytes = 0
        for dtype, idx in _by_dtype(meta).items():
            sizes = [_numel(meta[i][1]) for i in idx]
            if tensors is not None:
                buf = torch.cat([tensors[i].reshape(-1).to(self.device) for i in idx])
            else:
                buf = torch.empty(sum(sizes), dtype=dtype, device=self.device)
            if buf.numel():
                dist.broadcast(buf, dist.get_global_rank(self.group, src), group=self.group)
            nbytes += buf.numel() * buf.element_size()
            if tensors is None:
                for i, piece in zip(idx, buf.split(sizes), strict=True):
                    out[i] = piece.reshape(meta[i][1]).clone()  # state must not pin the buffer
        return (out if tensors is None else list(tensors)), nbytes

    # -- sharded tensors -------------------------------------------------------------------
    def _padded(self, p: Tensor, rows: Tensor) -> Tensor:
        chunk = -(-p.shape[0] // self.world)
        out = rows.new_zeros((chunk, *p.shape[1:]))
        out[: rows.shape[0]] = rows
        return out.reshape(-1)

    def _collect(
        self, tensors: Sequence[Tensor], owners: Sequence[int]
    ) -> tuple[dict[int, Tensor], list[tuple[int, list[Tensor]]]]:
        """The whole of each tensor this rank owns, keyed by ``id`` (each tensor once): sharded,
        gathered from every rank's row shards (one gather per owner and dtype); replicated, the
        tensor itself. Also the gathered groups ``(owner, tensors)``, in the order of the
        gathers (what :meth:`commit` scatters back)."""
        per: dict[int, list[Tensor]] = {}
        seen: set[int] = set()
        for t, o in zip(tensors, owners, strict=True):
            if id(t) not in seen:
                seen.add(id(t))
                per.setdefault(o, []).append(t)
        if not self.sharded:
            return {id(t): t for t in per.get(self.rank, [])}, []
        full: dict[int, Tensor] = {}
        groups: list[tuple[int, list[Tensor]]] = []
        for o, owned in sorted(per.items()):
            for dtype in sorted({p.dtype for p in owned}, key=str):
                group = [p for p in owned if p.dtype == dtype]
                for p in group:
                    size = _rows(p.shape[0], self.world, self.rank)[1]
                    if p.to_local().shape[0] != size:
                        raise NotImplementedError(
                            f"a sharded parameter of shape {tuple(p.shape)} has "
                            f"{p.to_local().shape[0]} rows on rank {self.rank}, not the {size} "
                            "of torch.chunk's Shard(0) split; other splits are not supported"
                        )
                send = torch.cat([self._padded(p, p.to_local().detach()) for p in group])
                mine = o == self.rank  # only the owner holds the whole tensors
                recv = [torch.empty_like(send) for _ in range(self.world)] if mine else None
                dst = dist.get_global_rank(self.group, o)
                dist.gather(send, recv, dst=dst, group=self.group)
                groups.append((o, group))
                nbytes = send.numel() * send.element_size()
                if not mine:
                    self._count(sent=nbytes)
                    continue
                self._count(received=nbytes * (self.world - 1))
                offset = 0
                for p in group:
                    chunk = -(-p.shape[0] // self.world)
                    numel = chunk * _numel(tuple(p.shape[1:]))
                    pieces = [
                        recv[r][offset : offset + numel].reshape(chunk, *p.shape[1:])
                        for r in range(self.world)
                    ]
                    full[id(p)] = torch.cat(
                        [x[: _rows(p.shape[0], self.world, r)[1]] for r, x in enumerate(pieces)]
                    )
                    offset += numel
        return full, groups

    def commit(self) -> None:
        """Sharded: the owners' new rows back to every rank (one scatter per owner and dtype),
        written into each rank's shard. Replicated: nothing (every rank wrote ``X``)."""
        scatters, self._scatters = self._scatters, []
        full, self._full = self._full, {}
        for o, group in scatters:
            recv = torch.cat([self._padded(p, p.to_local()[:0]) for p in group])
            chunks = None
            if o == self.rank:
                chunks = []
                for r in range(self.world):
                    pieces = []
                    for p in group:
                        start, size = _rows(p.shape[0], self.world, r)
                        pieces.append(self._padded(p, full[id(p)][start : start + size]))
                    chunks.append(torch.cat(pieces))
                self._count(sent=recv.numel() * recv.element_size() * (self.world - 1))
            else:
                self._count(received=recv.numel() * recv.element_size())
            src = dist.get_global_rank(self.group, o)
            dist.scatter(recv, chunks, src=src, group=self.group)
            offset = 0
            for p in group:
                chunk = -(-p.shape[0] // self.world)
                numel = chunk * _numel(tuple(p.shape[1:]))
                local = p.to_local()
                rows = recv[offset : offset + numel].reshape(chunk, *p.shape[1:])
                local.copy_(rows[: local.shape[0]])
                offset += numel
