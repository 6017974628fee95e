"""Whether an edit's sparse sampling waits on the GPU or on the host: the GPU's busy and idle time, unsynchronised.

    python benchmarks/gpu_timeline.py [--models sd21v@768] [--fraction 0.05] [--steps 20] [--gaps 12] [--keep DIR]
    python benchmarks/gpu_timeline.py --from-traces DIR

edit_wall.py gives the wall time of sparse sampling with nothing synchronised inside the run; this shows where that
time goes on the GPU. Under torch's profiler (CUPTI), one warm run of stock sampling and one edit taking the sparse
steps the last edit of the same mask kept (fisedit_engine/warm.py): the wall time of the run, the time some kernel or
copy ran on the GPU (the union over streams) and the rest, idle, and per stream its busy time. Then the idle gaps of
the edit: for each gap, what the main thread was doing at its middle, from a second profiled edit that records
Python's call stacks (which slows the host, so only its attribution is used): gap time summed by the innermost Python
function or torch op. A run whose GPU is idle most of its wall time is bound by the host, and the gaps say where.
`--keep DIR` keeps the three chrome traces there, gzipped (chrome://tracing and Perfetto read them), and
`--from-traces DIR` prints the edit's report from them again, without a GPU. The report also times the replays (each
one's GPU span, the time from one replay's end to the next one's start) and lists what the GPU ran between two of
them outside the graphs: the row copies of the feed and the record, the copies to host memory, the sampler's math.
"""
from __future__ import annotations

import bisect
import collections
import gzip
import shutil
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT), str(ROOT / "benchmarks")]

GPU_WORK = ("kernel", "gpu_memcpy", "gpu_memset")
HOST_WORK = ("cpu_op", "cuda_runtime", "cuda_driver", "python_function", "user_annotation")
OUR_CODE = ("fisedit_engine/", "comfy/", "nodes/")


