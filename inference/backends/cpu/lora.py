"""The CPU backend's LoRA: a step's mapping (:class:`~inference.lora_mapping.LoraMapping`) computed
with torch ops over contiguous copies of the adapters' weights ("gathered"), tested against the
plain references of ``kernels/lora.py``. The step's rows take one of three routes:

  - a *group*: adapters with the same layout (page count and per-module offsets and ranks, which
    adapters of one rank and target set share): all of them, each padded to the largest row count
    ``m``, when that at most quadruples their rows (``PAD_MAX_WASTE``); otherwise those with at most
    ``PAD_MAX_ROWS`` rows each (padded) and those with the same larger number ``m`` of rows. They
    are read from their layout's region of :class:`~inference.backends.cpu.staging.StagedAdapters`,
    where each adapter is copied once and stays while it keeps running, and where the step's
    adapters of a layout hold positions ``0 .. n-1``. A group is then a run of positions: one
    module's A of all of them is a contiguous view ``[G, r, in]`` of the (module-major) region and
    Bt one ``[G, r, out]``, and the rows cost two batched matmuls (``bmm`` over ``[G, r, m]`` and
    ``[G, m, .]``) with no copy of any weight. The modules of one ``apply`` call share their input,
    and the region keeps the A of q, k and v (gate and up) side by side, so they share one gather of
    the rows and one shrink over ``[G, r_q + r_k + r_v, in]``; each module's expand reads its
    columns of the result. A run that also holds a few adapters of another group (holes) is
    computed with weight 0 there, as are padding rows; a run with more holes has its members'
    weights copied out. The rows are gathered with an index and their results added back with a
    slice, a permutation or ``index_add_`` (:class:`_Group`); the engine orders a group's rows by
    staged position (:func:`chunk_order`), so a decode step with the same adapters as the last one
    takes the slice. In decode, where every request has its own adapter, all rows are one group:
    each step reads the running adapters' weights once, where it used to copy them into a step
    buffer first and then read the copy.
  - a *segment*: a run of adjacent rows of one adapter (a prefill chunk, or the decode rows of a
    popular adapter: the engine orders a step's chunks by adapter with :func:`chunk_order`) whose A
    and Bt are plain views; two matmuls. Runs of at least ``SEGMENT_MIN_ROWS`` rows are always
    segments, and so are the rows of adapters in no group while there are at most
    ``MAX_SOLO_SEGMENTS`` such adapters.
  - *per-row*: the rows of the adapters in no group when there are more of them; each row's A rows
    and Bt rows are picked out of a sliding-window view of the buffer (``unfold``: one memcpy per
    row), the shrink is a multiply-and-sum over ``[T, R, in]`` and the expand a batched
    ``[1, R] @ [R, out]`` product, with the row's scaling in a rank mask; its cost does not grow
    with the number of adapters.

  Segments and per-row rows read a step buffer: once per layer, the pages of their adapters are
  copied into one contiguous buffer with a single page-granular ``index_select``, in which every
  adapter's virtual buffer is contiguous.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from inference.adapters.manager import DeviceAdapter
from inference.backends.cpu.lora_routes import MAX_GROUP_HOLES, PAD_MAX_ROWS, chunk_order, route_rows
from inference.backends.cpu.staging import Region, StagedAdapters
from inference.lora_mapping import LoraMapping
from inference.page_pool import PagePool

@dataclass
class _ModuleMeta:
    ranks: list[int]  # [S]
    a_offset: list[int]  # [S]
    b_offset: list[int]  # [S]
    max_rank: int
    rows: _RowIndex | None = None
    # the segments whose adapter targets the module: (rows, A start, Bt start, rank, scaling),
    # starts in elements of the gathered buffer
    segments: list[tuple[slice, int, int, int, float]] = field(default_factory=list)


@dataclass
class _RowIndex:
    """Where the per-row path's rows find their A and Bt rows in the step's gathered buffer.

    T1 = rows on the per-row path, R = the largest rank among their adapters for the module.
    """

    a_start: torch.Tensor  # [T1 * R] int64: first element of A row j of row t's adapter
    b_start: torch.Tensor  # [T1 * R] int64: the same for Bt
    weight: torch.Tensor  # [T1, R] fp32: scaling of row t's adapter where j < its rank, else 0


@dataclass
class _Group:
    """Adapters of one layout, staged at positions of ``region``, computed as ``count`` consecutive
    positions from ``first`` with ``width`` rows each: product row ``k * width + i`` is row ``i`` of
    the adapter at position ``first + k``, and reads batch row ``gather[k * width + i]``.

    Product rows that are no member's rows (padding past an adapter's own row count, and positions
    of other adapters in the run) read a row of the group and weigh 0 in ``scaling``. Results go
    back by the cheapest of: a slice (``gather`` is None: product row ``j`` is batch row
    ``row_start + j``); a permutation (the group's rows are batch rows ``row_start .. row_start +
    len(scatter) - 1``, each taking product row ``scatter[i]``); or ``index_add_`` at ``gather``
    (a padding row adds its result, zero, to the row it read; were that row's input not finite,
    the row's own result would not be either).

    Sparse groups (``positions`` set: their run would hold too many other adapters) copy their
    members' weights out of the region for each module and compute those, in position order.
    """

    region: Region
    first: int
    count: int
    members: int  # adapters in the group (count - members: positions of others in the run)
    width: int
    scaling: torch.Tensor  # [count, width, 1] fp32: a member's scaling on its rows, 0 elsewhere
    gather: torch.Tensor | None  # [count * width] int64 batch row of each product row (None: slice)
    scatter: torch.Tensor | None  # [rows of the group] int64 product row of each of its batch rows
    row_start: int | None  # the group's first batch row when its rows are one run of the batch
    positions: torch.Tensor | None  # [count] int64 the members' positions when sparse


class CpuLoraBackend:
    """:class:`~inference.backends.base.LoraBackend` of the CPU path. Keeps the staged copies of
    grouped adapters from step to step (one :class:`StagedAdapters` per pool)."""

    def __init__(self) -> None:
        self.staging: StagedAdapters | None = None

    @property
    def scratch_bytes(self) -> int:
        return 0 if self.staging is None else self.staging.nbytes

    def staging_for(self, pool: PagePool) -> StagedAdapters:
        if self.staging is None or self.staging.pool is not pool:
            self.staging = StagedAdapters(pool)
        return self.staging

    def chunk_key(self, adapter: DeviceAdapter | None, rows: int) -> tuple:
        position = None if adapter is None or self.staging is None else self.staging.position(adapter)
        return chunk_order(adapter, rows, position)

    def prepare(self, mapping: LoraMapping) -> "LoraBatch":
        return LoraBatch(mapping, self.staging_for(mapping.pool))


class LoraBatch:
    """One step's gathered LoRA computation (a :class:`~inference.backends.base.StepLora`)."""

    def __init__(self, mapping: LoraMapping, staging: StagedAdapters):
        """``staging`` keeps the grouped adapters from step to step (the backend passes its own)."""
        self.pool = mapping.pool
        device = self.pool.tensor.device
        self.scaling_list = mapping.scaling
        self.modules = {
            name: _ModuleMeta(ranks=m.ranks, a_offset=m.a_offset, b_offset=m.b_offset, max_rank=m.max_rank)
            for name, m in mapping.modules.items()
        }
        self.targeted = mapping.targeted
        shapes = {name: (m.in_features, m.out_features) for name, m in mapping.modules.items()}
        self._init_gathered(mapping.slots, mapping.chunk_slots, mapping.chunk_lengths, shapes, device, staging)

    # ------------------------------------------------------------------ gathered path
    def _init_gathered(self, slots, chunk_slots, chunk_lengths, shapes, device, staging: StagedAdapters) -> None:
        routes = route_rows([slot.layout for slot in slots], chunk_slots, chunk_lengths)
        self.segments, rest, grouped, per_row_slots = routes.segments, routes.rest, routes.grouped, routes.per_row
        row = routes.rows

        # groups read their adapters from the staging regions; the step buffer holds the rest
        grouped_slots = [slot for members in grouped for slot in members]
        placed = dict(zip(grouped_slots, staging.place([slots[slot] for slot in grouped_slots])))
        self.groups: list[_Group] = []
        for members in grouped:
            self._add_group(members, rest, placed, device)
        # (an adapter in a group may also have a run long enough to be a segment)
        buffered = {seg.slot for seg in self.segments} | set(per_row_slots)
        page_elems = self.pool.geometry.page_elems
        bases = [0] * len(slots)
        pages: list[int] = []
        for slot in range(len(slots)):
            if slot in buffered:
                bases[slot] = len(pages) * page_elems
                pages.extend(slots[slot].pages)
        self.step_pages = torch.tensor(pages, dtype=torch.int64, device=device)
        self._buffer_layer: int | None = None
        self._buffer: torch.Tensor | None = None

        for meta in self.modules.values():
            ranks, a_offset, b_offset = meta.ranks, meta.a_offset, meta.b_offset
            meta.segments = [
                (slice(seg.start, seg.start + seg.length), bases[seg.slot] + a_offset[seg.slot],
                 bases[seg.slot] + b_offset[seg.slot], ranks[seg.slot], self.scaling_list[seg.slot])
                for seg in self.segments
                if ranks[seg.slot] > 0
            ]
        single_rows = [t for slot in per_row_slots for start, length, _ in rest[slot] for t in range(start, start + length)]
        single_slots = [slot for slot in per_row_slots for _, length, _ in rest[slot] for _ in range(length)]
        self.all_rows_single = len(single_rows) == row and single_rows == list(range(row))
        self.single_rows = torch.tensor(single_rows, dtype=torch.int64, device=device)
        if single_rows:
            self._index_per_row(single_slots, bases, shapes, device)

    def _add_group(self, members: list[int], rest: dict[int, list[list[int]]], placed: dict[int, tuple[Region, int]],
                   device) -> None:
        """Make ``members`` (staged adapters of one layout, with equal row counts or at most
        ``PAD_MAX_ROWS`` rows each) a group."""
        members = sorted(members, key=lambda slot: placed[slot][1])  # position order
        region = placed[members[0]][0]
        positions = [placed[slot][1] for slot in members]
        first, count = positions[0], positions[-1] - positions[0] + 1
        sparse = count - len(members) > max(MAX_GROUP_HOLES, len(members) // 8)
        rel = list(range(len(members))) if sparse else [p - first for p in positions]
        if sparse:
            first, count = 0, len(members)
        member_rows = [[t for start, length, _ in rest[slot] for t in range(start, start + length)] for slot in members]
        width = max(len(r) for r in member_rows)
        filler = member_rows[0][0]  # the row holes read
        gather = [filler] * (count * width)
        scaling = torch.zeros((count, width, 1), dtype=torch.float32)
        for k, slot, own in zip(rel, members, member_rows):
            gather[k * width : (k + 1) * width] = own + [own[0]] * (width - len(own))
            scaling[k, : len(own)] = self.scaling_list[slot]
        identity = gather == list(range(gather[0], gather[0] + len(gather)))
        batch_rows = sorted(t for own in member_rows for t in own)
        span = batch_rows == list(range(batch_rows[0], batch_rows[0] + len(batch_rows)))
        scatter = None
        if span and not identity:  # product row of each batch row
            product_row = {t: k * width + i for k, own in zip(rel, member_rows) for i, t in enumerate(own)}
            scatter = torch.tensor([product_row[t] for t in batch_rows], dtype=torch.int64, device=device)
        self.groups.append(_Group(
            region=region,
            first=first,
            count=count,
            members=len(members),
            width=width,
            scaling=scaling.to(device),
            gather=None if identity else torch.tensor(gather, dtype=torch.int64, device=device),
            scatter=scatter,
            row_start=batch_rows[0] if span else None,
            positions=torch.tensor(positions, dtype=torch.int64, device=device) if sparse else None,
        ))

    def _index_per_row(self, single_slots: list[int], bases: list[int], shapes, device) -> None:
        """Per-row path: every row's A/Bt row starts in the step buffer, per module."""
        slot_t = torch.tensor(single_slots, dtype=torch.int64)
        base = torch.tensor(bases, dtype=torch.int64)
        scale_t = torch.tensor(self.scaling_list, dtype=torch.float32)[slot_t][:, None]
        for name, meta in self.modules.items():
            ranks = torch.tensor(meta.ranks, dtype=torch.int64)
            rank_r = int(ranks[slot_t].max())
            if rank_r == 0:
                continue
            in_f, out_f = shapes[name]
            j = torch.arange(rank_r, dtype=torch.int64)[None, :]  # [1, R]
            live = j < ranks[slot_t][:, None]  # [T1, R]
            # rows past a rank (or of an adapter without this module) point at element 0, which
            # starts a full row because some slot has one here, and weigh 0
            a_start = torch.where(live, (base + torch.tensor(meta.a_offset))[slot_t][:, None] + j * in_f, 0)
            b_start = torch.where(live, (base + torch.tensor(meta.b_offset))[slot_t][:, None] + j * out_f, 0)
            meta.rows = _RowIndex(
                a_start=a_start.reshape(-1).to(device),
                b_start=b_start.reshape(-1).to(device),
                weight=torch.where(live, scale_t, 0.0).to(device),
            )

    def _layer_buffer(self, layer: int) -> torch.Tensor:
        """[sum of the buffered slots' pages * page_elems]: the virtual buffer of ``layer`` of every
        slot with a segment or per-row rows, back to back. Gathered once per layer and reused by its
        modules."""
        if self._buffer_layer != layer:
            self._buffer = self.pool.layer(layer).index_select(0, self.step_pages).view(-1)
            self._buffer_layer = layer
        return self._buffer

    # ------------------------------------------------------------------ StepLora
    def apply(self, layer: int, x: torch.Tensor, outs: dict[str, torch.Tensor]) -> None:
        """``out[t] += scaling[s] * (x[t] @ A_s.T) @ Bt_s`` for each ``module: out`` of ``outs`` and
        the rows with an adapter targeting ``module``; the modules share the input ``x``.

        x: [N, in_features]; each out: [N, out_features], updated in place (may be a column slice).
        """
        live = {module: out for module, out in outs.items() if module in self.targeted}
        if not live:
            return
        for group in self.groups:
            self._apply_group(layer, group, x, live)
        for module, out in live.items():
            meta = self.modules[module]
            if meta.rows is not None:
                self._apply_single_rows(self._layer_buffer(layer), meta.rows, x, out)
            if meta.segments:
                self._apply_segments(self._layer_buffer(layer), meta, x, out)

    def _apply_single_rows(self, buffer: torch.Tensor, index: _RowIndex, x: torch.Tensor, out: torch.Tensor) -> None:
        """Per-row path: ``delta[t] = sum_j w[t, j] * (A_t[j] . x[t]) * Bt_t[j]`` (fp32)."""
        in_f, out_f = x.shape[1], out.shape[1]
        rows, max_rank = index.weight.shape
        xs = x if self.all_rows_single else x.index_select(0, self.single_rows)
        a = buffer.unfold(0, in_f, 1).index_select(0, index.a_start).view(rows, max_rank, in_f)
        y = (a.float() * xs.float()[:, None, :]).sum(-1) * index.weight  # [T1, R]
        b_t = buffer.unfold(0, out_f, 1).index_select(0, index.b_start).view(rows, max_rank, out_f)
        delta = torch.bmm(y[:, None, :], b_t.float()).squeeze(1).to(out.dtype)  # [T1, out]
        if self.all_rows_single:
            out += delta
        else:
            out.index_add_(0, self.single_rows, delta)

    def _apply_group(self, layer: int, group: _Group, x: torch.Tensor, outs: dict[str, torch.Tensor]) -> None:
        """A group: A and Bt of the staged run of positions are contiguous views of the region; two
        ``bmm`` over [count, ., m] and [count, m, .] (fp32), the rows gathered in and added back.
        The modules whose A the region keeps side by side (``SHARED_INPUT``) share one shrink."""
        region = group.region
        modules = tuple(module for module in outs if module in region.offsets)
        if not modules:
            return
        count, width = group.count, group.width
        rows, in_f = count * width, x.shape[1]
        if group.gather is None:
            xs = x[group.row_start : group.row_start + rows]
        else:
            xs = x.index_select(0, group.gather)
        xs = xs.float().view(count, width, in_f).transpose(1, 2)  # [count, in, m]
        for run, where in region.input_runs(modules):
            if group.positions is None:
                a = region.run_weights(layer, where, group.first, count)
            else:  # sparse: copy the members out
                a = region.run_weights(layer, where, 0, region.positions).index_select(0, group.positions)
            # A @ x^T ([count, R, m]): measured faster on CPU than x @ A^T over the same views
            y = torch.bmm(a.float(), xs).transpose(1, 2)  # [count, m, R], R: the run's ranks summed
            y.mul_(group.scaling)
            col = 0
            for module in run:
                rank = region.offsets[module][2]
                if group.positions is None:
                    b_t = region.bt_weights(layer, module, group.first, count)
                else:
                    b_t = region.bt_weights(layer, module, 0, region.positions).index_select(0, group.positions)
                out = outs[module]
                delta = torch.bmm(y[:, :, col : col + rank], b_t.float()).view(rows, out.shape[1]).to(out.dtype)
                col += rank
                if group.gather is None:
                    out[group.row_start : group.row_start + rows].add_(delta)  # in place: no write-back copy
                elif group.scatter is not None:  # much cheaper than index_add_ into a column slice of out
                    out[group.row_start : group.row_start + len(group.scatter)].add_(delta.index_select(0, group.scatter))
                else:
                    out.index_add_(0, group.gather, delta)

    def _apply_segments(self, buffer: torch.Tensor, meta: _ModuleMeta, x: torch.Tensor, out: torch.Tensor) -> None:
        """Segments: A and Bt are views of the buffer; two matmuls per segment (fp32)."""
        in_f, out_f = x.shape[1], out.shape[1]
        for rows, a_start, b_start, rank, scaling in meta.segments:
            a = buffer[a_start : a_start + rank * in_f].view(rank, in_f)
            b_t = buffer[b_start : b_start + rank * out_f].view(rank, out_f)
            y = x[rows].float() @ a.float().T  # [L, r]
            if out.dtype == torch.float32 and b_t.dtype == torch.float32:
                out[rows].addmm_(y, b_t, alpha=scaling)
            else:
                out[rows] += ((y @ b_t.float()) * scaling).to(out.dtype)
