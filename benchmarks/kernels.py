"""The sparse path's fused Triton kernels against their pure-torch reference ops, on one CUDA GPU.

1. Correctness: each kernel against an fp64 oracle within 2x the reference op's own error (tests/kernel_checks.py),
   fp16 and bf16, at SD2.1@768 and SDXL@1024 level-0 shapes, border tiles included; gathers and scatters exact.
2. Timing, per model level (SD2.1@768: 96x96x320, 48x48x640, 24x24x1280; SDXL@1024: 128x128x320, 64x64x640,
   32x32x1280), tiles of 4, 5 / 15 / 30% of the level's tiles active (a centred rectangle), batch 2 (one CFG step),
   fp16 (bf16 with --dtypes): median microseconds of each op, CUDA events around every call after a warm-up, eager
   (launches included, as an eager sparse step pays them) and replayed from a CUDA graph (as the sparse step runs):
   - gather_norm: gather with halo + GroupNorm + SiLU (reference: gather_patches + group_norm_silu_patches);
   - gather_norm_conv: the same + the 3x3 conv on the stacked tiles (cuDNN), the patches stored per tile as NCHW
     (triton) or NHWC (triton_nhwc: the measure for FISEDIT's patch layout, see below);
   - scatter_bias: ResBlock's `h + emb` into the cached h; scatter_residual: `skip + out` into the output;
   - tokens_norm: SpatialTransformer's GroupNorm at the active tokens; tokens_scatter: `t + x` at the tokens;
   - resblock: a ResBlock's sparse sequence (gather_norm_conv, scatter_bias, gather_norm_conv, scatter_residual).
   The maps (input, canvases) channels-first or channels-last (`--maps`; the feed's canvases are channels-last).
3. With `--sweep`: the Triton gather and scatters under other block shapes (channels x positions per program),
   channels-last maps, replayed from a CUDA graph: what `triton_ops.GPU_BLOCKS` is chosen from.
Prints tables and writes benchmarks/results/kernels-<gpu>.json.

    python3 benchmarks/kernels.py [--dtypes fp16,bf16] [--fractions 0.05,0.15,0.3] [--iters 200] [--quick]
                                  [--maps contiguous,channels_last] [--sweep]
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402

import kernel_checks as KC  # noqa: E402
from fisedit_engine.kernels import fused  # noqa: E402
from fisedit_engine.kernels import reference as R  # noqa: E402

DEV = "cuda"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
LEVELS = {"sd21@768": [(320, 96), (640, 48), (1280, 24)], "sdxl@1024": [(320, 128), (640, 64), (1280, 32)]}
GROUPS, TILE, N, EPS = 32, 4, 2, 1e-5


# --- correctness -------------------------------------------------------------------------------------------------

def correctness(T, dtypes, models) -> list[dict]:
    rows_out = []
    for model, fraction, border in (("sd21@768", 0.05, True), ("sdxl@1024", 0.30, False)):
        if model not in models:
            continue
        c, side = LEVELS[model][0]
        plan = KC.make_plan((side, side), TILE, fraction=fraction, seed=1) if border else \
            KC.tiles_fraction_plan((side, side), TILE, fraction)
        for dname in dtypes:
            dtype = DTYPES[dname]
            case = {"model": model, "fraction": fraction, "dtype": dname}
            for kind in KC.KINDS:
                lp, rows, cols, in_hw = KC.geometry(plan, kind, DEV)
                x = KC.make_map(N, c, in_hw, dtype, DEV, seed=2, nan_outside=KC.patch_read_region(rows, cols, in_hw))
                stats, w, b = KC.norm_params(N, c, GROUPS, dtype, DEV, seed=3)
                for cl in (False, True):
                    out = T.gather_norm_patches(x, rows, cols, stats, w, b, EPS, True, channels_last=cl)
                    ref = R.gather_norm_patches(x, rows, cols, stats, w, b, EPS, True)
                    rows_out.append(_check(case, f"gather_norm[{kind}{',nhwc' if cl else ''}]", out, ref,
                                           KC.oracle_gather_norm(x, rows, cols, stats, w, b, EPS, True)))
                exact = torch.equal(T.gather_norm_patches(x, rows, cols), R.gather_patches(x, rows, cols))
                rows_out.append({**case, "op": f"gather[{kind}]", "ok": exact, "note": "bit-exact" if exact else
                                 "DIFFERS"})
            lp = plan.levels[0]
            tokens = lp.tokens(DEV)
            x = KC.make_map(N, c, (side, side), dtype, DEV, seed=4, nan_outside=lp.active)
            stats, w, b = KC.norm_params(N, c, GROUPS, dtype, DEV, seed=5)
            rows_out.append(_check(case, "tokens_norm", T.group_norm_tokens(x, tokens, stats, w, b, EPS),
                                   R.group_norm_tokens(x, tokens, stats, w, b, EPS),
                                   KC.oracle_tokens(x, tokens, stats, w, b, EPS)))
            positions, sources = lp.tile_scatter(DEV)
            tiles = KC.conv_output_tiles(N, c, lp.n_tiles, TILE, dtype, DEV, seed=6, channels_last=True)
            base = KC.make_map(N, c, (side, side), dtype, DEV, seed=7, nan_outside=lp.read)
            extras = {"none": {}, "bias": {"bias": KC.rand(N, c, seed=8, device=DEV, dtype=dtype)},
                      "residual_tiles": {"residual_tiles": KC.conv_output_tiles(N, c, lp.n_tiles, TILE, dtype, DEV,
                                                                                seed=9)},
                      "residual_map": {"residual_map": KC.make_map(N, c, (side, side), dtype, DEV, seed=10)}}
            for name, kw in extras.items():
                out = T.scatter_tiles_(base.clone(), tiles, positions, sources, **kw)
                ref = R.scatter_add_tiles_(base.clone(), tiles, positions, sources, **kw)
                rows_out.append(_check(case, f"scatter[{name}]", out, ref,
                                       KC.oracle_scatter(base, tiles, positions, sources, **kw)))
    return rows_out


def _check(case, op, out, ref, exact) -> dict:
    try:
        errs = KC.check_bound(out, ref, exact, 2.0)
        return {**case, "op": op, "ok": True, **errs}
    except AssertionError as e:
        return {**case, "op": op, "ok": False, "note": str(e), "kernel_err": KC.max_err(out, exact),
                "reference_err": KC.max_err(ref, exact)}


# --- timing ------------------------------------------------------------------------------------------------------

def level_plan(side: int, fraction: float):
    """One level of side x side with a centred rectangle of about `fraction` of its tiles."""
    return KC.tiles_fraction_plan((side, side), TILE, fraction).levels[0]


def time_eager(fn, iters: int, warmup: int) -> float:
    """Median microseconds per call; the GPU is idle before each call, so launch latency counts."""
    for _ in range(warmup):
        fn()
    if DEV == "cpu":  # --device cpu: a smoke run of this script under Triton's interpreter, not a measurement
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
        return statistics.median(times)
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def time_graph(fn, iters: int, warmup: int, repeat: int = 1) -> float | None:
    """Median microseconds per call of `fn`, captured `repeat` times in one CUDA graph (which spreads the replay's own
    launch over them; None if it cannot be captured)."""
    if DEV == "cpu":
        return None
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(repeat):
                fn()
    except Exception as e:  # reported in the table as n/a, with the reason in the JSON
        print(f"    (graph capture failed: {type(e).__name__}: {e})", flush=True)
        return None
    return time_eager(graph.replay, iters, warmup) / repeat


class LevelCase:
    """Inputs of one (level, fraction, dtype) case, shaped as the sparse ResBlock / transformer sees them."""

    def __init__(self, c, side, fraction, dtype, maps="contiguous"):
        self.c, self.side, self.dtype = c, side, dtype
        self.lp = lp = level_plan(side, fraction)
        self.rows, self.cols = lp.patch_index("conv3", DEV)
        self.positions, self.sources = lp.tile_scatter(DEV)
        self.tokens = lp.tokens(DEV)
        self.x = KC.make_map(N, c, (side, side), dtype, DEV, seed=1, layout=maps)
        self.h_canvas = KC.make_map(N, c, (side, side), dtype, DEV, seed=2, layout=maps)
        self.out_canvas = KC.make_map(N, c, (side, side), dtype, DEV, seed=3, layout=maps)
        self.stats, self.w, self.b = KC.norm_params(N, c, GROUPS, dtype, DEV, seed=4)
        self.stats2 = self.stats.clone()
        self.conv_w = (KC.rand(c, c, 3, 3, seed=5) / math.sqrt(9 * c)).to(DEV, dtype)
        self.conv_b = KC.rand(c, seed=6).to(DEV, dtype)
        self.emb = KC.rand(N, c, seed=7).to(DEV, dtype)
        self.conv_w_nhwc = self.conv_w.contiguous(memory_format=torch.channels_last)
        self.tiles_out = R.conv_patches(R.gather_norm_patches(self.x, self.rows, self.cols, self.stats, self.w,
                                                              self.b, EPS, True), self.conv_w, self.conv_b)
        self.t_tokens = KC.rand(N, len(self.tokens), c, seed=8).to(DEV, dtype).transpose(1, 2)  # as proj_out gives

    # each op: (reference, triton[, triton_nhwc])
    def ops(self, T, blocks=None):
        s = self
        K = T
        gather_blocks, scatter_blocks = blocks or (None, None)

        def ref_gn():
            return R.gather_norm_patches(s.x, s.rows, s.cols, s.stats, s.w, s.b, EPS, True)

        def tri_gn(cl=False):
            return K.gather_norm_patches(s.x, s.rows, s.cols, s.stats, s.w, s.b, EPS, True, channels_last=cl,
                                         blocks=gather_blocks)

        def conv(p, nhwc=False):
            return R.conv_patches(p, s.conv_w_nhwc if nhwc else s.conv_w, s.conv_b)

        def ref_scatter_bias():
            return R.scatter_add_tiles_(s.h_canvas, s.tiles_out + s.emb[:, :, None, None, None], s.positions,
                                        s.sources)  # the unfused ops: an add, then the scatter

        def tri_scatter_bias():
            return K.scatter_tiles_(s.h_canvas, s.tiles_out, s.positions, s.sources, bias=s.emb, blocks=scatter_blocks)

        def ref_scatter_res():
            skip = R.tiles_of(s.x, s.lp.tiles_on(DEV), TILE)
            return R.scatter_tiles_(s.out_canvas, skip + s.tiles_out, s.positions, s.sources)

        def tri_scatter_res():
            return K.scatter_tiles_(s.out_canvas, s.tiles_out, s.positions, s.sources, residual_map=s.x,
                                    blocks=scatter_blocks)

        def ref_tokens_norm():
            return R.group_norm_tokens(s.x, s.tokens, s.stats, s.w, s.b, EPS)

        def tri_tokens_norm():
            return K.group_norm_tokens(s.x, s.tokens, s.stats, s.w, s.b, EPS)

        def ref_tokens_scatter():
            x_active = s.x.flatten(2)[:, :, s.tokens]
            s.out_canvas.view(N, s.c, -1).index_copy_(2, s.tokens, s.t_tokens + x_active)

        def tri_tokens_scatter():
            K.scatter_tiles_(s.out_canvas, s.t_tokens[..., None, None], s.tokens, None, residual_map=s.x)

        def ref_resblock():
            h = conv(ref_gn()) + s.emb[:, :, None, None, None]
            R.scatter_tiles_(s.h_canvas, h, s.positions, s.sources)
            p = R.gather_norm_patches(s.h_canvas, s.rows, s.cols, s.stats2, s.w, s.b, EPS, True)
            out = conv(p)
            skip = R.tiles_of(s.x, s.lp.tiles_on(DEV), TILE)
            R.scatter_tiles_(s.out_canvas, skip + out, s.positions, s.sources)

        def tri_resblock(cl=False):
            h = conv(tri_gn(cl), cl)
            K.scatter_tiles_(s.h_canvas, h, s.positions, s.sources, bias=s.emb)
            p = K.gather_norm_patches(s.h_canvas, s.rows, s.cols, s.stats2, s.w, s.b, EPS, True, channels_last=cl)
            K.scatter_tiles_(s.out_canvas, conv(p, cl), s.positions, s.sources, residual_map=s.x)

        return {
            "gather_norm": (ref_gn, tri_gn, lambda: tri_gn(True)),
            "gather_norm_conv": (lambda: conv(ref_gn()), lambda: conv(tri_gn()), lambda: conv(tri_gn(True), True)),
            "scatter_bias": (ref_scatter_bias, tri_scatter_bias),
            "scatter_residual": (ref_scatter_res, tri_scatter_res),
            "tokens_norm": (ref_tokens_norm, tri_tokens_norm),
            "tokens_scatter": (ref_tokens_scatter, tri_tokens_scatter),
            "resblock": (ref_resblock, tri_resblock, lambda: tri_resblock(True)),
        }


def timing(T, dtypes, fractions, iters, warmup, models, maps=("contiguous",)) -> list[dict]:
    results = []
    for model in models:
        for level, (c, side) in enumerate(LEVELS[model]):
            for fraction in fractions:
                for dname, layout in ((d, m) for d in dtypes for m in maps):
                    case = LevelCase(c, side, fraction, DTYPES[dname], layout)
                    head = {"model": model, "level": level, "channels": c, "side": side, "fraction": fraction,
                            "active": round(case.lp.fraction, 4), "tiles": case.lp.n_tiles, "dtype": dname,
                            "maps": layout}
                    print(f"  {model} level {level} ({side}x{side}x{c}) {fraction:.0%} ({case.lp.n_tiles} tiles) "
                          f"{dname} {layout}", flush=True)
                    for op, fns in case.ops(T).items():
                        row = {**head, "op": op}
                        for name, fn in zip(("reference", "triton", "triton_nhwc"), fns):
                            row[f"{name}_eager_us"] = time_eager(fn, iters, warmup)
                            row[f"{name}_graph_us"] = time_graph(fn, iters, warmup)
                        results.append(row)
    return results


SWEEP_OPS = ("gather_norm", "scatter_bias", "scatter_residual", "tokens_scatter")
SWEEP_BLOCKS = ((32, 64), (64, 32), (128, 16), (64, 64), (128, 32))


def sweep(T, fractions, iters, warmup, models) -> list[dict]:
    """Graph-replay microseconds of the gather and scatters per block shape, fp16, channels-last maps."""
    results = []
    for model in models:
        for level, (c, side) in enumerate(LEVELS[model]):
            for fraction in fractions:
                case = LevelCase(c, side, fraction, torch.float16, "channels_last")
                row = {"model": model, "level": level, "channels": c, "side": side, "tiles": case.lp.n_tiles,
                       "fraction": fraction}
                for blocks in SWEEP_BLOCKS:
                    ops = case.ops(T, (blocks, blocks))
                    for op in SWEEP_OPS:
                        fn = ops[op][2] if op == "gather_norm" else ops[op][1]
                        row[f"{op} {blocks[0]}x{blocks[1]}"] = time_graph(fn, iters, warmup)
                results.append(row)
    return results


def sweep_table(rows) -> str:
    lines = ["## Block sweep (graph replay, median us; fp16, channels-last maps; blocks = channels x positions)", "",
             "| model | level | tiles | op | " + " | ".join(f"{a}x{b}" for a, b in SWEEP_BLOCKS) + " |",
             "|---|---|---|---|" + "---|" * len(SWEEP_BLOCKS)]
    for r in rows:
        for op in SWEEP_OPS:
            lines.append(f"| {r['model']} | {r['level']} ({r['side']}x{r['side']}x{r['channels']}) | {r['tiles']} | "
                         f"{op} | " + " | ".join(_fmt(r[f'{op} {a}x{b}']) for a, b in SWEEP_BLOCKS) + " |")
    return "\n".join(lines)


# --- report ------------------------------------------------------------------------------------------------------

def _fmt(v):
    return "n/a" if v is None else f"{v:.1f}"


def _ratio(a, b):
    return "n/a" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def tables(correct, timed) -> str:
    lines = ["## Correctness (kernel error vs fp64 <= 2 x reference error + 1e-6 x scale)", "",
             "| model | fraction | dtype | op | ok | kernel err | reference err |", "|---|---|---|---|---|---|---|"]
    for r in correct:
        lines.append(f"| {r['model']} | {r['fraction']} | {r['dtype']} | {r['op']} | {'yes' if r['ok'] else 'NO'} | "
                     f"{r.get('kernel_err', 0):.3g} | {r.get('reference_err', 0):.3g} |")
    lines += ["", "## Timing (median us per call; x = reference / triton)", "",
              "| model | level | active | dtype | maps | op | ref eager | triton eager | x | ref graph | triton graph "
              "| x | nhwc eager | nhwc graph |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in timed:
        lines.append(
            f"| {r['model']} | {r['level']} ({r['side']}x{r['side']}x{r['channels']}) | {r['active']:.0%} "
            f"({r['tiles']}) | {r['dtype']} | {r.get('maps', 'contiguous')} | {r['op']} | "
            f"{_fmt(r['reference_eager_us'])} | "
            f"{_fmt(r['triton_eager_us'])} | {_ratio(r['reference_eager_us'], r['triton_eager_us'])} | "
            f"{_fmt(r['reference_graph_us'])} | {_fmt(r['triton_graph_us'])} | "
            f"{_ratio(r['reference_graph_us'], r['triton_graph_us'])} | {_fmt(r.get('triton_nhwc_eager_us'))} | "
            f"{_fmt(r.get('triton_nhwc_graph_us'))} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="fp16,bf16", help="checked dtypes; timing uses the first unless --time-all")
    ap.add_argument("--time-all-dtypes", action="store_true")
    ap.add_argument("--fractions", default="0.05,0.15,0.3")
    ap.add_argument("--models", default="sd21@768,sdxl@1024")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="level 0 only, 50 iterations (a smoke run)")
    ap.add_argument("--maps", default="contiguous,channels_last", help="memory formats of the maps, comma-separated")
    ap.add_argument("--sweep", action="store_true", help="also time the gather and scatters per block shape")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the script itself on tiny shapes, under "
                                                      "TRITON_INTERPRET=1 (tests/unit/test_triton_kernels.py)")
    a = ap.parse_args(argv)
    global DEV
    DEV = a.device
    if DEV == "cpu":
        for m in LEVELS:
            LEVELS[m] = [(64, 16)]
        a.iters, a.warmup = 2, 1
    elif not torch.cuda.is_available():
        print("kernels.py needs a CUDA GPU")
        return 2
    reasons = fused.not_supported_reasons(torch.device(DEV))
    if reasons:
        print("the Triton kernels cannot run here:", "; ".join(reasons))
        return 2
    T = fused.triton_module()
    import triton
    dtypes = [d.strip() for d in a.dtypes.split(",") if d.strip()]
    fractions = [float(f) for f in a.fractions.split(",")]
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    if a.quick:
        for m in LEVELS:
            LEVELS[m] = LEVELS[m][:1]
        a.iters = 50
    gpu = torch.cuda.get_device_name() if DEV == "cuda" else "cpu-interpreter"
    t0 = time.perf_counter()
    print(f"{gpu}, torch {torch.__version__}, Triton {triton.__version__}, cudnn.benchmark "
          f"{torch.backends.cudnn.benchmark}", flush=True)
    print("correctness ...", flush=True)
    correct = correctness(T, dtypes, models)
    print("timing ...", flush=True)
    maps = [m.strip() for m in a.maps.split(",") if m.strip()]
    timed = timing(T, dtypes if a.time_all_dtypes else dtypes[:1], fractions, a.iters, a.warmup, models, maps)
    swept = sweep(T, fractions, a.iters, a.warmup, models) if a.sweep else []
    report = tables(correct, timed) + ("\n\n" + sweep_table(swept) if swept else "")
    print(report)
    failed = [r for r in correct if not r["ok"]]
    print(f"\ncorrectness: {len(correct) - len(failed)} of {len(correct)} ok; {time.perf_counter() - t0:.0f} s")
    a.out.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-").lower()
    path = a.out / f"kernels-{stem}.json"
    path.write_text(json.dumps({
        "gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark, "date": time.strftime("%Y-%m-%d %H:%M"),
        "tile": TILE, "batch_rows": N, "groups": GROUPS, "iters": a.iters, "warmup": a.warmup,
        "blocks": T.GPU_BLOCKS, "correctness": correct, "timing": timed, "sweep": swept}, indent=1))
    (a.out / f"kernels-{stem}.md").write_text(report + "\n")
    print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
