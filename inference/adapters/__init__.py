"""Per-tenant LoRA adapters: loading and validating PEFT checkpoints, the host and device tiers,
and the batched multi-adapter computation."""
