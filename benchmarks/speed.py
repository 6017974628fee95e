"""The side-by-side GPU benchmark (DESIGN.md section 6): stock ComfyUI versus FISEdit, in one run on one GPU.

Random-weight full-size models (fp16, as ComfyUI loads them on a GPU), batch 1 with CFG. Per model and size:
- per UNet call (one CFG step, 2 rows), medians over the sampling steps: the stock KSampler path (eager, timed
  around ComfyUI's apply_model), the same UNet called eagerly, and replayed as one CUDA graph;
- FISEdit's sparse step, eager and replayed as a CUDA graph, with user masks (no probe) of 5%, 15% and 30% of the
  latent, rectangular and blob-shaped; the timed call includes the step's cache upload (feed.py); and for the
  rectangles, replayed in the kept maps of a rectangle of REFIT_AREA times the area (edit.KeptEdit.refit): what a
  refit's padding costs per step;
- end to end, 20 euler steps: stock regenerate + VAE decode versus the edit (the probe, sparse sampling with its
  steps replayed, FISEditDecode; the mask a rectangle of the edit size, see `probed_edit`), warm, each edit with
  another prompt: with a new mask whose sparse steps are planned and captured (FISEDIT_REFIT=0), with a new mask
  refitted into the steps the last edit kept (edit.KeptEdit.refit; the table says where the mask did not fit and the
  steps were built instead), and with the last edit's mask (the steps that edit kept taken: fisedit_engine/warm.py);
- host cache bytes per step, bytes uploaded per sparse step and bytes read from the attention context that the
  capture kept on the GPU (fisedit_engine/resident.py), GPU peak memory of the edit versus stock, and that
  context's size (held from the capture on, within FISEDIT_RESIDENT_BUDGET).
Writes benchmarks/results/<gpu>.json, <gpu>.md and <gpu>.png (speedup versus edit size).

    python benchmarks/speed.py [--models sd15@512,sd21v@768,sd21v@1024,sdxl@1024] [--steps 20] [--fractions F,...]
                               [--no-e2e] [--min-sparse N]

`--min-sparse N` captures with another smallest sparse level (in positions; default
layout.DEFAULT_MIN_SPARSE_POSITIONS); with FISEDIT_PATCH_LAYOUT set too, runs of this script time the sparse step's
options side by side. The result's setup line names both.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT), str(ROOT / "benchmarks")]

DEFAULT_MODELS = "sd15@512,sd21v@768,sd21v@1024,sdxl@1024"
FRACTIONS = (0.05, 0.15, 0.30)
REFIT_AREA = 1.2  # the per-step rows' refit: into the maps of a rectangle this many times the mask's area
CONTEXT = {"sd15": 768, "sd15-small": 768, "sd21v": 1024, "sdxl": 2048}


def per_model_main(argv, doc: str, needs_cuda: str, add_arguments, run) -> int:
    """main() of a GPU benchmark that runs per `--models` entry (arch@size, comma-separated; default SD2.1@768 and
    SDXL@1024) and per-mask `--fraction`: parses those and what `add_arguments(parser)` adds, boots the host, stops
    with `needs_cuda` without a GPU, then calls run(arch, size, args) per model."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--models", default="sd21v@768,sdxl@1024")
    parser.add_argument("--fraction", type=float, default=0.05)
    add_arguments(parser)
    a = parser.parse_args(argv)
    import comfy_host
    comfy_host.boot()
    import torch
    if not torch.cuda.is_available():
        raise SystemExit(f"{needs_cuda}: run it on a machine with CUDA")
    for spec in a.models.split(","):
        arch, size = spec.split("@")
        run(arch, int(size), a)
    return 0


class CallTimer:
    """An APPLY_MODEL wrapper: wall time of every model call, the GPU (if any) synchronised around it."""

    def __init__(self):
        self.seconds: list[float] = []

    def __call__(self, executor, *args, **kwargs):
        import torch
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        sync()
        t0 = time.perf_counter()
        out = executor(*args, **kwargs)
        sync()
        self.seconds.append(time.perf_counter() - t0)
        return out

    def __deepcopy__(self, memo):
        return self


def load_model(arch: str):
    """MODEL and VAE of a random-weight checkpoint of `arch`, built in memory (no text encoder)."""
    import comfy.sd
    import make_test_checkpoint as mtc
    sd = {s.key: mtc.materialize(s, 0) for s in mtc.tensor_specs(arch) if mtc.part_of(s.key) in ("unet", "vae")}
    model, _, vae, _ = comfy.sd.load_state_dict_guess_config(sd, output_vae=True, output_clip=False)
    return model, vae


