"""Decode step time of the engine's model against the memory-bandwidth floor.

One decode step reads every weight once plus the live KV cache, so
``step time >= (weight bytes + KV bytes read) / bandwidth``. This script builds a Llama-shaped model
with random weights directly on the device (no checkpoint on disk), fills the page pool with
``--context`` tokens of KV for each of B sequences, times ``LlamaModel.forward`` for one decode token
per sequence at each batch size, and measures the device's bandwidth with a large device-to-device
copy in the same run.

    python -m benchmarks.decode_step --device cuda --preset llama-7b --batches 1,16,64
    python -m benchmarks.decode_step --preset tiny              # CPU smoke run
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from pathlib import Path

import torch

from inference.engine_config import EngineConfig
from inference.model import ForwardBatch, LlamaModel
from inference.model_config import ModelConfig
from inference.page_pool import PageGeometry, PagePool
from inference.weights import expected_shapes

PRESETS = {
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000),
}
RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--context", type=int, default=512, help="tokens of KV per sequence")
    p.add_argument("--page-tokens", type=int, default=16)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_bandwidth(device: torch.device, nbytes: int = 1 << 30, iters: int = 5) -> float:
    """Bytes/s of a device-to-device copy (read + write counted)."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    _sync(device)
    return 2 * src.numel() * src.element_size() * iters / (time.perf_counter() - start)


def build(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> LlamaModel:
    gen = torch.Generator(device=device).manual_seed(0)
    weights = {}
    for key, shape in expected_shapes(config).items():
        t = torch.empty(shape, dtype=dtype, device=device)
        if len(shape) == 1:
            t.fill_(1.0)
        else:
            t.normal_(0.0, 0.02, generator=gen)
        weights[key] = t
    return LlamaModel(config, weights, device, dtype)


def decode_batch(batch: int, context: int, page_tokens: int, device: torch.device) -> ForwardBatch:
    """B sequences with ``context - 1`` cached tokens each, decoding token ``context - 1``."""
    pages_per_seq = -(-context // page_tokens)
    table = torch.arange(batch * pages_per_seq, dtype=torch.int32).view(batch, pages_per_seq)
    pos = context - 1
    slots = table[:, pos // page_tokens].long() * page_tokens + pos % page_tokens
    return ForwardBatch(
        input_ids=torch.randint(0, 1000, (batch,), device=device),
        positions=torch.full((batch,), pos, dtype=torch.long, device=device),
        slot_mapping=slots.to(device),
        page_table=table.to(device),
        seq_lens=torch.full((batch,), context, dtype=torch.int32, device=device),
        query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device=device),
        logits_indices=torch.arange(batch, dtype=torch.long, device=device),
        max_q_len=1,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = EngineConfig(device=args.device, dtype=args.dtype).torch_dtype
    config = ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                    "max_position_embeddings": max(4096, args.context), **PRESETS[args.preset]})
    batches = [int(b) for b in args.batches.split(",")]
    model = build(config, device, dtype)
    weight_bytes = sum(t.numel() * t.element_size() for t in weight_tensors(model))
    geometry = PageGeometry.for_model(config, args.page_tokens, dtype)
    pool = PagePool(geometry, max(batches) * -(-args.context // args.page_tokens), device, dtype)
    pool.tensor.normal_(0.0, 1.0)
    bandwidth = measure_bandwidth(device, nbytes=min(1 << 30, 4 * pool.tensor.numel() * pool.tensor.element_size()))
    kv_bytes_per_token = 2 * config.kv_size * config.num_layers * geometry.element_bytes
    rows = []
    for batch in batches:
        fb = decode_batch(batch, args.context, args.page_tokens, device)
        model.forward(fb, pool)
        _sync(device)
        start = time.perf_counter()
        for _ in range(args.iters):
            model.forward(fb, pool)
        _sync(device)
        step = (time.perf_counter() - start) / args.iters
        floor = (weight_bytes + batch * args.context * kv_bytes_per_token) / bandwidth
        rows.append({"batch": batch, "step_ms": step * 1e3, "floor_ms": floor * 1e3, "floor_fraction": floor / step})
    print(f"{args.preset} on {args.device} ({dtype}), context {args.context}: weights {weight_bytes / 1e9:.2f} GB, "
          f"copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(f"{'batch':>6} {'step ms':>9} {'floor ms':>9} {'floor/step':>10}")
    for r in rows:
        print(f"{r['batch']:>6} {r['step_ms']:>9.2f} {r['floor_ms']:>9.2f} {r['floor_fraction']:>10.2f}")
    report = {"benchmark": "decode_step", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "device": args.device, "torch_version": torch.__version__,
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "weight_bytes": weight_bytes, "bandwidth_bytes_per_s": bandwidth, "results": rows}
    out = args.out or RESULTS / f"decode_step-{args.preset}-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def weight_tensors(model: LlamaModel) -> list[torch.Tensor]:
    """Every weight tensor the forward pass reads (tied embeddings counted once)."""
    tensors = [model.embed, model.final_norm]
    if model.lm_head is not model.embed:
        tensors.append(model.lm_head)
    for layer in model.layers:
        tensors.extend(layer.values())
    return tensors


if __name__ == "__main__":
    raise SystemExit(main())
