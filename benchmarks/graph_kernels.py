"""The kernels of one replayed sparse step against those of the dense UNet replayed as a CUDA graph.

    python benchmarks/graph_kernels.py [--models sd21v@768,sdxl@1024] [--fraction 0.05] [--top 25] [--dump DIR]
                                       [--layouts nhwc,im2col] [--min-sparse 256,144]

Per graph: the number of kernels one replay runs, the sum of their GPU times, the replay's span on the GPU (first
kernel start to last kernel end: the rest of the span is the GPU idle between kernels), a histogram of kernel
durations, the time per kind of kernel (convolution, GEMM, attention, Triton, copies, the rest) and the kernels with
the most time; with `--dump`, the median replay's kernels in order (name, start, duration) as JSON in DIR, to read
against the code that launched them; with `--layouts`, the sparse step once per patch layout (FISEDIT_PATCH_LAYOUT,
kernels/fused.py: the convs on stacked patches or as im2col GEMMs), side by side; with `--min-sparse`, the sparse
step once per capture with that smallest sparse level (in positions: layout.py's min_sparse_positions; the levels
below it run dense), side by side. Kernels are assigned to a replay
through the CUDA runtime's correlation id of its cudaGraphLaunch (torch's profiler, with CUPTI, reports each kernel of
a graph).
"""
from __future__ import annotations

import collections
import json
import os
import re
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT), str(ROOT / "benchmarks")]

KINDS = (  # first match wins; names as cuDNN, cuBLAS, PyTorch and Triton report them
    ("attention", ("flash", "fmha", "attention", "sdpa", "softmax")),
    ("convolution", ("conv", "implicit", "xmma_fprop", "dgrad", "wgrad", "nhwc", "cudnn")),
    ("gemm", ("gemm", "nvjet", "sm90_xmma", "cutlass", "cublas", "matmul", "splitk")),
    ("copy", ("memcpy", "memset", "copy", "cat", "index", "scatter", "gather_kernel")),
    ("norm", ("norm", "layer_norm", "group_norm", "welford")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "reduce")),
)


TRITON_NAME = re.compile(r"_?[a-z0-9_]*_kernel")  # ours are named after their Python function (_scatter_kernel)


def kind_of(name: str) -> str:
    low = name.lower()
    if low.startswith("triton") or TRITON_NAME.fullmatch(low):
        return "triton"
    for kind, words in KINDS:
        if any(w in low for w in words):
            return kind
    return "other"


def replays(trace_path: Path) -> list[list[dict]]:
    """The kernels of each cudaGraphLaunch in a chrome trace, ordered by start."""
    events = json.loads(trace_path.read_text())["traceEvents"]
    launches = {e["args"]["correlation"] for e in events
                if e.get("cat") == "cuda_runtime" and e.get("name") == "cudaGraphLaunch"}
    per = collections.defaultdict(list)
    for e in events:
        if e.get("cat") == "kernel" and e.get("args", {}).get("correlation") in launches:
            per[e["args"]["correlation"]].append(e)
    if launches and not per:
        kernels = [e for e in events if e.get("cat") == "kernel"]
        raise SystemExit(f"{trace_path.name}: {len(launches)} graph launches but none of the {len(kernels)} kernels "
                         f"carries their correlation id (kernel args: {kernels[0].get('args') if kernels else None})")
    return [sorted(k, key=lambda e: e["ts"]) for _, k in sorted(per.items())]


def anatomy(kernels: list[dict], top: int) -> str:
    durs = [k["dur"] for k in kernels]
    span = max(k["ts"] + k["dur"] for k in kernels) - min(k["ts"] for k in kernels)
    busy = sum(durs)
    lines = [f"  {len(kernels)} kernels, kernel time {busy / 1000:.2f} ms, span {span / 1000:.2f} ms (GPU idle "
             f"between kernels {100 * (1 - busy / span):.0f}%), median kernel {statistics.median(durs):.1f} us"]
    edges = (2, 5, 10, 20, 50, 100, 1000, float("inf"))
    counts, low = [], 0
    for edge in edges:
        sel = [d for d in durs if low <= d < edge]
        counts.append(f"{low:g}-{edge:g} us: {len(sel)} ({sum(sel) / 1000:.2f} ms)")
        low = edge
    lines.append("  durations: " + "; ".join(counts))
    by_kind = collections.defaultdict(lambda: [0, 0.0])
    by_name = collections.defaultdict(lambda: [0, 0.0])
    for k in kernels:
        for table, key in ((by_kind, kind_of(k["name"])), (by_name, k["name"])):
            table[key][0] += 1
            table[key][1] += k["dur"]
    lines.append("  by kind: " + "; ".join(f"{kind} {n} kernels {t / 1000:.2f} ms"
                                           for kind, (n, t) in sorted(by_kind.items(), key=lambda i: -i[1][1])))
    lines.append(f"  top {top} kernels by time (count, ms, us each):")
    for name, (n, t) in sorted(by_name.items(), key=lambda i: -i[1][1])[:top]:
        lines.append(f"    {n:5d} {t / 1000:7.3f} {t / n:7.1f}  {name[:150]}")
    return "\n".join(lines)


def profiled(fn, tmp: Path, label: str) -> list[list[dict]]:
    import torch
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    path = tmp / f"{label}.json"
    prof.export_chrome_trace(str(path))
    return replays(path)


