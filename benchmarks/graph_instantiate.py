"""What capturing and instantiating a CUDA graph costs on this machine, per node, and whether instantiating overlaps
the host's other work.

    python benchmarks/graph_instantiate.py [--nodes 200,800,1600] [--repeat 3]

A new mask's first sparse step is captured as a CUDA graph (graphs.StepGraph; the edit's summary splits that
capture into recording, ending and instantiating). This times synthetic graphs of N nodes of two kinds, an ATen
in-place add on a small tensor and a small cuBLAS matrix product, so the cost per node shows apart from the sparse
step's own work: the host seconds of recording the launches, ending the capture, instantiating, the first replay and
a later one (each the median of `--repeat` fresh captures). Then it instantiates the largest graph on a second
thread while the first thread launches and synchronises eager adds, and reports both alone and together: whether
an eager step could run while the driver instantiates (torch releases the GIL there). Last, it updates an
instantiated graph's executable to a second capture of the same launches on another tensor (the driver's
cuGraphExecUpdate, which a new mask's graph could use in place of instantiating when its launches match the last
mask's), checks that a replay then writes the second tensor, and times it beside instantiating.
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import os
import statistics
import threading
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="200,800,1600", help="graph sizes (kernel launches)")
    parser.add_argument("--repeat", type=int, default=3)
    a = parser.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("graph_instantiate.py needs a CUDA GPU")
        return 1
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
          f"CUDA_MODULE_LOADING={os.environ.get('CUDA_MODULE_LOADING', '(unset)')}")
    x = torch.zeros(1024, device=device)
    m = torch.randn(64, 64, device=device, dtype=torch.float16)
    out_m = torch.empty_like(m)
    kinds = {"add": lambda: x.add_(1.0), "matmul 64x64": lambda: torch.mm(m, m, out=out_m)}
    sizes = [int(v) for v in a.nodes.split(",")]
    stream = torch.cuda.Stream(device)
    print("| kind | nodes | record ms | end ms | instantiate ms | instantiate us per node | first replay ms | "
          "replay ms |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, launch in kinds.items():
        for _ in range(3):  # the kernels loaded and cuBLAS's handle made before any capture
            launch()
        torch.cuda.synchronize()
        for n in sizes:
            rows = [capture(launch, n, stream) for _ in range(a.repeat)]
            med = [statistics.median(r[i] for r in rows) for i in range(5)]
            print(f"| {kind} | {n} | " + " | ".join(f"{1e3 * v:.2f}" for v in med[:3])
                  + f" | {1e6 * med[2] / n:.0f} | {1e3 * med[3]:.2f} | {1e3 * med[4]:.2f} |")

    # instantiating beside eager work: a fresh capture of the largest add graph, instantiated on a thread
    n = max(sizes)

    def eager():
        for _ in range(n):
            x.add_(1.0)
        torch.cuda.synchronize()

    eager()
    t = time.perf_counter()
    eager()
    eager_alone = time.perf_counter() - t
    graph = record(lambda: x.add_(1.0), n, stream)[0]
    t = time.perf_counter()
    graph.instantiate()
    instantiate_alone = time.perf_counter() - t
    graph = record(lambda: x.add_(1.0), n, stream)[0]
    done = {}

    def instantiate():
        t0 = time.perf_counter()
        graph.instantiate()
        done["instantiate"] = time.perf_counter() - t0

    t = time.perf_counter()
    worker = threading.Thread(target=instantiate)
    worker.start()
    t0 = time.perf_counter()
    eager()
    eager_beside = time.perf_counter() - t0
    worker.join()
    both = time.perf_counter() - t
    print(f"\n{n} eager adds, synchronised: {1e3 * eager_alone:.1f} ms alone, {1e3 * eager_beside:.1f} ms while a "
          f"{n}-node graph instantiates on another thread; instantiating {1e3 * instantiate_alone:.1f} ms alone, "
          f"{1e3 * done['instantiate']:.1f} ms beside; both together {1e3 * both:.1f} ms "
          f"(serially {1e3 * (eager_alone + instantiate_alone):.1f})")

    # updating an executable in place of instantiating a new one
    y = torch.zeros_like(x)
    for n in sizes:
        first = record(lambda: x.add_(1.0), n, stream)[0]
        first.instantiate()
        _driver_update()  # the driver's symbol looked up before the timing
        seconds = []
        for _ in range(a.repeat):
            second = record(lambda: y.add_(1.0), n, stream)[0]
            t = time.perf_counter()
            result = exec_update(first.raw_cuda_graph_exec(), second.raw_cuda_graph())
            seconds.append(time.perf_counter() - t)
            if result != 0:
                print(f"cuGraphExecUpdate of {n} nodes failed: {result}")
                return 1
        before = y.clone()
        first.replay()
        torch.cuda.synchronize()
        grew = float((y - before).mean())
        third = record(lambda: [x.add_(1.0), y.add_(1.0)], n // 2 + 1, stream)[0]  # other nodes: refused
        refused = exec_update(first.raw_cuda_graph_exec(), third.raw_cuda_graph())
        print(f"updating a {n}-node executable: {1e3 * statistics.median(seconds):.2f} ms (median of {a.repeat}); "
              f"a replay then added {grew:.0f} to each element of the second tensor (expected {n}); a capture "
              f"with another node count: result {refused} (nonzero: refused)")
    return 0


class _UpdateResultInfo(ctypes.Structure):
    _fields_ = [("result", ctypes.c_int), ("errorNode", ctypes.c_void_p), ("errorFromNode", ctypes.c_void_p)]


@functools.cache
def _driver_update():
    update = ctypes.CDLL("libcuda.so.1").cuGraphExecUpdate_v2
    update.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(_UpdateResultInfo)]
    return update


def exec_update(graph_exec: int, graph: int) -> int:
    """The driver's cuGraphExecUpdate (CUDA 12's signature) of an executable to a graph: 0 when it took."""
    info = _UpdateResultInfo()
    status = _driver_update()(ctypes.c_void_p(int(graph_exec)), ctypes.c_void_p(int(graph)), ctypes.byref(info))
    return status or info.result


def record(launch, n: int, stream) -> tuple:
    """A graph of `n` launches, captured and kept (not instantiated), the seconds of recording and of ending."""
    import torch
    graph = torch.cuda.CUDAGraph(keep_graph=True)
    with torch.cuda.stream(stream):
        graph.capture_begin(capture_error_mode="thread_local")
        t0 = time.perf_counter()
        for _ in range(n):
            launch()
        t1 = time.perf_counter()
        graph.capture_end()
    return graph, t1 - t0, time.perf_counter() - t1


def capture(launch, n: int, stream) -> tuple:
    """Host seconds of recording, ending, instantiating, the first replay and the second, of a fresh graph."""
    import torch
    graph, recording, ending = record(launch, n, stream)
    t = time.perf_counter()
    graph.instantiate()
    instantiating = time.perf_counter() - t
    replays = []
    for _ in range(2):
        t = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        replays.append(time.perf_counter() - t)
    return recording, ending, instantiating, replays[0], replays[1]


if __name__ == "__main__":
    raise SystemExit(main())
