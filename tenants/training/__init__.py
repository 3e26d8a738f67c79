"""Training a user's LoRA adapter from their own examples (issue 19): the data rules
(``examples``) and the PEFT trainer (``lora_trainer``). No database, HTTP or task queue here: the
job that runs a training calls these. See docs/personalization.md, "Training"."""
