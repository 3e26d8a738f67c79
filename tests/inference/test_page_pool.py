"""The page allocator: geometry arithmetic, kinds, exhaustion and double frees."""

import random

import pytest
import torch

from inference.model_config import ModelConfig
from inference.page_pool import OutOfPagesError, PageGeometry, PageKind, PagePool

SMOLLM2 = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                      num_kv_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5,
                      tie_word_embeddings=True)


def test_smollm2_geometry():
    g = PageGeometry.for_model(SMOLLM2, page_tokens=16, dtype=torch.float32)
    assert g.kv_size == 192  # 3 KV heads x 64, not the hidden size
    assert g.page_elems == 16 * 2 * 192
    assert g.page_bytes == 16 * 2 * 192 * 30 * 4
    assert g.pages_for_tokens(16) == 1 and g.pages_for_tokens(17) == 2
    # a rank-8 adapter on all seven projections packs into 14 pages: less than one page of waste
    per_layer = sum(8 * (i + o) for i, o in SMOLLM2.linear_shapes().values())
    assert g.pages_for_elems(per_layer) == 14
    assert 14 * g.page_elems - per_layer < g.page_elems


def test_allocate_free_and_occupancy_by_kind():
    g = PageGeometry(num_layers=2, page_tokens=4, num_kv_heads=1, head_dim=8, element_bytes=4)
    pool = PagePool(g, 10, "cpu", torch.float32)
    assert pool.tensor.shape == (2, 10, 64)
    assert pool.kv_layer(1).shape == (10, 2, 4, 1, 8)
    kv = pool.allocate(3, PageKind.KV)
    ad = pool.allocate(5, PageKind.ADAPTER)
    occ = pool.occupancy()
    assert (occ.total, occ.free, occ.kv, occ.adapter) == (10, 2, 3, 5)
    assert len(set(kv) | set(ad)) == 8
    with pytest.raises(OutOfPagesError):
        pool.allocate(3, PageKind.KV)
    assert pool.occupancy().free == 2  # a failed allocation takes nothing
    pool.free(kv)
    with pytest.raises(RuntimeError, match="freed twice"):
        pool.free(kv[:1])
    pool.free(ad)
    assert pool.occupancy().free == 10


def test_random_churn_never_leaks():
    g = PageGeometry(num_layers=1, page_tokens=2, num_kv_heads=1, head_dim=2, element_bytes=4)
    pool = PagePool(g, 50, "cpu", torch.float32)
    rng = random.Random(0)
    held: list[list[int]] = []
    for _ in range(2000):
        if held and rng.random() < 0.5:
            pool.free(held.pop(rng.randrange(len(held))))
        else:
            n = rng.randint(0, 6)
            if pool.can_allocate(n):
                held.append(pool.allocate(n, rng.choice(list(PageKind))))
        occ = pool.occupancy()
        assert occ.free + occ.kv + occ.adapter == occ.total
        assert occ.total - occ.free == sum(map(len, held))
    for pages in held:
        pool.free(pages)
    assert pool.occupancy().free == 50


def test_pool_too_small_is_a_clear_error():
    g = PageGeometry.for_model(SMOLLM2, page_tokens=16, dtype=torch.float32)
    with pytest.raises(ValueError, match="at least 1 page"):
        PagePool.with_bytes(g, g.page_bytes - 1, "cpu", torch.float32)
