"""Host-memory registry of sealed caches, by name, under a byte budget with least-recently-used eviction.

The budget defaults to half of the RAM available when the registry is created; `FISEDIT_CACHE_BUDGET` (bytes, or
with a K/M/G/T suffix, or a percentage of available RAM such as "30%") overrides it. Recordings in progress
reserve their bytes up front, so that a capture fails in its first step, not after a full sampling run.
The registry is the only process-wide state of the engine.

It also keeps one spare block: the planned storage of an edit's result (cache.StepRows, about 1 GiB at SD2.1@768 with
a 5% mask) that left memory, for the next result of the same size (the same mask). Freeing such a block cost the seal
30-45 ms on an H200's host (benchmarks/edit_overhead.py --profile), and a new one is first touched while its rows
land; reused, neither happens. The spare counts against the budget and is the first thing let go for room.
"""
from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict, deque

from . import warm
from .cache import CacheError, FisEditCache

log = logging.getLogger("FISEdit")

DEFAULT_BUDGET_FRACTION = 0.5
_SUFFIX = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


class CacheBudgetError(CacheError):
    pass


class CacheEvictedError(CacheError):
    pass


def parse_budget(text: str, available: int) -> int:
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text.endswith("%"):
        return int(available * float(text[:-1]) / 100)
    if text and text[-1] in _SUFFIX:
        return int(float(text[:-1]) * _SUFFIX[text[-1]])
    return int(float(text))


def default_budget() -> int:
    import psutil
    available = psutil.virtual_memory().available
    env = os.environ.get("FISEDIT_CACHE_BUDGET")
    return parse_budget(env, available) if env else int(available * DEFAULT_BUDGET_FRACTION)


