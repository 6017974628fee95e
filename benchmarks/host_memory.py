"""What keeping an edit's result in host memory costs, by way of moving it there (one GPU, this machine's host).

    python benchmarks/host_memory.py [--mib 1024]

An edit's result at SD2.1@768 with a 5% mask is about 1 GiB (edit_wall.py prints it). Timed, each on fresh memory:
pinning it (cudaHostAlloc, what a pinned result store costs per edit), a device-to-host copy into pinned memory, into
pageable memory, a host copy from pinned into pageable memory, and first-touching pageable memory.
"""
from __future__ import annotations

import argparse
import sys
import time


def timed(fn, repeat: int = 3) -> float:
    import torch
    best = float("inf")
    for _ in range(repeat):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024)
    a = parser.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/host_memory.py times host-device transfers: run it on a machine with CUDA")
    n = a.mib << 20
    device = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
    pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    pageable = torch.empty(n, dtype=torch.uint8)
    pageable.fill_(1)  # touched once: the copies below time the transfer, not page faults
    kept = []  # every pinned allocation stays alive: the caching host allocator would hand a freed one back
    cases = {
        "pin fresh memory (torch.empty(pin_memory=True))":
            lambda: kept.append(torch.empty(n, dtype=torch.uint8, pin_memory=True)),
        "first touch of fresh pageable memory (torch.empty + fill_)":
            lambda: torch.empty(n, dtype=torch.uint8).fill_(0),
        "device -> pinned host copy": lambda: pinned.copy_(device, non_blocking=True),
        "device -> pageable host copy (touched)": lambda: pageable.copy_(device),
        "device -> fresh pageable host copy (device.cpu())": lambda: device.cpu(),
        "pinned -> pageable host copy (touched)": lambda: pageable.copy_(pinned),
        "pinned -> fresh pageable host copy (pinned.clone())": lambda: pinned.clone(),
    }
    print(f"{torch.cuda.get_device_name()}, {a.mib} MiB, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, fn in cases.items():
        s = timed(fn)
        print(f"  {name:55s} {1000 * s:8.1f} ms  {n / s / 2**30:6.1f} GiB/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
