"""How the CPU backend's LoRA computes each row of a step: as part of a group, a segment, or per row
(see :mod:`inference.backends.cpu.lora` for the three routes), and the order of a step's chunks
that makes groups cheapest (:func:`chunk_order`). Pure bookkeeping over row counts and layouts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from inference.adapters.manager import DeviceAdapter

# A run of at least this many adjacent rows of one adapter is always a segment (two skinny matmuls,
# about 30-60 us each on a 2-core CPU).
SEGMENT_MIN_ROWS = 32
# Adapters of one layout that qualify for a group (below) are computed as one (two bmm calls over
# views of the staged weights) when there are at least this many of them; a lone adapter is a
# segment instead.
GROUP_MIN_SLOTS = 2
# The short runs (under SEGMENT_MIN_ROWS rows) of one layout's adapters are one group, each adapter
# padded to the largest row count, when that makes at most PAD_MAX_WASTE times their rows (padding
# rows cost little next to the calls of another group or segment). Otherwise adapters with at most
# PAD_MAX_ROWS such rows are one padded group, and the others are grouped by their exact row count.
PAD_MAX_WASTE = 4
PAD_MAX_ROWS = 4
# A group's run of staged positions is read in place when it holds at most this many (or an
# eighth of the members) positions of other adapters; otherwise the members are copied out.
MAX_GROUP_HOLES = 2
# Adapters in no group become segments while there are at most this many of them; more, and their
# rows take the per-row path, whose cost does not grow with the number of adapters.
MAX_SOLO_SEGMENTS = 4
# chunk_order's position for an adapter not staged (after every staged one)
UNSTAGED = 1 << 62



@dataclass
class Segment:
    """``length`` adjacent rows of the flattened batch, from ``start``, that use ``slot``."""

    start: int
    length: int
    slot: int



@dataclass
class Routes:
    """A step's rows by route. ``rest[slot]``: the slot's runs shorter than ``SEGMENT_MIN_ROWS``
    (``[first row, rows, slot]``), which its group, segments or per-row rows compute."""

    segments: list[Segment]
    rest: dict[int, list[list[int]]]
    grouped: list[list[int]]  # slots of each group (one layout each)
    per_row: list[int]  # slots whose rows take the per-row path
    rows: int  # rows of the step


def _runs(chunk_slots: list[int], chunk_lengths: list[int]) -> tuple[list[list[int]], int]:
    """Adjacent chunks of one adapter as one run ``[first row, rows, slot]``; and the step's rows."""
    runs: list[list[int]] = []
    row = 0
    for slot, length in zip(chunk_slots, chunk_lengths):
        if slot >= 0:
            if runs and runs[-1][2] == slot and runs[-1][0] + runs[-1][1] == row:
                runs[-1][1] += length
            else:
                runs.append([row, length, slot])
        row += length
    return runs, row


def route_rows(layouts: list[tuple], chunk_slots: list[int], chunk_lengths: list[int]) -> Routes:
    """Route a step's rows (``layouts[s]``: slot ``s``'s layout; chunks as in ``LoraMapping``)."""
    runs, rows = _runs(chunk_slots, chunk_lengths)
    segments = [Segment(*r) for r in runs if r[1] >= SEGMENT_MIN_ROWS]
    rest: dict[int, list[list[int]]] = {}
    for r in runs:
        if r[1] < SEGMENT_MIN_ROWS:
            rest.setdefault(r[2], []).append(r)
    by_layout: dict[tuple, dict[int, int]] = {}  # layout -> {slot: its rows in the step}
    for slot, slot_runs in rest.items():
        by_layout.setdefault(layouts[slot], {})[slot] = sum(r[1] for r in slot_runs)
    by_class: dict[tuple, list[int]] = {}  # (layout, rows in the step, or 0 when padded) -> slots
    for key, row_counts in by_layout.items():
        if len(row_counts) * max(row_counts.values()) <= PAD_MAX_WASTE * sum(row_counts.values()):
            by_class[(key, 0)] = list(row_counts)  # one group, padded to the largest count
            continue
        for slot, rows_in_step in row_counts.items():
            by_class.setdefault((key, rows_in_step if rows_in_step > PAD_MAX_ROWS else 0), []).append(slot)
    grouped = [members for members in by_class.values() if len(members) >= GROUP_MIN_SLOTS]
    solo = [slot for members in by_class.values() if len(members) < GROUP_MIN_SLOTS for slot in members]
    per_row: list[int] = []
    if len(solo) <= MAX_SOLO_SEGMENTS:
        segments.extend(Segment(*r) for slot in solo for r in rest[slot])
    else:
        per_row = solo
    return Routes(segments, rest, grouped, per_row, rows)


def chunk_order(adapter: DeviceAdapter | None, rows: int, position: int | None = None) -> tuple:
    """Sort key for a step's chunks (``rows``: all rows of the chunk's adapter in the step;
    ``position``: where the adapter is staged, if it is).

    Rows without an adapter come first, then adapters by row count, layout, staged position (the
    unstaged last) and uid: each adapter's rows are adjacent (a run, a segment when long), each
    group's rows are one run of the batch, and in decode, where a group's adapters keep their
    positions from step to step, its rows are in staged order, so the group reads its input as a
    slice of ``x`` and adds its results back as one.
    """
    if adapter is None:
        return (0,)
    return (1, rows, adapter.layout, UNSTAGED if position is None else position, adapter.ref.uid)