class CacheRegistry:
    def __init__(self, budget_bytes: int | None = None):
        self._caches: OrderedDict[str, FisEditCache] = OrderedDict()
        # each registered cache's bytes, counted when it (or its store) changes: a recording asks for room once per
        # tensor it allocates, and summing every tensor of every cache each time cost ~0.25 s per edit
        self._sizes: dict[str, int] = {}
        self._reserved = 0
        self._released_later: deque[int] = deque()
        self._given_blocks: deque = deque()   # dropped stores' blocks, from their finalizers (give_block)
        self._spare = None                    # one of them, kept for the next store of its size (take_block)
        self._lock = threading.RLock()
        self.budget = default_budget() if budget_bytes is None else int(budget_bytes)

    # --- sealed caches ---------------------------------------------------------------------------------
    def put(self, cache: FisEditCache, reserved: int = 0) -> None:
        """Adds (or replaces) a cache, turning `reserved` bytes of a recording into the cache's own. An edit's result
        recorded as a delta over a cache no longer registered is made whole first (see _drop)."""
        with self._lock:
            self._settle()
            self._reserved -= reserved
            old = self._drop(cache.name)
            if cache.store.base is not None and not any(c.store is cache.store.base for c in self._caches.values()):
                cache.store = cache.store.materialized()
            try:
                self._make_room(cache.nbytes, protect=cache.name)
            except CacheBudgetError:  # nothing changes: the old cache and the recording's reservation stay
                self._reserved += reserved
                if old is not None:
                    self._caches[cache.name] = old
                    self._sizes[cache.name] = old.nbytes
                raise
            self._caches[cache.name] = cache
            self._sizes[cache.name] = cache.nbytes

    def get(self, name: str) -> FisEditCache:
        with self._lock:
            cache = self._caches.get(name)
            if cache is None:
                raise CacheEvictedError(
                    f"no cache named '{name}' in memory (it was evicted to stay within the {self.budget / 2**30:.1f} GiB "
                    f"budget, or this server restarted): re-run the generation with FISEditCacheCapture, or load a "
                    f"saved cache with FISEditCacheLoad")
            self._caches.move_to_end(name)
            return cache

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._caches

    def names(self) -> list[str]:
        with self._lock:  # ComfyUI may call in from worker threads; an OrderedDict must not change while listed
            return list(self._caches)

    def remove(self, name: str) -> None:
        with self._lock:
            self._drop(name)

    def clear(self) -> None:
        with self._lock:
            for cache in self._caches.values():
                warm.release(cache)
            self._caches.clear()
            self._sizes.clear()
            self._released_later.clear()
            self._given_blocks.clear()
            self._spare = None
            self._reserved = 0

    @property
    def used(self) -> int:
        with self._lock:
            self._settle()
            return sum(self._sizes.values()) + self._reserved + self.spare_bytes

    @property
    def spare_bytes(self) -> int:
        """The spare block's bytes (see the module docstring)."""
        with self._lock:
            self._settle()
            return 0 if self._spare is None else self._spare.numel()

    # --- recordings in progress ------------------------------------------------------------------------
    def reserve(self, nbytes: int, what: str) -> None:
        with self._lock:
            self._settle()
            self._make_room(nbytes, protect=None, what=what)
            self._reserved += nbytes

    def release(self, nbytes: int) -> None:
        with self._lock:
            self._reserved = max(0, self._reserved - nbytes)

    def release_later(self, nbytes: int) -> None:
        """For finalizers: they run in any thread at any allocation, possibly one made under this registry's lock
        or a logging lock its holder waits for, so they must not take the lock. Settled by the next locked call."""
        self._released_later.append(nbytes)

    # --- the spare block ---------------------------------------------------------------------------------
    def take_block(self, nbytes: int):
        """The spare block if it has exactly `nbytes` bytes (uint8, its old contents), else None."""
        with self._lock:
            self._settle()
            if self._spare is None or self._spare.numel() != nbytes:
                return None
            block, self._spare = self._spare, None
            return block

    def give_block(self, block) -> None:
        """For the finalizer of a store's planned block (cache.StepTensors.plan_rows): kept as the spare if, once
        settled, nothing else holds it. Must not take the lock, as release_later."""
        self._given_blocks.append(block)

    def _settle(self) -> None:
        while self._released_later:
            self._reserved = max(0, self._reserved - self._released_later.popleft())
        while self._given_blocks:
            block = self._given_blocks.popleft()
            if _only_reference(block):
                self._spare = block  # the newest: the likeliest size of the next result (an older spare is freed)

    def _drop(self, name: str) -> FisEditCache | None:
        """Takes a cache out of the registry. An edit's result is a delta over its source's store and keeps that store
        alive, so registered results over this cache (and, through them, results over those) are made whole first:
        otherwise dropping a cache would free nothing, and the budget would stop counting memory still held. Every
        registered delta's base is the store of a registered cache, so `used` counts every byte once."""
        cache = self._caches.pop(name, None)
        self._sizes.pop(name, None)
        if cache is None:
            return None
        warm.release(cache)
        if cache.resident is not None:
            cache.resident.release()
        made_whole = 0
        for other in list(self._caches.values()):
            if other.store.base is cache.store:
                old = other.store
                warm.release(other)  # what its edits kept reads the old store
                other.store = old.materialized()
                self._sizes[other.name] = other.nbytes
                made_whole += 1
                for dependent in self._caches.values():  # same values, now from a store that stands alone
                    if dependent.store.base is old:
                        dependent.store.base = other.store
        if made_whole:
            log.info("FISEdit: %d edit result(s) recorded over cache '%s' were made whole before it left memory",
                     made_whole, name)
        return cache

    def _make_room(self, nbytes: int, protect: str | None, what: str | None = None) -> None:
        self._settle()
        if nbytes > self.budget - self._reserved:
            raise CacheBudgetError(
                f"{what or 'the cache'} needs {nbytes / 2**30:.2f} GiB of host memory but the FISEdit budget is "
                f"{self.budget / 2**30:.2f} GiB ({self._reserved / 2**30:.2f} GiB reserved by captures in progress): "
                f"set FISEDIT_CACHE_BUDGET higher (for example 80%), or capture fewer steps or a smaller image")
        while self.used + nbytes > self.budget:
            if self._spare is not None:
                self._spare = None
                continue
            victim = next((n for n in self._caches if n != protect), None)
            if victim is None:
                break
            evicted = self._drop(victim)
            log.info("FISEdit: evicted cache '%s' (%.1f MiB, least recently used) to stay within the %.1f GiB budget",
                     victim, evicted.nbytes / 2**20, self.budget / 2**30)


def _only_reference(block) -> bool:
    """Whether `block` is the only tensor on its storage (no view of it lives elsewhere, which a reuse would
    overwrite). Torch counts a storage's users only through a private call; without it nothing is reused."""
    import torch
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:
        return False
    return use_count(block.untyped_storage()._cdata) <= 2  # `block`, and the storage object asked here


_registry: CacheRegistry | None = None
_registry_lock = threading.Lock()


def registry() -> CacheRegistry:
    global _registry
    with _registry_lock:
        if _registry is None:
            _registry = CacheRegistry()
        return _registry
