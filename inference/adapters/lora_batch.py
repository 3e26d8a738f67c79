"""Per-step LoRA metadata and the ``LoraApplier`` the model calls for each projection.

A step's batch may mix rows of many adapters of different ranks and target sets, and rows with no
adapter. Each distinct resident adapter gets a slot ``s``; per target module the tensors
``ranks[s]`` (0 when the adapter does not target that module), ``a_offset[s]`` and ``b_offset[s]``
locate its A and Bt in the adapter's pages, and ``scaling[s]`` is its ``alpha / r`` (or rsLoRA's
``alpha / sqrt(r)``).

Two paths:

* **Triton** (CUDA): decode-only steps use the one-row-per-request kernels, steps with a prefill
  chunk the segment kernels (a decode row is a segment of one), both reading A and Bt straight from
  the pool pages through the page table.
* **Gathered** (CPU, or whenever Triton is off): once per layer, the pages of the step's distinct
  adapters are copied into one contiguous buffer with a single page-granular ``index_select`` (the
  distinct adapter bytes of that layer, the floor any implementation must read). In that buffer
  every adapter's virtual buffer is contiguous, so

  - a run of at least ``SEGMENT_MIN_ROWS`` adjacent rows of one adapter (a prefill chunk, or the
    decode rows of a popular adapter: the engine orders a step's chunks by adapter) is a
    *segment*: its A and Bt are plain views and it costs two matmuls;
  - all other rows (decode rows of rarer adapters) are done together, with no per-adapter Python
    loop: while ``distinct adapters * R`` is at most ``PER_SLOT_MAX_COLUMNS``, one matmul against
    the A of all of them (each row keeps its own R columns), then one against their Bt; above it,
    each row's A rows and Bt rows are picked out of a sliding-window view of the buffer
    (``unfold``: one memcpy per row of A/Bt), the shrink is a multiply-and-sum over
    ``[T, R, in]`` (faster on CPU than a batched matrix-vector product) and the expand a batched
    ``[1, R] @ [R, out]`` product. The row's scaling sits in a rank mask either way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from inference.adapters.manager import DeviceAdapter
from inference.page_pool import PagePool
from kernels.lora import lora_expand, lora_shrink, triton_available

# A run of at least this many adjacent rows of one adapter is computed as a segment (two skinny
# matmuls, about 60 us each on a 2-core CPU); shorter runs join the per-row path, which costs about
# 2.5 us more per row. Set by timing engine steps on benchmarks/adapter_scaling.py's workload, where
# a threshold of 8 made decode steps with 10 adapters about 50% slower.
SEGMENT_MIN_ROWS = 32
# The other rows are multiplied with the A of all their distinct adapters at once (two matmuls of
# width distinct * R) while that width is at most this; above it, each row's own A/Bt rows are
# gathered (cost independent of the number of adapters).
PER_SLOT_MAX_COLUMNS = 256


@dataclass
class _ModuleMeta:
    ranks: torch.Tensor  # [S] int32
    a_offset: torch.Tensor  # [S] int64
    b_offset: torch.Tensor  # [S] int64
    max_rank: int
    rows: "_RowIndex | None" = None
    # the segments whose adapter targets the module: (rows, A start, Bt start, rank, scaling),
    # starts in elements of the gathered buffer
    segments: list[tuple[slice, int, int, int, float]] = field(default_factory=list)


@dataclass
class _RowIndex:
    """Where the per-row path's rows find their A and Bt rows in the step's gathered buffer.

    T1 = rows with an adapter outside segments, R = the module's largest rank in the step.
    """

    a_start: torch.Tensor  # [O * R] int64: first element of A row j of owner o
    b_start: torch.Tensor  # [O * R] int64: the same for Bt
    weight: torch.Tensor  # [T1, R] fp32: scaling of row t's adapter where j < its rank, else 0
    # owners are the S1 distinct adapters of the rows when ``columns`` is set (then
    # ``columns[t, j] = local slot of row t * R + j``), else the T1 rows themselves
    columns: torch.Tensor | None = None


@dataclass
class _Segment:
    """``length`` adjacent rows of the flattened batch, from ``start``, that use ``slot``."""

    start: int
    length: int
    slot: int


class LoraBatch:
    """Implements ``inference.model.LoraApplier`` for one step."""

    def __init__(
        self,
        pool: PagePool,
        slots: list[DeviceAdapter],
        chunk_slots: list[int],
        chunk_lengths: list[int],
        use_triton: bool | None = None,
    ):
        """``chunk_slots[i]`` is the slot of the i-th chunk of the flattened batch (-1: none) and
        ``chunk_lengths[i]`` its number of rows."""
        device = pool.tensor.device
        self.pool = pool
        if use_triton is None:
            use_triton = device.type == "cuda" and triton_available()
        self.use_triton = use_triton
        self.scaling_list = [float(s.ref.scaling) for s in slots]
        self.scaling = torch.tensor(self.scaling_list, dtype=torch.float32, device=device)
        shapes = {name: shape for s in slots for name, shape in s.shapes.items()}
        self.modules: dict[str, _ModuleMeta] = {}
        for name in {name for s in slots for name in s.offsets}:
            entries = [s.offsets.get(name, (0, 0, 0)) for s in slots]
            self.modules[name] = _ModuleMeta(
                ranks=torch.tensor([e[2] for e in entries], dtype=torch.int32, device=device),
                a_offset=torch.tensor([e[0] for e in entries], dtype=torch.int64, device=device),
                b_offset=torch.tensor([e[1] for e in entries], dtype=torch.int64, device=device),
                max_rank=max(e[2] for e in entries),
            )
        if use_triton:
            self._init_triton(slots, chunk_slots, chunk_lengths, device)
        else:
            self._init_gathered(slots, chunk_slots, chunk_lengths, shapes, device)

    # ------------------------------------------------------------------ Triton path
    def _init_triton(self, slots, chunk_slots, chunk_lengths, device) -> None:
        table = torch.zeros((len(slots), max(len(s.pages) for s in slots)), dtype=torch.int32)
        for i, slot in enumerate(slots):
            table[i, : len(slot.pages)] = torch.tensor(slot.pages, dtype=torch.int32)
        self.adapter_pages = table.to(device)
        if all(n == 1 for n in chunk_lengths):
            self.row_slot = torch.tensor(chunk_slots, dtype=torch.int32, device=device)
            self.seg_start = self.seg_slot = self.max_seg_len = None
        else:
            starts = [0]
            for n in chunk_lengths:
                starts.append(starts[-1] + n)
            self.row_slot = None
            self.seg_start = torch.tensor(starts, dtype=torch.int32, device=device)
            self.seg_slot = torch.tensor(chunk_slots, dtype=torch.int32, device=device)
            self.max_seg_len = max(chunk_lengths)

    # ------------------------------------------------------------------ gathered path
    def _init_gathered(self, slots, chunk_slots, chunk_lengths, shapes, device) -> None:
        page_elems = self.pool.geometry.page_elems
        bases, pages = [], []
        for slot in slots:
            bases.append(len(pages) * page_elems)
            pages.extend(slot.pages)
        self.step_pages = torch.tensor(pages, dtype=torch.int64, device=device)
        self.slot_base = bases
        self._buffer_layer: int | None = None
        self._buffer: torch.Tensor | None = None
        # adjacent chunks of one adapter form one run of rows (the engine orders chunks by adapter)
        runs: list[list[int]] = []  # [first row, rows, slot]
        row = 0
        for slot, length in zip(chunk_slots, chunk_lengths):
            if slot >= 0:
                if runs and runs[-1][2] == slot and runs[-1][0] + runs[-1][1] == row:
                    runs[-1][1] += length
                else:
                    runs.append([row, length, slot])
            row += length
        self.segments: list[_Segment] = []
        single_rows: list[int] = []
        single_slots: list[int] = []
        for start, length, slot in runs:
            if length >= SEGMENT_MIN_ROWS:
                self.segments.append(_Segment(start, length, slot))
            else:
                single_rows.extend(range(start, start + length))
                single_slots.extend([slot] * length)
        for meta in self.modules.values():
            ranks, a_offset, b_offset = meta.ranks.tolist(), meta.a_offset.tolist(), meta.b_offset.tolist()
            meta.segments = [
                (slice(seg.start, seg.start + seg.length), bases[seg.slot] + a_offset[seg.slot],
                 bases[seg.slot] + b_offset[seg.slot], ranks[seg.slot], self.scaling_list[seg.slot])
                for seg in self.segments
                if ranks[seg.slot] > 0
            ]
        self.all_rows_single = len(single_rows) == row
        self.single_rows = torch.tensor(single_rows, dtype=torch.int64, device=device)
        if not single_rows:
            return
        slot_t = torch.tensor(single_slots, dtype=torch.int64)
        distinct, local = torch.unique(slot_t, return_inverse=True)  # [S1], [T1]
        base = torch.tensor(bases, dtype=torch.int64)
        scale_t = torch.tensor(self.scaling_list, dtype=torch.float32)[slot_t][:, None]
        for name, meta in self.modules.items():
            if meta.max_rank == 0:
                continue
            in_f, out_f = shapes[name]
            rank_r = meta.max_rank
            j = torch.arange(rank_r, dtype=torch.int64)[None, :]  # [1, R]
            ranks = meta.ranks.cpu().to(torch.int64)
            live = j < ranks[slot_t][:, None]  # [T1, R]
            weight = torch.where(live, scale_t, 0.0)
            # the A/Bt rows are those of each distinct adapter when their count is small (one
            # matmul against all of them), else those of each row; rows past a rank (or of an
            # adapter without this module) point at element 0, which starts a full row because
            # some slot has one here, and weigh 0
            per_slot = len(distinct) * rank_r <= PER_SLOT_MAX_COLUMNS
            owners = distinct if per_slot else slot_t
            owner_live = j < ranks[owners][:, None]
            a_start = torch.where(owner_live, (base + meta.a_offset.cpu())[owners][:, None] + j * in_f, 0)
            b_start = torch.where(owner_live, (base + meta.b_offset.cpu())[owners][:, None] + j * out_f, 0)
            meta.rows = _RowIndex(
                a_start=a_start.reshape(-1).to(device),
                b_start=b_start.reshape(-1).to(device),
                weight=weight.to(device),
                columns=(local[:, None] * rank_r + j).to(device) if per_slot else None,
            )

    def _layer_buffer(self, layer: int) -> torch.Tensor:
        """[sum of the slots' pages * page_elems]: every slot's virtual buffer of ``layer``, back to
        back (slot s at ``slot_base[s]``). Gathered once per layer and reused by its modules."""
        if self._buffer_layer != layer:
            self._buffer = self.pool.layer(layer).index_select(0, self.step_pages).view(-1)
            self._buffer_layer = layer
        return self._buffer

    # ------------------------------------------------------------------ LoraApplier
    def apply(self, layer: int, module: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """``out[t] += scaling[s] * (x[t] @ A_s.T) @ Bt_s`` for rows with an adapter targeting ``module``.

        x: [N, in_features]; out: [N, out_features], updated in place (may be a column slice).
        """
        meta = self.modules.get(module)
        if meta is None or meta.max_rank == 0:
            return
        if self.use_triton:
            pool_layer = self.pool.layer(layer)
            rows = dict(row_slot=self.row_slot, seg_start=self.seg_start, seg_slot=self.seg_slot,
                        use_triton=True, max_seg_len=self.max_seg_len)
            y = lora_shrink(x, pool_layer, self.adapter_pages, meta.a_offset, meta.ranks, meta.max_rank, **rows)
            lora_expand(out, y, pool_layer, self.adapter_pages, meta.b_offset, meta.ranks, self.scaling, **rows)
            return
        buffer = self._layer_buffer(layer)
        if meta.rows is not None:
            self._apply_single_rows(buffer, meta.rows, meta.max_rank, x, out)
        if meta.segments:
            self._apply_segments(buffer, meta, x, out)

    def _apply_single_rows(self, buffer: torch.Tensor, index: _RowIndex, max_rank: int,
                           x: torch.Tensor, out: torch.Tensor) -> None:
        """Rows outside segments: ``delta[t] = sum_j w[t, j] * (A_t[j] . x[t]) * Bt_t[j]`` (fp32)."""
        in_f, out_f = x.shape[1], out.shape[1]
        rows = len(index.weight)
        xs = x if self.all_rows_single else x.index_select(0, self.single_rows)
        a = buffer.unfold(0, in_f, 1).index_select(0, index.a_start)  # [O * R, in]
        b_t = buffer.unfold(0, out_f, 1).index_select(0, index.b_start)  # [O * R, out]
        if index.columns is not None:
            # few distinct adapters: every row against all of them, then keep its own columns
            y_all = xs.float() @ a.float().T  # [T1, S1 * R]
            y = y_all.gather(1, index.columns) * index.weight  # [T1, R]
            spread = torch.zeros_like(y_all).scatter_(1, index.columns, y)
            delta = (spread @ b_t.float()).to(out.dtype)  # [T1, out]
        else:
            a = a.view(rows, max_rank, in_f)
            y = (a.float() * xs.float()[:, None, :]).sum(-1) * index.weight  # [T1, R]
            b_t = b_t.view(rows, max_rank, out_f)
            delta = torch.bmm(y[:, None, :], b_t.float()).squeeze(1).to(out.dtype)  # [T1, out]
        if self.all_rows_single:
            out += delta
        else:
            out.index_add_(0, self.single_rows, delta)

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
