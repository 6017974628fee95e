"""Host memory: the registry's budget holds for real captures and edits, evicted caches are really freed, an edit of
an evicted cache says to re-run the capture, and host RSS stays flat over a long chain of edits."""
import gc
import logging
import weakref

import pytest
import torch

import reliability
import tiny_models
from tiny_models import sample

SIZE, STEPS = 16, 2


@pytest.fixture(scope="module")
def model(host):
    return tiny_models.build("sd15", seed=1)


@pytest.fixture
def small_budget():
    """The process-wide registry, whose budget a test sets with `limit(bytes)` on top of what recordings of earlier
    tests still reserve; restored after it (other modules' caches may be evicted meanwhile: each makes its own)."""
    from fisedit_engine.registry import registry
    reg = registry()
    saved = reg.budget
    gc.collect()  # unsealed recordings of earlier tests give their reservations back
    reserved = reliability.registry_snapshot()[1]

    def limit(nbytes):
        reg.budget = reserved + int(nbytes)
    reg.limit = limit
    yield reg
    reg.budget = saved
    del reg.limit


def capture(model, name, seed=3):
    from fisedit_engine import api
    captured, handle = api.capture(model, name)
    cache, _ = api.store(handle, {"samples": sample(captured, "sd15", size=SIZE, steps=STEPS, seed=seed)})
    return handle, cache


def box(i):
    m = torch.zeros(1, SIZE * 8, SIZE * 8)
    if i % 2:
        m[:, 16:64, 24:80] = 1.0
    else:
        m[:, 64:120, 56:112] = 1.0
    return m


def edit(model, handle, prompt_seed, mask):
    from fisedit_engine import api
    with torch.inference_mode():
        spec, _, _ = api.difference_mask(model, handle, tiny_models.conditioning("sd15", prompt_seed), "user", mask,
                                         dilate=1)
        latent, result = api.sparse_sample(model, spec, 0.0, "exact", 4)
    return spec, latent, result


def test_lru_eviction_of_real_caches_is_logged_frees_the_memory_and_an_edit_says_to_re_capture(model, small_budget,
                                                                                               caplog):
    from fisedit_engine import api
    from fisedit_engine.registry import CacheEvictedError
    first_handle, first = capture(model, "memory-a")
    small_budget.limit(2.5 * first.nbytes)  # room for two caches of this size
    store_output = api.sealed_handle(first)        # what FISEditCacheStore gave the workflow's edit nodes
    with torch.inference_mode():
        spec, _, _ = api.difference_mask(model, store_output, tiny_models.conditioning("sd15", 99), "user", box(0))
    watched = weakref.ref(next(iter(first.store.tensors.values())))
    del first
    with caplog.at_level(logging.INFO, logger="FISEdit"):
        capture(model, "memory-b", seed=4)
        capture(model, "memory-c", seed=5)
    assert "evicted cache 'memory-a'" in caplog.text and "least recently used" in caplog.text
    assert "memory-a" not in small_budget and {"memory-b", "memory-c"} <= set(small_budget.names())
    reliability.assert_registry_consistent()
    # ComfyUI still holds the capture's handle (in its output cache), but the evicted bytes must be gone
    assert first_handle.recording is not None
    gc.collect()
    assert watched() is None, "an evicted cache's tensors are still referenced"
    for attempt in (lambda: api.difference_mask(model, store_output, tiny_models.conditioning("sd15", 98), "user",
                                                box(1)),
                    lambda: api.sparse_sample(model, spec, 0.0, "exact", 4)):
        with pytest.raises(CacheEvictedError, match="evicted .* re-run the generation with FISEditCacheCapture"):
            with torch.inference_mode():
                attempt()


