"""``make gpu-check``: prove the CUDA path on one GPU in a few minutes (issue 17).

    python -m benchmarks.gpu_check [--quick] [--out DIR] [--sections a,b] [--seed N]

Sections (each independent: one that fails or raises is recorded and the run goes on; the exit
status is 1 if any section did not pass, 2 when CUDA is not available):

* ``kernels``: ``lora_shrink`` / ``lora_expand`` (Triton; decode ``row_slot`` and prefill
  ``seg_start``/``seg_slot`` launches), ``write_kv`` and ``paged_attention_triton`` (mixed prefill +
  decode batch, GQA) in fp16, bf16 and fp32 on fresh random inputs against float64 references,
  with eps- and reduction-length-derived tolerances.
* ``bandwidth``: bytes the LoRA decode shrink/expand and the attention decode kernel must read over
  their time, against a device-to-device copy.
* ``hf_parity``: greedy tokens of the engine vs HF transformers on CUDA, small random Llama (GQA,
  vocab 32000): fp32 token-identical, bf16 agreement.
* ``peft_parity``: one batch mixing random PEFT adapters (ranks and target modules differ) and
  rows without one, against PEFT applied per request (fp32 greedy tokens and logprobs).
* ``decode_floor``: decode step time of a Llama-7B-shaped model (random bf16 weights made on the
  GPU) at batch 1/16/64/256 and context 512 against weight bytes / copy bandwidth and / 4.8 TB/s.
* ``adapter_throughput``: ``benchmarks.adapter_scaling`` with 1, 100 and 1000 rank-8 adapters.

Writes ``gpu_check.json`` and ``gpu_check.md`` to ``--out`` (default ``benchmarks/results/``).
``--cpu-smoke`` exists for the test suite only (toy sizes on the CPU, kernels interpreted).
"""