def run(arch: str, size: int, fraction: float, top: int, tmp: Path, dump: Path | None = None,
        layouts: tuple = (), min_sparse: tuple = ()) -> None:
    import torch
    import comfy.model_management as mm
    import comfy.sample
    import speed
    from fisedit_engine import api
    from fisedit_engine.edit import EditSpec
    from fisedit_engine.kernels import fused
    from fisedit_engine.layout import DEFAULT_MIN_SPARSE_POSITIONS

    model, _ = speed.load_model(arch)
    lat = size // 8
    latent = torch.zeros(1, 4, lat, lat)
    noise = comfy.sample.prepare_noise(latent, 0)
    print(f"== {arch}@{size}, mask {100 * fraction:.0f}% rectangle", flush=True)
    with torch.inference_mode():
        mm.load_models_gpu([model])
        unet = model.model.diffusion_model
        dtype, dev = model.model.get_dtype(), mm.get_torch_device()
        x = torch.randn(2, 4, lat, lat, device=dev, dtype=dtype)
        t = torch.full((2,), 500.0, device=dev)
        context = torch.randn(2, 77, speed.CONTEXT[arch], device=dev, dtype=dtype)
        kwargs = ({"y": torch.randn(2, unet.label_emb[0][0].in_features, device=dev, dtype=dtype)}
                  if arch == "sdxl" else {})
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                unet(x, timesteps=t, context=context, transformer_options={}, **kwargs)
        torch.cuda.current_stream().wait_stream(side)
        dense = torch.cuda.CUDAGraph()
        with torch.cuda.graph(dense):
            unet(x, timesteps=t, context=context, transformer_options={}, **kwargs)
        for _ in range(3):
            dense.replay()
        runs = profiled(lambda: [dense.replay() for _ in range(3)], tmp, f"dense-{arch}")
        print("dense UNet, one CUDA-graph replay (the last of 3):")
        print(anatomy(runs[-1], top))
        del dense

        for smallest in min_sparse or (None,):
            suffix = "" if smallest is None else f"-min{smallest}"
            label = f"{arch}-{size}{suffix}"
            captured, handle = api.capture(model, f"kernels-{arch}{suffix}",
                                           min_sparse_positions=smallest or DEFAULT_MIN_SPARSE_POSITIONS)
            out = comfy.sample.sample(captured, noise, 8, 7.0, "euler", "normal", speed.conditioning(arch, 1, size),
                                      speed.conditioning(arch, 2, size), latent, seed=0, disable_pbar=True)
            api.store(handle, {"samples": out})
            if smallest is not None:
                print(f"-- min_sparse_positions={smallest}: sparse levels {handle.get().settings.sparse_levels}")
            spec = EditSpec(handle, speed.conditioning(arch, 3, size), speed.region_mask(lat, fraction, "rect"))
            for layout in layouts or (None,):
                if layout is not None:
                    os.environ[fused.LAYOUT_ENV] = layout
                    print(f"-- {fused.LAYOUT_ENV}={layout}")
                sparse_step(model, spec, label + (f"-{layout}" if layout else ""), top, tmp, dump)
            api.registry().remove(handle.name)
    del model
    torch.cuda.empty_cache()


def sparse_step(model, spec, label: str, top: int, tmp: Path, dump: Path | None) -> None:
    """The kernels of the edit's replayed sparse step (after a warm-up edit that compiles the kernels and plans
    cuDNN)."""
    from fisedit_engine import api
    from fisedit_engine.edit import run_edit
    _, warm = run_edit(model, spec)
    api.registry().remove(warm.name)
    results = []
    runs = profiled(lambda: results.append(run_edit(model, spec)[1]), tmp, f"sparse-{label}")
    print(results[0].edit_summary)
    print(f"sparse step, CUDA-graph replays: {len(runs)}; kernels per replay "
          f"{sorted({len(r) for r in runs})}; the median replay by span:")
    spans = sorted(runs, key=lambda r: max(k['ts'] + k['dur'] for k in r) - r[0]['ts'])
    median = spans[len(spans) // 2]
    print(anatomy(median, top))
    if dump is not None:
        dump.mkdir(parents=True, exist_ok=True)
        (dump / f"sparse-{label}.json").write_text(json.dumps(
            [{"name": k["name"], "ts": k["ts"] - median[0]["ts"], "dur": k["dur"]} for k in median], indent=0))
    api.registry().remove(results[0].name)


def main(argv=None) -> int:
    import speed

    def run_model(arch, size, a):
        with tempfile.TemporaryDirectory() as tmp:
            run(arch, size, a.fraction, a.top, Path(tmp), a.dump,
                tuple(v.strip() for v in a.layouts.split(",") if v.strip()) if a.layouts else (),
                tuple(int(v) for v in a.min_sparse.split(",") if v.strip()) if a.min_sparse else ())

    def add_arguments(parser):
        parser.add_argument("--top", type=int, default=25)
        parser.add_argument("--dump", type=Path, help="a folder for the median replay's kernels in order (JSON)")
        parser.add_argument("--layouts", help="patch layouts to profile side by side, e.g. nhwc,im2col")
        parser.add_argument("--min-sparse", help="captures' smallest sparse level in positions, side by side, e.g. "
                                                 "256,144")
    return speed.per_model_main(argv, __doc__, "benchmarks/graph_kernels.py profiles CUDA graph replays",
                                add_arguments, run_model)


if __name__ == "__main__":
    sys.exit(main())
