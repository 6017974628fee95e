"""The host-memory registry: budget, LRU eviction, reservations for captures in progress (no ComfyUI needed)."""
import logging

import pytest
import torch

from fisedit_engine.cache import FisEditCache, SamplingSettings, StepTensors
from fisedit_engine.registry import CacheBudgetError, CacheEvictedError, CacheRegistry, parse_budget

MiB = 2**20


def fake_cache(name: str, mib: int) -> FisEditCache:
    store = StepTensors(steps=1, batch=1)
    store.tensors[("out", 0)] = torch.zeros(1, 1, mib * MiB // 4)
    settings = SamplingSettings(
        sampler="euler", sampler_extra_options={}, sampler_inpaint_options={}, seed=0, sigmas=(1.0, 0.0), cfg=7.0,
        latent_shape=(1, 4, 8, 8), dtype="float32", chunks=(0,), sparse_levels=(0,), min_sparse_positions=256,
        model_fingerprint="m", negative_fingerprint="n", positive_fingerprint="p", noise_fingerprint="z",
        latent_image_fingerprint="l")
    empty = torch.zeros(0)
    return FisEditCache(name, settings, store, empty, empty, empty)


def test_lru_eviction_is_logged_and_keeps_recently_used(caplog):
    reg = CacheRegistry(budget_bytes=10 * MiB)
    for name in "abc":
        reg.put(fake_cache(name, 3))
    reg.get("a")  # a is now the most recently used; b is the oldest
    with caplog.at_level(logging.INFO, logger="FISEdit"):
        reg.put(fake_cache("d", 3))
    assert reg.names() == ["c", "a", "d"]
    assert "evicted cache 'b'" in caplog.text
    with pytest.raises(CacheEvictedError, match="re-run the generation with FISEditCacheCapture"):
        reg.get("b")
    assert reg.used <= reg.budget


def test_a_cache_larger_than_the_budget_is_refused_and_nothing_is_lost():
    reg = CacheRegistry(budget_bytes=10 * MiB)
    reg.put(fake_cache("keep", 4))
    with pytest.raises(CacheBudgetError, match="FISEDIT_CACHE_BUDGET"):
        reg.put(fake_cache("huge", 11))
    assert reg.names() == ["keep"]


def test_a_failed_put_keeps_the_reservation_and_the_old_cache():
    reg = CacheRegistry(budget_bytes=10 * MiB)
    reg.put(fake_cache("x", 2))
    reg.reserve(3 * MiB, what="a capture")
    with pytest.raises(CacheBudgetError):
        reg.put(fake_cache("x", 12), reserved=3 * MiB)
    assert reg.names() == ["x"] and reg.used == 5 * MiB


def test_replacing_a_cache_by_name_frees_the_old_one():
    reg = CacheRegistry(budget_bytes=10 * MiB)
    reg.put(fake_cache("x", 6))
    reg.put(fake_cache("x", 7))
    assert reg.names() == ["x"] and reg.used == 7 * MiB


def test_reservations_count_against_the_budget_and_evict():
    reg = CacheRegistry(budget_bytes=10 * MiB)
    reg.put(fake_cache("old", 6))
    reg.reserve(5 * MiB, what="a capture")
    assert reg.names() == []  # evicted to make room for the recording
    with pytest.raises(CacheBudgetError, match="a capture needs"):
        reg.reserve(6 * MiB, what="a capture")
    reg.put(fake_cache("new", 5), reserved=5 * MiB)  # the recording becomes the sealed cache
    assert reg.used == 5 * MiB
    reg.release(1 * MiB)
    assert reg.used == 5 * MiB


@pytest.mark.parametrize("text, expected", [("1024", 1024), ("2G", 2 * 2**30), ("512MiB", 512 * MiB),
                                            ("1.5k", 1536), ("25%", 250)])
def test_parse_budget(text, expected):
    assert parse_budget(text, available=1000) == expected



def test_default_budget_is_half_the_available_ram_and_settable(monkeypatch):
    import psutil
    from fisedit_engine.registry import DEFAULT_BUDGET_FRACTION, default_budget
    assert DEFAULT_BUDGET_FRACTION == 0.5  # the README states this share
    monkeypatch.delenv("FISEDIT_CACHE_BUDGET", raising=False)
    available = psutil.virtual_memory().available
    assert abs(default_budget() - available / 2) <= 0.05 * available  # other processes move `available` a little
    monkeypatch.setenv("FISEDIT_CACHE_BUDGET", "25%")
    assert abs(default_budget() - available / 4) <= 0.05 * available
    monkeypatch.setenv("FISEDIT_CACHE_BUDGET", "64M")
    assert default_budget() == 64 * MiB
    assert CacheRegistry().budget == 64 * MiB


def test_threads_putting_getting_and_reserving_keep_the_registry_within_budget():
    """ComfyUI can reach the registry from several threads (multi-GPU model calls, a server thread listing caches);
    every operation must see a consistent registry and the budget must hold throughout."""
    import threading
    reg = CacheRegistry(budget_bytes=8 * MiB)
    errors, over = [], []

    def worker(k):
        try:
            for i in range(200):
                reg.put(fake_cache(f"{k}-{i % 5}", 1))
                reg.reserve(MiB, what="a capture")
                if reg.used > reg.budget:
                    over.append(reg.used)
                reg.release(MiB)
                names = reg.names()
                for name in names[:2]:
                    try:
                        reg.get(name)
                    except CacheEvictedError:  # evicted by another thread in between: allowed
                        pass
        except Exception as e:  # noqa: BLE001 (any error is the failure being looked for)
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and over == []
    assert reg.used == sum(1 * MiB for _ in reg.names()) <= reg.budget


def planned_store(reg, mib: int) -> StepTensors:
    """A store whose recorded keys are planned into one block (as an edit's result is), handed out by `reg`."""
    store = StepTensors(steps=4, batch=1)
    store.plan_rows([("h", 0, (1, mib * MiB // 8), torch.float16)], blocks=reg)
    return store


def test_a_dropped_stores_block_is_reused_by_the_next_store_of_its_size():
    import gc
    reg = CacheRegistry(budget_bytes=100 * MiB)
    store = planned_store(reg, 8)
    address = store.rows.block.data_ptr()
    written = store.slot("h", 0, (MiB,), torch.float16)
    assert written.untyped_storage().data_ptr() == address  # a column of the block
    written[2].fill_(3.0)
    del written
    del store
    gc.collect()
    assert reg.used == 8 * MiB  # the spare counts against the budget
    other = planned_store(reg, 4)  # another size: a new block, and the spare stays
    assert other.rows.block.data_ptr() != address and reg.used == 8 * MiB
    again = planned_store(reg, 8)
    assert again.rows.block.data_ptr() == address and reg.used == 0  # taken: the store's slots reserve it anew
    assert not again.rows.written.any()  # its old rows are not this store's: nothing counts as written


def test_a_block_that_is_still_viewed_elsewhere_is_not_reused():
    import gc
    reg = CacheRegistry(budget_bytes=100 * MiB)
    store = planned_store(reg, 8)
    address = store.rows.block.data_ptr()
    view = store.slot("h", 0, (MiB,), torch.float16)  # e.g. a copy still landing into it
    assert view.untyped_storage().data_ptr() == address
    del store
    gc.collect()
    assert planned_store(reg, 8).rows.block.data_ptr() != address and reg.used == 0
    assert view.shape == (4, 1, MiB)  # still there


def test_the_spare_goes_first_when_the_budget_needs_room():
    import gc
    reg = CacheRegistry(budget_bytes=20 * MiB)
    reg.put(fake_cache("keep", 6))
    store = planned_store(reg, 8)
    del store
    gc.collect()
    assert reg.used == 14 * MiB
    reg.put(fake_cache("new", 10))  # room for it: the spare is let go, no cache is evicted
    assert reg.names() == ["keep", "new"] and reg.used == 16 * MiB
