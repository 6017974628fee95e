"""The attention context kept on the GPU between edits: every step's self-attention keys and values.

A sparse step's self-attention runs its active queries against the keys and values of every token, and those of the
inactive tokens are the cached ones. Uploaded per step, they are 80-90% of what an edit moves to the device (SD2.1 at
768 px: 197 of 235 MiB per step at a 5% edit), although they are the same for every edit of one generation. So they
stay on the device: a capture keeps a device copy of what it records (no upload even for the first edit), and an
edit of a cache that has none (loaded from a file, or an edit's result) keeps what it uploads, for the next edit.

Device memory is bounded by one process-wide budget (FISEDIT_RESIDENT_BUDGET: bytes with a unit, such as "6GiB", a
percentage of the device's memory such as "10%", or 0 to turn this off; default the smaller of 20 GiB and 20% of
the device: 16 GiB on an 80 GB H100, which holds SDXL@1024's whole context, 15.6 GiB over 20 steps; with 8 GiB, about
half its steps uploaded theirs, 31% of a step's cache, and its sparse step at 5% took 23.4 ms where the whole context
kept made it 17.0 ms, 1.79x and 2.44x the dense UNet graph: benchmarks/results/speed-f249593/). A cache that does not
fit whole keeps the steps that fit; the rest is uploaded per step as before. When another cache needs the room, the
least recently used cache's context is let go. A cache's context is let go too when the cache leaves the registry.
Nothing here changes a value: these are copies of the cached tensors.
"""
from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict

import torch

log = logging.getLogger("FISEdit")

DEFAULT_MAX_BYTES = 20 * 2**30
DEFAULT_DEVICE_FRACTION = 0.2
_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9}


def is_attention_context(key: str) -> bool:
    return key.endswith(".attn1:k") or key.endswith(".attn1:v")


def parse_budget(text: str, device_total: int) -> int:
    """'6GiB', '512MiB', '10%' (of the device's memory), '0' -> bytes."""
    t = text.strip().lower().replace(" ", "")
    try:
        if t.endswith("%"):
            return int(device_total * float(t[:-1]) / 100)
        number = t.rstrip("kmgib")
        return int(float(number) * _UNITS[t[len(number):]])
    except (KeyError, ValueError):
        raise ValueError(f"FISEDIT_RESIDENT_BUDGET={text!r}: give bytes with a unit (such as 6GiB or 512MiB), a "
                         f"percentage of the GPU's memory (such as 10%), or 0 to keep nothing on the GPU") from None


class ResidentContext:
    """One cache's attention context on one device: (key, chunk, step) -> tensor in the cache's stored layout."""

    def __init__(self, budget: "DeviceBudget", device: torch.device):
        self.budget, self.device = budget, device
        self.tensors: dict[tuple[str, int, int], torch.Tensor] = {}
        self.nbytes = 0
        self.generation = 0  # counts the times its tensors were let go (what an edit kept may read their addresses)

    def get(self, key: str, chunk: int, step: int) -> torch.Tensor | None:
        return self.tensors.get((key, chunk, step))

    def keep(self, key: str, chunk: int, step: int, value: torch.Tensor) -> bool:
        """Keeps a device copy of `value` if the budget has room (the caller may reuse `value`)."""
        if (key, chunk, step) in self.tensors:
            return True
        nbytes = value.numel() * value.element_size()
        if not self.budget.take(self, nbytes):
            return False
        self.tensors[(key, chunk, step)] = value.detach().clone()
        self.nbytes += nbytes
        return True

    def release(self) -> None:
        self.tensors.clear()
        self.generation += 1
        self.budget.give_back(self, self.nbytes)
        self.nbytes = 0


class DeviceBudget:
    """The process-wide bound on resident contexts, least recently used first out."""

    def __init__(self, budget_bytes: int | None = None):
        self._limit: int | None = budget_bytes
        self._users: OrderedDict[int, ResidentContext] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()

    def limit(self, device: torch.device) -> int:
        if self._limit is None:
            total = torch.cuda.get_device_properties(device).total_memory
            env = os.environ.get("FISEDIT_RESIDENT_BUDGET")
            self._limit = (parse_budget(env, total) if env
                           else min(DEFAULT_MAX_BYTES, int(total * DEFAULT_DEVICE_FRACTION)))
        return self._limit

    @property
    def used(self) -> int:
        return self._used

    def context(self, device) -> ResidentContext | None:
        """A new context on `device`, or None where nothing can be kept (not a GPU, or a budget of 0)."""
        device = torch.device(device)
        if device.type != "cuda" or self.limit(device) <= 0:
            return None
        return ResidentContext(self, device)

    def take(self, ctx: ResidentContext, nbytes: int) -> bool:
        with self._lock:
            limit = self.limit(ctx.device)
            if nbytes > limit:
                return False
            self._users[id(ctx)] = ctx
            self._users.move_to_end(id(ctx))
            while self._used + nbytes > limit:
                victim = next((c for i, c in self._users.items() if i != id(ctx)), None)
                if victim is None:
                    return False  # this context fills the budget itself: the remaining steps are uploaded
                self._users.pop(id(victim))
                self._used -= victim.nbytes
                log.info("FISEdit: let go of a cache's attention context on the GPU (%.0f MiB, least recently "
                         "used) to stay within FISEDIT_RESIDENT_BUDGET", victim.nbytes / 2**20)
                victim.tensors.clear()
                victim.generation += 1
                victim.nbytes = 0
            self._used += nbytes
            return True

    def touch(self, ctx: ResidentContext) -> None:
        with self._lock:
            if id(ctx) in self._users:
                self._users.move_to_end(id(ctx))

    def give_back(self, ctx: ResidentContext, nbytes: int) -> None:
        with self._lock:
            if self._users.pop(id(ctx), None) is not None:
                self._used -= nbytes


_budget = DeviceBudget()


def budget() -> DeviceBudget:
    return _budget