def test_evicting_the_source_of_a_registered_edit_makes_the_edit_whole_and_frees_the_source(model, small_budget,
                                                                                            caplog):
    """An edit's result is a delta over its source; when the source must leave memory, the result is assembled
    whole (its values unchanged) and the source's bytes are really freed."""
    from fisedit_engine import api
    _, source = capture(model, "memory-source")
    _, _, result = edit(model, api.sealed_handle(source), 99, box(0))
    edited = result.get()
    whole = source.nbytes
    assert edited.store.base is source.store and 0.1 * whole < edited.nbytes < whole  # stored as a delta
    before = reliability.cache_digest(edited)
    watched = weakref.ref(next(iter(source.store.tensors.values())))
    del source
    # room for the new capture and the edit made whole (2 caches), not for the source too (2 caches + the delta)
    small_budget.limit(2.05 * whole)
    with caplog.at_level(logging.INFO, logger="FISEdit"):
        capture(model, "memory-pressure", seed=6)  # the least recently used, memory-source, has to go
    assert "memory-source" not in small_budget and result.name in small_budget
    assert "made whole before it left memory" in caplog.text
    assert edited.store.base is None and reliability.cache_digest(result.get()) == before
    gc.collect()
    assert watched() is None, "the evicted source is still held by its edit"
    reliability.assert_registry_consistent()


def test_a_capture_larger_than_the_budget_fails_in_its_first_step_and_gives_its_reservation_back(model,
                                                                                               small_budget):
    from fisedit_engine import api
    from fisedit_engine.cache import CacheError
    from fisedit_engine.registry import CacheBudgetError
    _, cache = capture(model, "memory-size")
    small_budget.limit(cache.nbytes // 2)
    before = reliability.registry_snapshot()
    calls = []
    captured, handle = api.capture(model, "memory-too-big")
    with pytest.raises(CacheBudgetError, match="needs .* GiB of host memory .* set FISEDIT_CACHE_BUDGET higher"):
        sample(captured, "sd15", size=SIZE, steps=STEPS, seed=4, callback=lambda *a: calls.append(a))
    assert calls == []  # refused while recording step 0, not after a full sampling run
    assert reliability.registry_snapshot()[1] <= before[1] and "memory-too-big" not in small_budget
    with pytest.raises(CacheError, match="FISEDIT_CACHE_BUDGET"):
        api.store(handle, {"samples": torch.zeros(1, 4, SIZE, SIZE)})
    reliability.assert_registry_consistent()


def test_a_recording_never_sealed_gives_its_reservation_back_when_dropped(model):
    """A capture run with no FISEditCacheStore after it (or whose node output ComfyUI dropped) must not shrink the
    budget for good."""
    from fisedit_engine import api
    gc.collect()
    before = reliability.registry_snapshot()[1]
    captured, handle = api.capture(model, "memory-unsealed")
    sample(captured, "sd15", size=SIZE, steps=STEPS)
    assert handle.recording.state == "complete" and reliability.registry_snapshot()[1] > before
    del captured, handle
    gc.collect()
    assert reliability.registry_snapshot()[1] == before
    reliability.assert_registry_consistent()


def test_host_rss_is_flat_over_50_chained_edits(model, small_budget):
    """50 chained edits, each the base of the next, all kept alive as a 50-node chain in one ComfyUI prompt would
    keep them in its output cache. The registry's budget (three whole caches) must bound what is held, although each
    result is recorded as a delta over its source and so keeps the chain of its sources alive while registered.

    Tolerance: after 10 warm-up edits (allocator arenas and ComfyUI's first-call caches settle), RSS may grow by at
    most 8 cache sizes (20 MiB here). Measured: 2-5 MiB over the 40 edits, what the kept chain itself holds (each
    edit's conditionings, latents and mask, about 0.1 MiB). Leaking the results' stores costs far more: 71 MiB when
    evicted deltas still held their sources, 149 MiB when sealed recordings still held their stores."""
    import psutil
    from fisedit_engine.registry import registry
    handle, cache = capture(model, "memory-chain")
    small_budget.limit(3 * cache.nbytes + 2**20)
    process = psutil.Process()
    chain, rss = [], {}
    source = handle
    for i in range(50):
        spec, latent, source = edit(model, source, 100 + i, box(i))
        chain.append((spec, latent, source))
        assert registry().used <= registry().budget
        if i in (9, 49):
            gc.collect()
            rss[i] = process.memory_info().rss
    print(f"\nRSS {rss[9] / 2**20:.1f} MiB after 10 edits, {rss[49] / 2**20:.1f} MiB after 50; cache "
          f"{cache.nbytes / 2**20:.2f} MiB, budget {registry().budget / 2**20:.2f} MiB")
    assert chain[-1][2].get().settings.steps == STEPS  # the latest result is usable
    assert rss[49] - rss[9] <= 8 * cache.nbytes, f"RSS grew {(rss[49] - rss[9]) / 2**20:.1f} MiB over 40 edits"
