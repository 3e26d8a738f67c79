"""Random-weight Llama checkpoints, a word-level tokenizer, engine runs and HF greedy decoding.

No download and no bundled file: the GPU machine gets only the repository. The tokenizer is
``t0 .. t{V-1}`` (one word per id; t1 = BOS, t2 = EOS), enough for the engine to load a
checkpoint directory; prompts are token ids and EOS is ignored.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from inference.engine import LLMEngine
from inference.engine_config import EngineConfig
from inference.sampling import SamplingParams


def write_tokenizer(out_dir: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(out_dir / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "t0", "bos_token": "t1",
              "eos_token": "t2", "model_max_length": 1 << 20}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config))


def write_llama(out_dir: Path, arch: dict, seed: int, std: float = 0.06, max_positions: int = 2048) -> Path:
    """A Llama with N(0, std) matrices (peaked logits: random greedy decoding rarely ties), saved as
    fp32 safetensors with the tokenizer. ``arch``: HF config fields (hidden_size, ...)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**arch, max_position_embeddings=max_positions, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, std)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    write_tokenizer(out_dir, arch["vocab_size"])
    return out_dir


def random_prompts(n: int, vocab: int, gen: torch.Generator, lo: int = 4, hi: int = 40) -> list[list[int]]:
    """Prompts of ordinary ids (3..vocab-1: no unk, BOS or EOS), lengths uniform in [lo, hi]."""
    lens = torch.randint(lo, hi + 1, (n,), generator=gen).tolist()
    return [torch.randint(3, vocab, (k,), generator=gen).tolist() for k in lens]


def make_engine(checkpoint: Path, device: torch.device, dtype: str, pool_bytes: int, **options) -> LLMEngine:
    """An engine with a small fixed pool (the default takes most free GPU memory); kernels compile
    on first use rather than all at start-up where the config offers that (nothing here is timed).
    ``options``: further EngineConfig fields."""
    extra = {"warm_up_kernels": False} if "warm_up_kernels" in {f.name for f in dataclasses.fields(EngineConfig)} else {}
    extra.update(options)
    return LLMEngine(model=str(checkpoint),
                     config=EngineConfig(device=str(device), dtype=dtype, pool_bytes=pool_bytes, **extra))


def engine_greedy(engine: LLMEngine, jobs: list[tuple[list[int], str | None]], new_tokens: int,
                  top_logprobs: int = 0) -> list[dict]:
    """All jobs (prompt ids, adapter id) submitted at once (one mixed batch); per job the generated
    ids, their logprobs and the top ``top_logprobs`` alternatives of each step as {id: logprob}."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True, logprobs=top_logprobs)
    requests = [engine.make_request(ids, params, adapter_id=adapter) for ids, adapter in jobs]
    for request in requests:
        engine.add(request)
    final = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    results = []
    for request in requests:
        out = final[request.request_id]
        if out.error:
            raise RuntimeError(f"request {request.request_id} failed: {out.error}")
        steps = out.logprobs or []
        results.append({"tokens": list(out.token_ids), "logprobs": [lp.logprob for lp in steps],
                        "top": [dict(lp.top) for lp in steps]})
    return results


def close_engine(engine: LLMEngine) -> None:
    try:
        engine.adapters.close()
    except Exception:
        pass


@torch.no_grad()
def hf_greedy(model, prompt: list[int], new_tokens: int, device: torch.device) -> dict:
    """HF's own KV-cached forward, argmax each step (EOS not special); per step the chosen token,
    its log-probability and the gap between the two largest logits."""
    out = model(torch.tensor([prompt], device=device), use_cache=True)
    tokens, logprobs, gaps = [], [], []
    for _ in range(new_tokens):
        logits = out.logits[0, -1].float()
        top = logits.topk(2)
        token = int(top.indices[0])
        tokens.append(token)
        logprobs.append(float(torch.log_softmax(logits, -1)[token]))
        gaps.append(float(top.values[0] - top.values[1]))
        out = model(torch.tensor([[token]], device=device), past_key_values=out.past_key_values, use_cache=True)
    return {"tokens": tokens, "logprobs": logprobs, "gaps": gaps}


@torch.no_grad()
def hf_forced_logprobs(model, prompt: list[int], tokens: list[int], device: torch.device) -> list[float]:
    """Log-probabilities of ``tokens`` following ``prompt`` (teacher forcing, one forward pass)."""
    logits = model(torch.tensor([prompt + tokens], device=device)).logits[0].float()
    rows = torch.log_softmax(logits[len(prompt) - 1:len(prompt) - 1 + len(tokens)], -1)
    return [float(rows[j, t]) for j, t in enumerate(tokens)]


def load_hf(checkpoint: Path, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=dtype)
    return model.to(device).eval()


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