def conditioning(arch: str, seed: int, size: int):
    import torch
    gen = torch.Generator().manual_seed(seed)
    extras = {}
    if arch == "sdxl":
        extras = {"pooled_output": torch.randn(1, 1280, generator=gen), "width": size, "height": size}
    return [[torch.randn(1, 77, CONTEXT[arch], generator=gen), extras]]


def captured_generation(model, arch: str, size: int, steps: int, name: str, noise, negative, latent):
    """The handle of a cache `name` holding a generation with prompt seed 1 (20-step euler, cfg 7, seed 0): the
    source the GPU benchmarks edit."""
    import comfy.sample
    from fisedit_engine import api
    captured, handle = api.capture(model, name)
    api.store(handle, {"samples": comfy.sample.sample(captured, noise, steps, 7.0, "euler", "normal",
                                                      conditioning(arch, 1, size), negative, latent, seed=0,
                                                      disable_pbar=True)})
    return handle


def region_mask(lat: int, fraction: float, shape: str, shift: int = 0):
    """A latent mask of about `fraction` of the area: a centred rectangle (3:2), moved by `shift` latent pixels down
    and right (another mask of the same size: an edit cannot take the steps kept from the last edit, warm.py), or a
    disc-shaped blob."""
    import torch
    mask = torch.zeros(1, lat, lat, dtype=torch.bool)
    if shape == "rect":
        h = max(1, round(math.sqrt(fraction * lat * lat / 1.5)))
        w = max(1, round(fraction * lat * lat / h))
        r, c = (lat - h) // 2 + shift, (lat - w) // 2 + shift
        mask[:, r:r + h, c:c + w] = True
    else:
        yy, xx = torch.meshgrid(torch.arange(lat), torch.arange(lat), indexing="ij")
        radius = math.sqrt(fraction * lat * lat / math.pi)
        mask[0] = (yy - lat * 0.4) ** 2 + (xx - lat * 0.55) ** 2 <= radius ** 2
    return mask


def probed_edit(model, handle, edited, lat: int, fraction: float, shift: int = 0):
    """The edit of an automatic mask, as the end-to-end rows time it: the probe runs (FISEditDifferenceMask, mode
    auto, its time counted), and the edit replays its steps; the mask is a rectangle of `fraction` of the latent
    (region_mask). Random weights localise nothing: their automatic mask of that size scatters over the image (a 9%
    mask touched 48% of level 0's tiles at SD2.1@768), where a local edit's mask is one compact region."""
    from fisedit_engine import api
    from fisedit_engine.edit import EditSpec
    probed, _, _ = api.difference_mask(model, handle, edited, "auto", dilate=0, threshold="edit_size",
                                       edit_size=fraction)
    return EditSpec(handle, edited, region_mask(lat, fraction, "rect", shift), mode="auto", probe=probed.probe)


def unet_call_times(model, arch: str, lat: int, repeat: int, batch: int = 2) -> dict:
    """The UNet alone on one CFG step's inputs (`batch` rows: 2, or 1 as a probe step runs it): eager, and replayed
    as one CUDA graph (median ms)."""
    import torch
    import comfy.model_management as mm
    mm.load_models_gpu([model])
    unet = model.model.diffusion_model
    dtype = model.model.get_dtype()
    dev = mm.get_torch_device()
    x = torch.randn(batch, 4, lat, lat, device=dev, dtype=dtype)
    t = torch.full((batch,), 500.0, device=dev)
    context = torch.randn(batch, 77, CONTEXT[arch], device=dev, dtype=dtype)
    kwargs = ({"y": torch.randn(batch, unet.label_emb[0][0].in_features, device=dev, dtype=dtype)}
              if arch == "sdxl" else {})

    def call():
        return unet(x, timesteps=t, context=context, transformer_options={}, **kwargs)

    def median_ms(fn):
        for _ in range(3):
            fn()
        times = []
        for _ in range(repeat):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return 1000 * statistics.median(times)

    with torch.inference_mode():
        eager = median_ms(call)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                call()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            call()
        replay = median_ms(graph.replay)
        del graph
    return {"unet_eager_ms": eager, "unet_graph_ms": replay}


