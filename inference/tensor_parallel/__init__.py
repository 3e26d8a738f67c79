"""Tensor parallelism (Megatron-LM partition of the base model, S-LoRA partition of the adapters).

* :mod:`.partition`: which slice of every matrix a rank holds (base weights and LoRA factors).
* :mod:`.comm`: the collectives of one group, each call's bytes counted.
* :mod:`.worker`: the loop of ranks 1..N-1 (separate processes).
* :mod:`.group`: the driver's side: starts the workers, sends each step, supervises them.
* :mod:`.driver`: rank 0 in the engine: its shard of the model and pool, and the group's lifecycle.

See docs/design.md, "Tensor parallelism".
"""