def union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def gpu_intervals(events: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """Busy intervals (us) per stream of the GPU's kernels, copies and sets."""
    per = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in GPU_WORK:
            per[f"stream {e.get('tid')}"].append((e["ts"], e["ts"] + e["dur"]))
    return per


def busy_report(label: str, events: list[dict], wall_s: float) -> str:
    per = gpu_intervals(events)
    merged = union([i for v in per.values() for i in v])
    if not merged:
        return f"{label}: no GPU work in the trace"
    busy = sum(e - s for s, e in merged)
    span = merged[-1][1] - merged[0][0]
    lines = [f"{label}: wall {1000 * wall_s:.1f} ms, GPU span {span / 1000:.1f} ms, GPU busy {busy / 1000:.1f} ms "
             f"({100 * busy / (1e6 * wall_s):.0f}% of the wall), idle inside the span {(span - busy) / 1000:.1f} ms"]
    for stream, intervals in sorted(per.items(), key=lambda i: -sum(e - s for s, e in i[1])):
        own = sum(e - s for s, e in union(intervals))
        lines.append(f"  {stream}: {len(intervals)} kernels and copies, busy {own / 1000:.1f} ms")
    return "\n".join(lines)


def idle_gaps(events: list[dict], min_us: float) -> list[tuple[float, float]]:
    merged = union([i for v in gpu_intervals(events).values() for i in v])
    return [(a[1], b[0]) for a, b in zip(merged, merged[1:]) if b[0] - a[1] >= min_us]


def graph_launches(events: list[dict]) -> list[dict]:
    """The main thread's cudaGraphLaunch events, in order: one per replayed sparse step."""
    tid = main_thread(events)
    return sorted((e for e in events if _is_graph_launch(e) and e.get("tid") == tid), key=lambda e: e["ts"])


def launches(events: list[dict]) -> list[float]:
    """Start times (us) of the main thread's CUDA graph launches."""
    return [e["ts"] for e in graph_launches(events)]


def _is_graph_launch(e: dict) -> bool:
    return e.get("cat") == "cuda_runtime" and e.get("name") == "cudaGraphLaunch"


def phases_report(events: list[dict], gaps: list[tuple[float, float]]) -> str:
    """The GPU's idle time before the first replayed step, between the first and the last step's launch (per step),
    and after it, where the edit prepares, samples and seals."""
    starts = launches(events)
    if len(starts) < 2:
        return "  fewer than two CUDA graph launches: no sampling phase to split"
    merged = union([i for v in gpu_intervals(events).values() for i in v])
    first, last = starts[0], starts[-1]
    before = sum(max(0.0, min(e, first) - s) for s, e in gaps)
    after = sum(max(0.0, e - max(s, last)) for s, e in gaps)
    per_step = [sum(max(0.0, min(e, b) - max(s, a)) for s, e in gaps) for a, b in zip(starts, starts[1:])]
    periods = [b - a for a, b in zip(starts, starts[1:])]
    return (f"  before the first replay: {(first - merged[0][0]) / 1000:.1f} ms from the first GPU work, idle "
            f"{before / 1000:.1f} ms; between launches: {len(periods)} steps, median "
            f"{statistics.median(periods) / 1000:.2f} ms per step, idle median "
            f"{statistics.median(per_step) / 1000:.2f} ms (sum {sum(per_step) / 1000:.1f} ms); "
            f"after the last launch: {(merged[-1][1] - last) / 1000:.1f} ms, idle {after / 1000:.1f} ms")


def replays_report(events: list[dict]) -> str:
    """Per replayed step (its kernels found by the correlation id of its cudaGraphLaunch): the replay's GPU span, the
    GPU time from the previous replay's end to its start, and how far the host's launch ran ahead of it; then what
    the GPU ran between the two middle replays, outside the graphs (runs of short kernels of one stream merged)."""
    launched = graph_launches(events)
    work = [e for e in events if e.get("ph") == "X" and e.get("cat") in GPU_WORK]
    per = collections.defaultdict(list)
    for e in work:
        per[e.get("args", {}).get("correlation")].append(e)
    spans = []
    for launch in launched:
        kernels = per.get(launch["args"]["correlation"])
        if kernels:
            spans.append((launch["ts"], min(k["ts"] for k in kernels), max(k["ts"] + k["dur"] for k in kernels)))
    if len(spans) < 3:
        return "  fewer than three replays found"
    between = [b[1] - a[2] for a, b in zip(spans, spans[1:])]
    lines = [f"  {len(spans)} replays: GPU span median {statistics.median(e - s for _, s, e in spans) / 1000:.2f} ms, "
             f"from one replay's end to the next one's start median {statistics.median(between) / 1000:.2f} ms, the "
             f"launch ahead of the replay median {statistics.median(s - t for t, s, _ in spans) / 1000:.2f} ms"]
    middle = len(spans) // 2
    start, end = spans[middle - 1][2], spans[middle][1]
    graphs = {launch["args"]["correlation"] for launch in launched}
    outside = sorted((e for e in work if e["ts"] + e["dur"] > start - 100 and e["ts"] < end
                      and e.get("args", {}).get("correlation") not in graphs), key=lambda e: e["ts"])
    lines.append(f"  between replays {middle} and {middle + 1} ({(end - start) / 1000:.2f} ms; times from the first "
                 f"one's end, ms):")
    run: list[dict] = []

    def flush_run():
        if run:
            lines.append(f"    {(run[0]['ts'] - start) / 1000:7.3f} {sum(e['dur'] for e in run) / 1000:6.3f}  stream "
                         f"{run[0]['tid']}: {len(run)} kernels under 20 us ({run[0]['name'][:40]}, ...)")
            run.clear()
    for e in outside:
        if e.get("cat") == "kernel" and e["dur"] < 20 and (not run or run[-1]["tid"] == e["tid"]):
            run.append(e)
            continue
        flush_run()
        lines.append(f"    {(e['ts'] - start) / 1000:7.3f} {e['dur'] / 1000:6.3f}  stream {e['tid']}: {e['cat']} "
                     f"{e['name'][:70]}")
    flush_run()
    return "\n".join(lines)


def sampling_gaps(events: list[dict], gaps: list[tuple[float, float]]) -> list[tuple[float, float]]:
    starts = launches(events)
    return [g for g in gaps if starts and starts[0] <= g[0] and g[1] <= starts[-1]]


def main_thread(events: list[dict]):
    """The tid of the thread that launched the CUDA graphs (the sampler's)."""
    by_thread = collections.Counter(e.get("tid") for e in events if _is_graph_launch(e))
    return by_thread.most_common(1)[0][0] if by_thread else None


def attribute(events: list[dict], gaps: list[tuple[float, float]], top: int) -> str:
    """Gap time summed by the innermost host event of the main thread at each gap's middle."""
    tid = main_thread(events)
    host = sorted(((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
                   if e.get("ph") == "X" and e.get("cat") in HOST_WORK and e.get("tid") == tid),
                  key=lambda h: h[0])
    starts = [h[0] for h in host]
    by_name: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for start, end in gaps:
        middle = (start + end) / 2
        covering = [h for h in host[:bisect.bisect_right(starts, middle)] if h[1] >= middle]
        name = min(covering, key=lambda h: h[1] - h[0])[2] if covering else "(no event on the main thread)"
        ours = [h for h in covering if any(w in h[2] for w in OUR_CODE)]
        if ours and ours[-1][2] != name:  # and the innermost frame of the plugin or the host around it
            name = f"{name}  <-  {min(ours, key=lambda h: h[1] - h[0])[2]}"
        by_name[name][0] += 1
        by_name[name][1] += end - start
    total = sum(end - start for start, end in gaps)
    lines = [f"  {len(gaps)} idle gaps, {total / 1000:.1f} ms; by what the main thread ran at their middle "
             f"(gaps, ms):"]
    for name, (n, t) in sorted(by_name.items(), key=lambda i: -i[1][1])[:top]:
        lines.append(f"    {n:4d} {t / 1000:7.2f}  {name[:140]}")
    return "\n".join(lines)


def profiled(fn, path: Path, stack: bool = False):
    import time
    import torch
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=stack) as prof:
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    prof.export_chrome_trace(str(path))
    return json.loads(path.read_text())["traceEvents"], wall


def run(arch: str, size: int, fraction: float, steps: int, top: int, tmp: Path) -> None:
    import torch
    import comfy.sample
    import speed
    from fisedit_engine import api
    from fisedit_engine.edit import EditSpec, run_edit

    model, _ = speed.load_model(arch)
    lat = size // 8
    latent = torch.zeros(1, 4, lat, lat)
    noise = comfy.sample.prepare_noise(latent, 0)
    negative, edited = speed.conditioning(arch, 2, size), speed.conditioning(arch, 3, size)
    with torch.inference_mode():
        def stock():
            comfy.sample.sample(model, noise, steps, 7.0, "euler", "normal", edited, negative, latent, seed=0,
                                disable_pbar=True)
        stock()
        stock_events, stock_wall = profiled(stock, tmp / "stock.json")
        handle = speed.captured_generation(model, arch, size, steps, f"timeline-{arch}", noise, negative, latent)
        spec = EditSpec(handle, edited, speed.region_mask(lat, fraction, "rect"))
        results = []

        def edit():
            results.append(run_edit(model, spec)[1])
        edit()
        edit()  # takes the steps the first kept
        edit_events, edit_wall = profiled(edit, tmp / "edit.json")
        stack_events, stack_wall = profiled(edit, tmp / "edit-stack.json", stack=True)
        kept = [r for r in results if "kept from the last edit" in (r.edit_summary or "")]
        for r in results:
            api.registry().remove(r.name)
        api.registry().remove(handle.name)
    print(f"== {arch}@{size}, {steps} euler steps, mask {100 * fraction:.0f}% rectangle "
          f"({len(kept)} of {len(results)} edits took the kept steps)")
    print(busy_report("stock sampling", stock_events, stock_wall))
    print(busy_report("edit (the kept steps)", edit_events, edit_wall))
    report_edit(edit_events, stack_events, stack_wall, top)
    del model
    torch.cuda.empty_cache()


def report_edit(edit_events: list[dict], stack_events: list[dict], stack_wall: float | None, top: int) -> None:
    gaps = idle_gaps(edit_events, 20.0)
    print(f"  GPU idle gaps of at least 20 us: {len(gaps)}, {sum(e - s for s, e in gaps) / 1000:.1f} ms")
    print(phases_report(edit_events, gaps))
    print(replays_report(edit_events))
    stack_gaps = idle_gaps(stack_events, 20.0)
    wall = "" if stack_wall is None else f" (wall {1000 * stack_wall:.1f} ms)"
    print(f"the same edit again, recording Python's stacks{wall}:")
    print(phases_report(stack_events, stack_gaps))
    print("  all gaps:")
    print(attribute(stack_events, stack_gaps, top))
    print("  the gaps between the first and the last replay's launch:")
    print(attribute(stack_events, sampling_gaps(stack_events, stack_gaps), top))
    print("  without the stacks, the gaps between the first and the last replay's launch:")
    print(attribute(edit_events, sampling_gaps(edit_events, gaps), top), flush=True)


def from_traces(folder: Path, top: int) -> None:
    """The edit's report from traces kept by --keep (no GPU needed)."""
    for trace in sorted(folder.glob("*-edit.json.gz")):
        prefix = trace.name.removesuffix("-edit.json.gz")
        print(f"== {prefix}, from {trace.parent}")
        events = json.loads(gzip.open(trace).read())["traceEvents"]
        stack = json.loads(gzip.open(folder / f"{prefix}-edit-stack.json.gz").read())["traceEvents"]
        report_edit(events, stack, None, top)


def main(argv=None) -> int:
    import argparse
    import speed
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--from-traces")
    pre.add_argument("--gaps", type=int, default=12)
    known, _ = pre.parse_known_args(argv)
    if known.from_traces:
        from_traces(Path(known.from_traces), known.gaps)
        return 0

    def arguments(parser):
        parser.add_argument("--steps", type=int, default=20)
        parser.add_argument("--gaps", type=int, default=12, help="how many names of gaps to list")
        parser.add_argument("--keep", help="a folder to keep the chrome traces in")

    def run_model(arch, size, a):
        with tempfile.TemporaryDirectory() as tmp:
            run(arch, size, a.fraction, a.steps, a.gaps, Path(tmp))
            if a.keep:
                Path(a.keep).mkdir(parents=True, exist_ok=True)
                for trace in Path(tmp).glob("*.json"):
                    kept = Path(a.keep) / f"{arch}-{size}-{trace.name}.gz"
                    with trace.open("rb") as src, gzip.open(kept, "wb") as dst:
                        shutil.copyfileobj(src, dst)
    return speed.per_model_main(argv, __doc__, "benchmarks/gpu_timeline.py profiles GPU runs", arguments,
                                run_model)


if __name__ == "__main__":
    sys.exit(main())
