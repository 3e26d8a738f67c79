"""Per-tenant LoRA adapters: validating PEFT checkpoints once, and the life cycle of each version
across the object store, host RAM and the pool's pages (the batched multi-adapter computation is
the backends' job: ``inference/backends``)."""
