"""One step's LoRA mapping: which resident adapters the step uses and which rows use which.

Built once per step by the model runner from the requests' adapter references (each acquired once,
when its request was added) and handed to the LoRA backend, which turns it into what its kernels
read. A step's batch may mix rows of many adapters of different ranks and target sets, and rows
with no adapter. Each distinct adapter gets a slot ``s``; per target module ``ranks[s]`` (0 when the
adapter does not target that module), ``a_offset[s]`` and ``b_offset[s]`` locate its A and Bt in
the adapter's virtual buffer (its pages of the unified pool, see ``kernels/lora.py``), and
``scaling[s]`` is its ``alpha / r`` (or rsLoRA's ``alpha / sqrt(r)``).
"""

from __future__ import annotations

from dataclasses import dataclass

from inference.adapters.manager import DeviceAdapter
from inference.page_pool import PagePool


@dataclass(frozen=True)
class ModuleSlots:
    """One target module across the step's slots (element offsets into each virtual buffer)."""

    ranks: list[int]  # [S] rank of the module per slot, 0 where the adapter lacks it
    a_offset: list[int]  # [S] offset of A [r, in_features]
    b_offset: list[int]  # [S] offset of Bt [r, out_features]
    in_features: int
    out_features: int

    @property
    def max_rank(self) -> int:
        return max(self.ranks)


@dataclass(frozen=True)
class LoraMapping:
    """``chunk_slots[i]``: the slot of the i-th chunk of the flattened batch (-1: no adapter);
    ``chunk_lengths[i]``: its rows. Slot ``s`` is ``slots[s]``, resident in ``pool``."""

    pool: PagePool
    slots: list[DeviceAdapter]
    chunk_slots: list[int]
    chunk_lengths: list[int]
    scaling: list[float]
    modules: dict[str, ModuleSlots]

    @classmethod
    def build(cls, pool: PagePool, slots: list[DeviceAdapter], chunk_slots: list[int],
              chunk_lengths: list[int]) -> "LoraMapping":
        if len(chunk_slots) != len(chunk_lengths):
            raise ValueError("chunk_slots and chunk_lengths must have the same length")
        if any(not -1 <= s < len(slots) for s in chunk_slots):
            raise ValueError(f"chunk slots must be in [-1, {len(slots)})")
        shapes = {name: shape for s in slots for name, shape in s.shapes.items()}
        modules = {}
        for name in sorted({name for s in slots for name in s.offsets}):
            entries = [s.offsets.get(name, (0, 0, 0)) for s in slots]
            modules[name] = ModuleSlots(
                ranks=[e[2] for e in entries], a_offset=[e[0] for e in entries], b_offset=[e[1] for e in entries],
                in_features=shapes[name][0], out_features=shapes[name][1],
            )
        return cls(pool, list(slots), list(chunk_slots), list(chunk_lengths),
                   [float(s.ref.scaling) for s in slots], modules)

    @property
    def targeted(self) -> set[str]:
        """Modules some slot of the step adapts."""
        return {name for name, m in self.modules.items() if m.max_rank > 0}