@contextmanager
def refit_switch(on: bool):
    """FISEDIT_REFIT set for the block (fisedit_engine/warm.py), restored after it."""
    was = os.environ.get("FISEDIT_REFIT")
    os.environ["FISEDIT_REFIT"] = "1" if on else "0"
    try:
        yield
    finally:
        if was is None:
            del os.environ["FISEDIT_REFIT"]
        else:
            os.environ["FISEDIT_REFIT"] = was


def run_case(arch: str, size: int, steps: int, repeat: int, min_sparse_positions: int, fractions=FRACTIONS,
             end_to_end: bool = True) -> dict:
    import torch
    import comfy.sample
    from fisedit_engine import api, resident
    from fisedit_engine.comfy_adapter import add_apply_model_wrapper
    from fisedit_engine.edit import EditSpec, run_edit

    model, vae = load_model(arch)
    lat = size // 8
    positive, negative = conditioning(arch, 1, size), conditioning(arch, 2, size)
    edited = conditioning(arch, 3, size)
    latent = torch.zeros(1, 4, lat, lat)
    noise = comfy.sample.prepare_noise(latent, 0)
    row = {"model": arch, "size": size, "steps": steps}
    row.update(unet_call_times(model, arch, lat, repeat))

    def timed(patcher):
        timer = CallTimer()
        patched = patcher.clone()
        add_apply_model_wrapper(patched, timer)
        return patched, timer

    def generate(patcher, cond):
        return comfy.sample.sample(patcher, noise, steps, 7.0, "euler", "normal", cond, negative, latent, seed=0,
                                   disable_pbar=True)

    with torch.inference_mode():
        stock, timer = timed(model)
        # the first sampling run of a process ran SD2.1@768's steps at 46 ms where the same process's warm stock
        # regenerate ran them under 25 (seventeenth session): time a second run
        generate(stock, positive)
        timer.seconds.clear()
        generate(stock, positive)
        row["stock_step_ms"] = 1000 * statistics.median(timer.seconds[1:])
        captured, handle = api.capture(model, f"bench-{arch}-{size}", min_sparse_positions)
        api.store(handle, {"samples": generate(captured, positive)})
        source = handle.get()
        row["cache_bytes_per_step"] = source.bytes_per_step()
        row["sparse_levels"] = list(source.settings.sparse_levels)
        # the capture's attention context kept on the GPU for the edits (fisedit_engine/resident.py)
        row["resident_bytes"] = source.resident.nbytes if source.resident is not None else 0
        row["resident_budget_bytes"] = resident.budget().limit(torch.device("cuda"))

        def refit_step_ms(fraction, mask):
            """The step of `mask` replayed in the kept maps of a rectangle of REFIT_AREA times its area, which the
            edit before it built (KeptEdit.refit); None where the mask did not refit them."""
            larger = region_mask(lat, min(1.0, fraction * REFIT_AREA), "rect")
            _, result = run_edit(model, EditSpec(handle, edited, larger), cuda_graph=True)
            api.registry().remove(result.name)
            patched, timer = timed(model)
            _, result = run_edit(patched, EditSpec(handle, edited, mask), cuda_graph=True)
            api.registry().remove(result.name)
            if "refilled with this mask" not in result.edit_summary:
                return None
            return 1000 * statistics.median(timer.seconds[2:])

        row["sparse"] = []
        for fraction in fractions:
            for shape in ("rect", "blob"):
                mask = region_mask(lat, fraction, shape)
                entry = {"fraction": fraction, "shape": shape, "mask_area": float(mask.float().mean())}
                for graph in (False, True):
                    patched, timer = timed(model)
                    _, result = run_edit(patched, EditSpec(handle, edited, mask), cuda_graph=graph)
                    assert result.name != handle.name
                    # the first sparse step builds the buffers (and the second captures the graph): not timed
                    entry["step_ms_graph" if graph else "step_ms_eager"] = 1000 * statistics.median(timer.seconds[2:])
                    entry["bytes_uploaded_per_step"] = result.feed_stats.bytes_per_step
                    entry["bytes_resident_per_step"] = (result.feed_stats.bytes_resident
                                                        / max(result.feed_stats.steps, 1))
                    entry["stage_ms_per_step" + ("_graph" if graph else "_eager")] = (
                        1000 * result.feed_stats.stage_seconds / max(result.feed_stats.steps, 1))
                    entry["graph_replays" if graph else "eager_steps"] = result.graph_replays or len(timer.seconds)
                    api.registry().remove(result.name)
                entry["step_ms"] = min(entry["step_ms_graph"], entry["step_ms_eager"])
                if shape == "rect":
                    entry["step_ms_refit"] = refit_step_ms(fraction, mask)
                row["sparse"].append(entry)

        # end to end, warm: stock regenerate + decode versus probe + sparse + FISEditDecode, each edit with another
        # prompt; an edit with the last edit's mask takes the sparse steps it kept, one with a new mask builds its own
        # or refits the kept ones (all take the probe graph the last probe kept: fisedit_engine/warm.py)
        def stock_e2e():
            return vae.decode(generate(model, edited))

        def edit_e2e(fraction, prompt_seed, shift):
            spec = probed_edit(model, handle, conditioning(arch, prompt_seed, size), lat, fraction, shift)
            samples, result = api.sparse_sample(model, spec, 0.0, "exact", 0)  # 0: the cost model's tiles
            image = api.decode(vae, samples, spec)
            return image, spec, result

        def measure(fn):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            out = fn()
            torch.cuda.synchronize()
            return out, time.perf_counter() - t0, torch.cuda.max_memory_allocated() - base

        row["e2e"] = []
        if end_to_end:
            stock_e2e()
            _, row["stock_e2e_s"], row["stock_peak_bytes"] = measure(stock_e2e)
        for fraction in fractions if end_to_end else ():
            times, refitted = {}, {}
            # warm-ups (the kernels compiled for both masks' tile sizes); a new mask built and captured; an edit with
            # the other mask, which refits the kept steps or grows them to hold both; the first mask again, refitted;
            # and the same mask once more
            for name, prompt_seed, shift, refit in (("warm-up", 3, 0, True), ("warm-up", 4, 2, True),
                                                    ("built", 5, 0, False), ("warm-up", 6, 2, True),
                                                    ("refitted", 7, 0, True), ("same", 8, 0, True)):
                with refit_switch(refit):
                    (_, spec, result), seconds, peak = measure(lambda: edit_e2e(fraction, prompt_seed, shift))
                times[name], refitted[name] = (seconds, peak), "refilled with this mask" in result.edit_summary
                if result.name != handle.name:  # an empty mask returns the source itself
                    api.registry().remove(result.name)
            (new, new_peak), (refit_s, refit_peak), (same, same_peak) = times["built"], times["refitted"], times["same"]
            row["e2e"].append({"edit_size": fraction, "mask_area": float(spec.mask.float().mean()),
                               "seconds": new, "peak_bytes": max(new_peak, refit_peak, same_peak),
                               "speedup": row["stock_e2e_s"] / new,
                               "seconds_refit": refit_s, "speedup_refit": row["stock_e2e_s"] / refit_s,
                               "refit_taken": refitted["refitted"],
                               "seconds_same_mask": same, "speedup_same_mask": row["stock_e2e_s"] / same})
        api.registry().remove(handle.name)
    del model, vae
    torch.cuda.empty_cache()
    return row


