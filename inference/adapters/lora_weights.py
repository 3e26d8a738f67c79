"""An adapter's weights: per-module factor stacks, and the packed per-layer form the device pages
hold.

``a`` is PEFT's ``lora_A.weight`` ([r, in]) stacked to [num_layers, r, in]; ``b_t`` is PEFT's
``lora_B.weight`` ([out, r]) transposed and stacked to [num_layers, r, out]. The adapter's
contribution to a projection is ``y += scaling * (x @ a[l].T) @ b_t[l]``.

Packed form (the host tier keeps adapters so, see ``docs/design.md``): one ``[num_layers,
padded_elems]`` tensor in which each layer's row is the adapter's *virtual buffer*: for each
targeted module in :data:`MODULE_ORDER`, A ([r, in], row-major) then Bᵀ ([r, out]); the row is
zero-padded to whole pages so that a page-in is one copy into the pool.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from inference.adapters.peft_format import MODULE_ORDER


@dataclass(frozen=True, eq=False)
class LoraModuleWeights:
    """One projection's LoRA factors, stacked over all decoder layers.

    ``a``: [num_layers, r, in_features], float32, CPU, contiguous (PEFT ``lora_A.weight``).
    ``b_t``: [num_layers, r, out_features], float32, CPU, contiguous (PEFT ``lora_B.weight``
    [out, r] transposed). Other dtypes/devices/strides are allowed for copies.
    """

    a: torch.Tensor
    b_t: torch.Tensor

    def __post_init__(self) -> None:
        if self.a.dim() != 3 or self.b_t.dim() != 3 or self.a.shape[:2] != self.b_t.shape[:2]:
            raise ValueError(
                "LoRA factors must be a [L, r, in] and b_t [L, r, out], "
                f"got {tuple(self.a.shape)} and {tuple(self.b_t.shape)}"
            )

    @property
    def num_layers(self) -> int:
        return self.a.shape[0]

    @property
    def rank(self) -> int:
        return self.a.shape[1]

    @property
    def in_features(self) -> int:
        return self.a.shape[2]

    @property
    def out_features(self) -> int:
        return self.b_t.shape[2]


@dataclass(frozen=True, eq=False)
class LoraAdapterWeights:
    """A validated adapter.

    ``scaling`` multiplies the low-rank update: ``lora_alpha / rank``, or ``lora_alpha / sqrt(rank)``
    with rsLoRA. ``modules`` holds only the targeted projections, in :data:`MODULE_ORDER`.
    ``sha256`` is the hex digest of the ``adapter_model.safetensors`` bytes (the adapter's identity);
    ``config`` is the parsed ``adapter_config.json``.
    """

    rank: int
    lora_alpha: float
    use_rslora: bool
    scaling: float
    modules: dict[str, LoraModuleWeights]
    sha256: str
    config: dict

    @property
    def target_modules(self) -> tuple[str, ...]:
        """Names of the adapted projections, in :data:`MODULE_ORDER`."""
        return tuple(m for m in MODULE_ORDER if m in self.modules)

    @property
    def num_layers(self) -> int:
        return next(iter(self.modules.values())).num_layers if self.modules else 0

    def layer_elems(self) -> int:
        """Elements of one layer's factors: sum over modules of ``r * (in + out)``."""
        return sum(m.rank * (m.in_features + m.out_features) for m in self.modules.values())

    def nbytes(self, element_bytes: int) -> int:
        """Bytes of all layers' factors stored at ``element_bytes`` per element."""
        return self.layer_elems() * self.num_layers * element_bytes


def layer_offsets(
    module_ranks: dict[str, int], shapes: dict[str, tuple[int, int]]
) -> dict[str, tuple[int, int, int]]:
    """``module -> (a_offset, b_offset, rank)`` in elements of a layer's virtual buffer, for the
    modules of ``module_ranks`` (``shapes[module] = (in, out)``), in :data:`MODULE_ORDER`."""
    offsets: dict[str, tuple[int, int, int]] = {}
    cursor = 0
    for name in MODULE_ORDER:
        if name not in module_ranks:
            continue
        rank = module_ranks[name]
        in_f, out_f = shapes[name]
        offsets[name] = (cursor, cursor + rank * in_f, rank)
        cursor += rank * (in_f + out_f)
    return offsets


def pack_layers(
    modules: dict[str, LoraModuleWeights], padded_elems: int, dtype: torch.dtype, pin: bool
) -> torch.Tensor:
    """The packed ``[num_layers, padded_elems]`` form of ``modules`` in ``dtype`` (see the module
    docstring), allocated in pinned (page-locked) host memory when ``pin``, so that copying it to
    the device is one asynchronous DMA. Written once, module by module over all layers."""
    first = next(iter(modules.values()))
    shapes = {name: (m.in_features, m.out_features) for name, m in modules.items()}
    offsets = layer_offsets({name: m.rank for name, m in modules.items()}, shapes)
    end = max(b + rank * shapes[name][1] for name, (_, b, rank) in offsets.items())
    if end > padded_elems:
        raise ValueError(f"{end} elements per layer do not fit in {padded_elems}")
    packed = torch.empty((first.num_layers, padded_elems), dtype=dtype, pin_memory=pin)
    for name, (a_off, b_off, rank) in offsets.items():
        in_f, out_f = shapes[name]
        packed[:, a_off:b_off].view(-1, rank, in_f).copy_(modules[name].a)
        packed[:, b_off:b_off + rank * out_f].view(-1, rank, out_f).copy_(modules[name].b_t)
    packed[:, end:].zero_()
    return packed
