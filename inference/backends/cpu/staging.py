"""Staged copies of grouped adapters for the gathered (CPU) LoRA path, kept from step to step.

The gathered path computes a group of adapters of one layout with two batched matmuls per module,
which need the adapters' weights side by side. Their pool pages are scattered, so before
this module every step copied the distinct adapters' pages of every layer into a step buffer: in
decode, where every running request has its own adapter, that is every adapter byte copied in every
step, and then read again by the matmuls (``docs/design.md``, "Adapters").

Running requests keep their adapter for many steps, and a step's set of adapters differs from the
last one's by the few requests that joined or finished. So the grouped adapters are copied once
into a *region* for their layout, where each has a *position*, and they stay there while they keep
running. A region is module-major (:class:`Region`): in each layer, one module's A of all positions
is one contiguous ``[positions, r, in]`` block, and its Bt one ``[positions, r, out]`` block. A
step's group is then a run of positions, and its weights of a module are two contiguous slices,
with no copy; positions in the run that belong to adapters not in the group ("holes") weigh 0.
Modules that share their input (q, k, v; gate, up: ``SHARED_INPUT``) keep their A side by side per
position, so a run's A of all of them is one view and the group computes their shrink in one ``bmm``
(:class:`Block`).
(Module-major, with the shrink computed as ``A @ x^T``, the two ``bmm`` calls of a 63-adapter
group ran about 1.2x faster on a 2-core CPU than over strided views of whole per-position buffers
with ``x @ A^T``; each change alone gained 2-3%.)

A new adapter takes the lowest position that no adapter of the current step holds (overwriting a
staged adapter that is not running any more). Then the step's adapters are compacted: those at the
highest positions move into the free positions below until the step's adapters of a layout hold
positions ``0 .. n-1``. A finished request thus costs one adapter copy, and when all of a layout's
adapters form one group (decode, one request per adapter), the group's run has no holes. Staged
weights are keyed by the adapter's uid, which names one immutable set of weights. A region no step
has used for ``idle_steps`` steps is freed.

Memory: a region has as many positions as the most adapters of its layout that one step used, so
with ``max_num_seqs`` requests there are at most ``max_num_seqs`` copies of the largest adapter per
layout in use (outside the pool's budget; this path runs where device memory is host RAM).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from inference.adapters.manager import DeviceAdapter
from inference.adapters.peft_checkpoint import SHARED_INPUT
from inference.page_pool import PagePool


def unwritten(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """Memory for a region's new positions, not filled: :meth:`StagedAdapters.place` creates or
    grows a region to exactly as many positions as the step's adapters of its layout, and writes
    every one of them in that step, so no group's run ever reads a position before it is written.
    (Zero-filling it cost 0.1-0.5 s of page faults and writes per 230 MB region on a 2-core CPU, paid
    each time a layout's traffic came back after its region was freed.) Tests fill it with NaN to
    check that nothing reads it."""
    return torch.empty(shape, dtype=like.dtype, device=like.device)


@dataclass(frozen=True)
class Block:
    """Pieces of an adapter's per-layer buffer that a region stores side by side for each position:
    position ``p``'s copy of the block is ``size`` elements from ``positions * start + p * size`` of
    a layer's row of the region's weights, the pieces back to back in it."""

    start: int  # in elements per position: the sizes of the blocks before this one
    size: int  # elements per position
    pieces: tuple[tuple[int, int], ...]  # (offset in an adapter's buffer, elements) in stored order


@dataclass(frozen=True)
class _Slice:
    """A module's A or Bt (or the A of a run of modules) within a block."""

    start: int  # the block's start
    size: int  # the block's size
    within: int  # elements before the slice in the block's copy of a position
    rows: int  # rank (summed over a run of modules)
    cols: int  # in or out features


def _blocks(offsets: dict[str, tuple[int, int, int]]) -> list[list[str]]:
    """The region layout of a set of targeted modules, as lists of piece names ("A:module",
    "Bt:module"): the A of each ``SHARED_INPUT`` family's targeted modules in one block, in family
    order; every other A and every Bt a block of its own."""
    blocks: list[list[str]] = []
    shared = set()
    for family in SHARED_INPUT:
        members = [m for m in family if m in offsets]
        if len(members) > 1:
            blocks.append([f"A:{m}" for m in members])
            shared.update(members)
    for module in offsets:
        if module not in shared:
            blocks.append([f"A:{module}"])
        blocks.append([f"Bt:{module}"])
    return blocks


@dataclass
class Region:
    """Staged adapters of one layout, module-major: in layer ``l``, the A (and likewise the Bt) of
    one module of all ``positions`` adapters is one contiguous block ``[positions, r, in]``
    (``[positions, r, out]``), so a module's weights of a run of positions are one contiguous
    slice. Modules that share their input (``SHARED_INPUT``) share a block of A: per position, the
    A of q, k and v (of those targeted) are back to back, so a run of positions' A of all three is
    one ``[count, r_q + r_k + r_v, in]`` view (see :class:`Block`)."""

    layer_elems: int
    offsets: dict[str, tuple[int, int, int]]  # module -> (A offset, Bt offset, rank)
    shapes: dict[str, tuple[int, int]]  # module -> (in features, out features)
    weights: torch.Tensor  # [layers, positions * layer_elems]
    uids: list[str | None]  # the adapter staged at each position (None: none)
    last_step: int = 0
    where: dict[str, int] = field(default_factory=dict)  # uid -> position
    blocks: list[Block] = field(init=False)
    _slices: dict[str, _Slice] = field(init=False)  # "A:module" / "Bt:module" -> where it is
    _runs: dict[tuple[str, ...], list[tuple[tuple[str, ...], _Slice]]] = field(init=False)

    def __post_init__(self) -> None:
        piece = {}
        for module, (a_off, b_off, rank) in self.offsets.items():
            in_f, out_f = self.shapes[module]
            piece[f"A:{module}"] = (a_off, rank * in_f, rank, in_f)
            piece[f"Bt:{module}"] = (b_off, rank * out_f, rank, out_f)
        self.blocks, self._slices, self._runs = [], {}, {}
        start = 0
        for names in _blocks(self.offsets):
            size = sum(piece[name][1] for name in names)
            within = 0
            for name in names:
                _, n, rows, cols = piece[name]
                self._slices[name] = _Slice(start, size, within, rows, cols)
                within += n
            self.blocks.append(Block(start, size, tuple(piece[name][:2] for name in names)))
            start += size
        if start > self.layer_elems:
            raise ValueError(f"pieces of {start} elements do not fit a layer buffer of {self.layer_elems}")

    @property
    def positions(self) -> int:
        return len(self.uids)

    def block_start(self, block: Block, position: int, positions: int | None = None) -> int:
        """Where in a layer's row of ``weights`` the copy of ``block`` of ``position`` starts, in
        a layout of ``positions`` (default: this region's) positions."""
        return (self.positions if positions is None else positions) * block.start + position * block.size

    def _view(self, layer: int, where: _Slice, first: int, count: int) -> torch.Tensor:
        weights = self.weights
        start = (weights.storage_offset() + layer * weights.stride(0)  # (as_strided: one op, not four)
                 + self.positions * where.start + first * where.size + where.within)
        return weights.as_strided((count, where.rows, where.cols), (where.size, where.cols, 1), start)

    def module_weights(self, layer: int, module: str, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views ``A [count, r, in]`` and ``Bt [count, r, out]`` of ``module`` of the adapters at
        positions ``first .. first + count - 1`` in ``layer``."""
        return self.a_weights(layer, module, first, count), self.bt_weights(layer, module, first, count)

    def a_weights(self, layer: int, module: str, first: int, count: int) -> torch.Tensor:
        """View ``A [count, r, in]`` of ``module`` (see :meth:`module_weights`)."""
        return self._view(layer, self._slices[f"A:{module}"], first, count)

    def bt_weights(self, layer: int, module: str, first: int, count: int) -> torch.Tensor:
        """View ``Bt [count, r, out]`` of ``module`` (see :meth:`module_weights`)."""
        return self._view(layer, self._slices[f"Bt:{module}"], first, count)

    def input_runs(self, modules: tuple[str, ...]) -> list[tuple[tuple[str, ...], _Slice]]:
        """``modules`` (targeted by this layout) split into runs whose A are back to back in one
        block, in the given order: each run's A of a run of positions is one view (:meth:`run_weights`)."""
        runs = self._runs.get(modules)
        if runs is None:
            runs = []
            for module in modules:
                where = self._slices[f"A:{module}"]
                if runs:
                    names, last = runs[-1]
                    if (last.start, last.within + last.rows * last.cols, last.cols) == (where.start, where.within, where.cols):
                        runs[-1] = (names + (module,), _Slice(last.start, last.size, last.within,
                                                             last.rows + where.rows, last.cols))
                        continue
                runs.append(((module,), where))
            self._runs[modules] = runs
        return runs

    def run_weights(self, layer: int, run: _Slice, first: int, count: int) -> torch.Tensor:
        """View ``A [count, sum of the run's ranks, in]`` of a run from :meth:`input_runs`."""
        return self._view(layer, run, first, count)

    def write(self, position: int, packed: torch.Tensor) -> None:
        """Stage ``packed`` (``[layers, >= layer_elems]``, an adapter's virtual buffers) at ``position``."""
        for block in self.blocks:
            start = self.block_start(block, position)
            for offset, n in block.pieces:
                self.weights[:, start : start + n] = packed[:, offset : offset + n]
                start += n

    def move(self, source: int, target: int) -> None:
        """Copy the adapter at ``source`` to ``target`` (both positions of this region)."""
        for block in self.blocks:
            src, dst = self.block_start(block, source), self.block_start(block, target)
            self.weights[:, dst : dst + block.size] = self.weights[:, src : src + block.size]

    def resized(self, positions: int) -> torch.Tensor:
        """The weights laid out for ``positions >= self.positions`` positions (new ones unwritten:
        :func:`unwritten`)."""
        weights = unwritten((self.weights.shape[0], positions * self.layer_elems), self.weights)
        for block in self.blocks:
            old, new = self.block_start(block, 0), self.block_start(block, 0, positions)
            weights[:, new : new + self.positions * block.size] = self.weights[:, old : old + self.positions * block.size]
        return weights

    def occupy(self, position: int, uid: str) -> None:
        """Record ``uid`` at ``position`` (whatever was staged there is forgotten)."""
        old = self.uids[position]
        if old is not None:
            del self.where[old]
        self.uids[position] = uid
        self.where[uid] = position


class StagedAdapters:
    """Regions of staged adapters, one per layout (see the module docstring). Engine thread only."""

    def __init__(self, pool: PagePool, idle_steps: int = 64):
        if idle_steps < 1:
            raise ValueError("idle_steps must be >= 1")
        self.pool = pool
        self.idle_steps = idle_steps
        self.regions: dict[tuple, Region] = {}
        self.step = 0
        self.copies = 0  # adapters copied in from their pages since start (for tests and profiling)
        self.moves = 0  # adapters moved within a region since start
        # bytes held by all regions, kept as a plain int so that a metrics scrape on another thread
        # can read it while the engine thread changes the regions
        self.nbytes = 0

    def place(self, adapters: list[DeviceAdapter]) -> list[tuple[Region, int]]:
        """Stage ``adapters`` (distinct, each resident in the pool) for one step: ``(region,
        position)`` of each, in order. Adapters already staged keep their position; the others are
        copied from their pages into free positions. Call once per step, with all its grouped
        adapters, before any of them is used."""
        self.step += 1
        keys = [a.layout for a in adapters]
        per_layout = Counter(keys)
        in_use: dict[tuple, set[int]] = {}
        for adapter, key in zip(adapters, keys):
            region = self.regions.get(key)
            if region is None:
                region = self.regions[key] = self._new_region(adapter, per_layout[key])
            region.last_step = self.step
            position = region.where.get(adapter.ref.uid)
            if position is not None:
                in_use.setdefault(key, set()).add(position)
        for adapter, key in zip(adapters, keys):
            region = self.regions[key]
            if adapter.ref.uid not in region.where:
                taken = in_use.setdefault(key, set())
                position = next((p for p in range(region.positions) if p not in taken), None)
                if position is None:  # every position holds one of this step's adapters
                    position = region.positions
                    self._grow(region, per_layout[key])
                self._copy_in(region, position, adapter)
                taken.add(position)
        for key, taken in in_use.items():
            self._compact(self.regions[key], taken)
        for key in [k for k, r in self.regions.items() if self.step - r.last_step >= self.idle_steps]:
            self.nbytes -= self.regions.pop(key).weights.nbytes
        return [(self.regions[key], self.regions[key].where[a.ref.uid]) for a, key in zip(adapters, keys)]

    def position(self, adapter: DeviceAdapter) -> int | None:
        """The position ``adapter`` is staged at in its layout's region (None: not staged)."""
        region = self.regions.get(adapter.layout)
        return None if region is None else region.where.get(adapter.ref.uid)

    def _compact(self, region: Region, taken: set[int]) -> None:
        """Move the step's adapters at the highest positions into the free ones below, until they
        hold positions ``0 .. len(taken) - 1`` (one copy per move; a run of them has no holes)."""
        free = sorted(p for p in range(len(taken)) if p not in taken)
        high = sorted((p for p in taken if p >= len(taken)), reverse=True)
        for source, target in zip(high, free):
            uid = region.uids[source]
            region.move(source, target)
            region.uids[source] = None
            region.occupy(target, uid)
            taken.discard(source)
            taken.add(target)
            self.moves += 1

    def _new_region(self, adapter: DeviceAdapter, positions: int) -> Region:
        layer_elems = adapter.ref.layer_elems
        weights = unwritten((self.pool.tensor.shape[0], positions * layer_elems), self.pool.tensor)
        self.nbytes += weights.nbytes
        return Region(layer_elems, dict(adapter.offsets), dict(adapter.shapes), weights, [None] * positions)

    def _grow(self, region: Region, positions: int) -> None:
        weights = region.resized(positions)
        self.nbytes += weights.nbytes - region.weights.nbytes
        region.weights = weights
        region.uids.extend([None] * (positions - region.positions))

    def _copy_in(self, region: Region, position: int, adapter: DeviceAdapter) -> None:
        pages = torch.tensor(adapter.pages, dtype=torch.long, device=self.pool.tensor.device)
        layers = self.pool.tensor.shape[0]
        region.write(position, self.pool.tensor.index_select(1, pages).view(layers, -1))
        region.occupy(position, adapter.ref.uid)
        self.copies += 1