def _refit_cell(sparse: dict) -> str:
    """The per-step row's refitted step: ms, "not refitted" where the mask did not refit the larger one's maps, or
    "-" where it was not measured (blobs, earlier results)."""
    if "step_ms_refit" not in sparse:
        return "-"
    ms = sparse["step_ms_refit"]
    return "not refitted" if ms is None else f"{ms:.1f}"


def markdown(result: dict) -> str:
    lines = [f"# FISEdit speed on {result['gpu']}", "", result["setup"], "",
             "## Per UNet call (one CFG step), ms (median)", "",
             "| model | stock KSampler step | UNet eager | UNet CUDA graph | mask | FISEdit sparse step, eager | "
             "FISEdit sparse step, CUDA graph | x stock | x graph | uploaded / step | read on GPU / step | "
             f"cache / step | refitted into a {REFIT_AREA}x rectangle's maps |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        for s in r["sparse"]:
            lines.append(
                f"| {r['model']}@{r['size']} | {r['stock_step_ms']:.1f} | {r['unet_eager_ms']:.1f} | "
                f"{r['unet_graph_ms']:.1f} | {100 * s['mask_area']:.1f}% {s['shape']} | {s['step_ms_eager']:.1f} | "
                f"{s['step_ms_graph']:.1f} | "
                f"{r['stock_step_ms'] / s['step_ms']:.2f} | {r['unet_graph_ms'] / s['step_ms']:.2f} | "
                f"{s['bytes_uploaded_per_step'] / 2**20:.0f} MiB "
                f"({100 * s['bytes_uploaded_per_step'] / r['cache_bytes_per_step']:.0f}%) | "
                f"{s.get('bytes_resident_per_step', 0) / 2**20:.0f} MiB | "
                f"{r['cache_bytes_per_step'] / 2**20:.0f} MiB | {_refit_cell(s)} |")
    if not any(r["e2e"] for r in result["rows"]):  # --no-e2e
        return "\n".join(lines) + "\n"
    lines += ["", f"## End to end, {result['rows'][0]['steps']} euler steps (warm)", "",
              "Each edit with another prompt; a new mask: the sparse steps planned and captured for the edit; refitted: "
              "another mask's index maps written into the steps the last edit kept (edit.KeptEdit.refit; \"built\" "
              "where the mask did not fit them and the steps were built instead); the last edit's mask: the steps it "
              "kept taken (fisedit_engine/warm.py).", "",
              "| model | stock regenerate + decode, s | edit_size | mask | FISEdit probe + sparse + decode, s: new "
              "mask | speedup | new mask refitted, s | speedup | the last edit's mask, s | speedup | GPU peak, "
              "stock / edit | attention context on GPU (budget) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        for e in r["e2e"]:
            same = (f"{e['seconds_same_mask']:.2f} | {e['speedup_same_mask']:.2f}" if "seconds_same_mask" in e
                    else "- | -")
            refit = ("- | -" if "seconds_refit" not in e else f"{e['seconds_refit']:.2f} | {e['speedup_refit']:.2f}"
                     + ("" if e["refit_taken"] else " (built)"))
            lines.append(f"| {r['model']}@{r['size']} | {r['stock_e2e_s']:.2f} | {e['edit_size']:.0%} | "
                         f"{100 * e['mask_area']:.1f}% | {e['seconds']:.2f} | {e['speedup']:.2f} | {refit} | {same} | "
                         f"{r['stock_peak_bytes'] / 2**30:.1f} / {e['peak_bytes'] / 2**30:.1f} GiB | "
                         f"{r.get('resident_bytes', 0) / 2**30:.1f} GiB "
                         f"({r.get('resident_budget_bytes', 0) / 2**30:.0f}) |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated arch@size")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=30, help="timed UNet calls for the eager and graph medians")
    parser.add_argument("--fractions", default=",".join(map(str, FRACTIONS)), help="edit sizes (comma-separated)")
    parser.add_argument("--no-e2e", action="store_true", help="per-step rows only (no end-to-end edits)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--min-sparse", type=int, help="the smallest sparse level in positions (default: the "
                        "capture's, layout.DEFAULT_MIN_SPARSE_POSITIONS)")
    parser.add_argument("--append", type=Path, help="a JSON of an earlier run on the same GPU whose rows come first")
    a = parser.parse_args(argv)

    import comfy_host
    comfy_host.boot()
    import torch
    from fisedit_engine.kernels import fused
    from fisedit_engine.layout import DEFAULT_MIN_SPARSE_POSITIONS
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/speed.py measures GPU times: run it on a machine with CUDA")
    min_sparse = DEFAULT_MIN_SPARSE_POSITIONS if a.min_sparse is None else a.min_sparse
    gpu = torch.cuda.get_device_name()
    rows = []
    for spec in a.models.split(","):
        arch, size = spec.split("@")
        t0 = time.perf_counter()
        rows.append(run_case(arch, int(size), a.steps, a.repeat, min_sparse,
                             tuple(map(float, a.fractions.split(","))), not a.no_e2e))
        print(f"{spec}: {time.perf_counter() - t0:.0f}s", flush=True)
    if a.append is not None:
        earlier = json.loads(a.append.read_text())
        if earlier["gpu"] != gpu:
            raise SystemExit(f"{a.append} was measured on {earlier['gpu']}, not on this {gpu}")
        rows = earlier["rows"] + rows
    result = {"gpu": gpu, "rows": rows,
              "setup": f"{gpu}, torch {torch.__version__}, fp16, batch 1 with CFG, random weights; FISEdit tile sizes "
                       f"by the cost model (fisedit_engine/tile_costs.json), exact GroupNorm statistics, patch layout "
                       f"{fused.patch_layout()}, sparse levels of at least "
                       f"{min_sparse} positions"}
    a.out.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-").lower()
    (a.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (a.out / f"{stem}.md").write_text(markdown(result))
    import speed_plot
    speed_plot.plot(result, a.out / f"{stem}.png")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
