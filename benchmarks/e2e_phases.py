"""Where an end-to-end edit's time goes on the GPU, against a stock regenerate: phase by phase, call by call.

    python benchmarks/e2e_phases.py [--model sd21v@768] [--fraction 0.05] [--steps 20] [--profile [LINES]]

The same edit as benchmarks/speed.py's end-to-end rows (the probe, sparse sampling with the probe's steps replayed,
FISEditDecode; the mask a rectangle of `--fraction`: `speed.probed_edit`) on a random-weight model, warm, each edit
with another prompt: after warm-up edits, one with a new mask (its sparse steps planned and captured, FISEDIT_REFIT=0),
one with a new mask written into the kept steps' index maps (edit.KeptEdit.refit; after an edit with the other mask
has grown them to hold both) and one with that mask again (taking the steps the last edit kept:
fisedit_engine/warm.py); the GPU synchronised at each phase's
end: the probe (FISEditDifferenceMask), the sparse sampling (with the logged reason where an edit did not take
the kept steps),
the decode; and within the sampling each model call's wall time (synchronised too), so per-edit setup, the first
eager step, the graph capture and the replays show apart. The stock regenerate is split the same way. Then
FISEditDifferenceMask alone: with attention control on and off, and with the VAE (the Otsu cut along the original
image's edges; the filter over the image's pixels timed alone too), against the plain UNet at a probe step's batch
of one, eager and replayed as a CUDA graph (on a GPU). `--profile` adds cProfile of one more edit (host
time by function, cumulative and own).
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import logging
import pstats
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT), str(ROOT / "benchmarks")]


@contextlib.contextmanager
def kept_steps_refusals():
    """Collects the edit's log lines on why it did not take the steps kept from the last edit (INFO, which the
    host's log leaves out); warnings still reach the host's log."""
    lines = []

    class Collect(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                logging.getLogger().handle(record)
            elif "not reusing" in record.getMessage():
                lines.append(record.getMessage())
    logger, handler = logging.getLogger("FISEdit"), Collect()
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])  # setLevel: it clears the loggers' cached levels
        logger.propagate = saved[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd21v@768")
    parser.add_argument("--fraction", type=float, default=0.05)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--profile", type=int, nargs="?", const=40, default=0, metavar="LINES",
                        help="cProfile one more edit; print this many functions per ordering (40)")
    a = parser.parse_args(argv)
    import comfy_host
    comfy_host.boot()
    import torch
    import comfy.sample
    import speed
    from fisedit_engine import api
    from fisedit_engine.comfy_adapter import add_apply_model_wrapper
    from fisedit_engine.decode import original_image
    from fisedit_engine.mask import along_edges, otsu_threshold

    arch, size = a.model.split("@")
    size = int(size)
    lat = size // 8
    model, vae = speed.load_model(arch)
    latent = torch.zeros(1, 4, lat, lat)
    noise = comfy.sample.prepare_noise(latent, 0)
    positive, negative, edited = (speed.conditioning(arch, seed, size) for seed in (1, 2, 3))

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def synced(fn):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        return out, time.perf_counter() - t0

    def generate(patcher, cond):
        return comfy.sample.sample(patcher, noise, a.steps, 7.0, "euler", "normal", cond, negative, latent, seed=0,
                                   disable_pbar=True)

    class CallTimer:
        """APPLY_MODEL wrapper: each model call's wall time, synchronised."""
        def __init__(self):
            self.seconds = []

        def __deepcopy__(self, memo):
            return self

        def __call__(self, executor, *args, **kwargs):
            out, seconds = synced(lambda: executor(*args, **kwargs))
            self.seconds.append(seconds)
            return out

    def timed(patcher):
        timer = CallTimer()
        patched = patcher.clone()
        add_apply_model_wrapper(patched, timer)
        return patched, timer

    def stock():
        samples, t_sample = synced(lambda: generate(model, edited))
        _, t_decode = synced(lambda: vae.decode(samples))
        return {"sample": t_sample, "decode": t_decode}

    def edit(patcher, prompt_seed, shift):
        prompt = speed.conditioning(arch, prompt_seed, size)
        spec, t_mask = synced(lambda: speed.probed_edit(patcher, handle, prompt, lat, a.fraction, shift))
        with kept_steps_refusals() as refusals:
            (samples, result), t_sample = synced(lambda: api.sparse_sample(patcher, spec, 0.0, "exact", 0))
        _, t_decode = synced(lambda: api.decode(vae, samples, spec))
        if result.name != handle.name:
            api.registry().remove(result.name)
        return {"mask (probe)": t_mask, "probe inside": spec.probe.seconds, "sparse sampling": t_sample,
                "decode": t_decode}, result, refusals

    with torch.inference_mode():
        captured, handle = api.capture(model, "e2e-phases")
        api.store(handle, {"samples": generate(captured, positive)})
        for _ in range(3):
            stock_phases = stock()
        patched, timer = timed(model)
        runs = {}
        # the warm-ups compile the kernels for both masks' tile sizes (the cost model may choose others for each)
        for name, prompt_seed, shift, refit in (("warm-up", 3, 2, True), ("warm-up", 4, 0, True),
                                                ("new mask", 5, 2, False), ("warm-up", 6, 0, True),
                                                ("new mask, refitted", 7, 2, True), ("the last edit's mask", 8, 2, True)):
            timer.seconds.clear()
            with speed.refit_switch(refit):
                runs[name] = (*edit(patched, prompt_seed, shift), list(timer.seconds))
        del runs["warm-up"]
        probe_alone = {}
        for control in (True, False, True, False):  # the second of each: warm
            timer.seconds.clear()
            spec, seconds = synced(lambda: api.difference_mask(patched, handle, edited, "auto", dilate=0,
                                                               threshold="edit_size", edit_size=a.fraction,
                                                               attention_control=control)[0])
            probe_alone[control] = (spec.probe.steps, spec.probe.seconds, seconds, list(timer.seconds))
        # With the VAE the Otsu cut follows the original image's edges; the edit above has decoded the original
        # already (it is kept with the cache), so this adds the filter over the image's pixels to the probe
        for _ in range(2):
            spec, edges_seconds = synced(lambda: api.difference_mask(model, handle, edited, "auto", dilate=0,
                                                                     vae=vae)[0])
        device = torch.device(model.load_device)
        diff, image = spec.probe.edit_map[0].to(device), original_image(vae, handle.get())[0].to(device)
        for _ in range(2):
            _, filter_seconds = synced(lambda: along_edges(diff, image, otsu_threshold(diff)))
        edges = (spec.probe.seconds, edges_seconds, filter_seconds, tuple(image.shape[:2]))
        # what a probe step's replay would cost without attention control and word attention: the plain UNet
        unet_alone = speed.unet_call_times(model, arch, lat, 30, batch=1) if torch.cuda.is_available() else None
        profile_text = ""
        if a.profile:
            prof = cProfile.Profile()
            prof.enable()
            edit(model, 7, 0)  # a new mask
            sync()
            prof.disable()
            for key in ("cumulative", "tottime"):
                stream = io.StringIO()
                pstats.Stats(prof, stream=stream).sort_stats(key).print_stats(a.profile)
                profile_text += stream.getvalue()[:300 * a.profile]

    stock_total = sum(stock_phases.values())
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"{device}, {a.model}, {a.steps} euler steps, mask {a.fraction:.0%}")
    print(f"stock regenerate + decode: {stock_total:.3f} s  " + ", ".join(f"{k} {v:.3f}" for k, v in stock_phases.items()))
    for name, (edit_phases, result, refusals, calls) in runs.items():
        edit_total = sum(v for k, v in edit_phases.items() if k != "probe inside")
        print(f"FISEdit edit, {name}: {edit_total:.3f} s ({stock_total / edit_total:.2f}x)  "
              + ", ".join(f"{k} {v:.3f}" for k, v in edit_phases.items()))
        print(f"  {result.edit_summary}")
        for refusal in refusals:  # why a new mask did not refit (the summary says where it did)
            print(f"  {refusal}")
        fs = result.feed_stats
        print(f"  feed: {fs.steps} steps staged, {fs.bytes_per_step / 2**20:.1f} MiB uploaded per step, host staging "
              f"{1000 * fs.stage_seconds / max(fs.steps, 1):.2f} ms per step, {fs.host_gathers} maps gathered on the "
              f"host")
        print(f"  model calls during the edit ({len(calls)}; synchronised, ms): "
              + " ".join(f"{1000 * s:.1f}" for s in calls))
        if len(calls) > 4:
            print(f"  median of the last {len(calls) - 4}: {1000 * statistics.median(calls[4:]):.1f} ms; "
                  f"sum of all calls {sum(calls):.3f} s")
    for control, (steps, probe_s, total_s, calls) in probe_alone.items():
        print(f"FISEditDifferenceMask alone, attention control {'on' if control else 'off'}: {total_s:.3f} s "
              f"(probe {probe_s:.3f} s, {1000 * probe_s / steps:.1f} ms per probe step; model calls, synchronised: "
              + " ".join(f"{1000 * s:.1f}" for s in calls) + " ms)")
    if unet_alone is not None:
        print(f"the UNet alone, a probe step's batch of 1 (speed.unet_call_times): eager "
              f"{unet_alone['unet_eager_ms']:.1f} ms, one CUDA-graph replay {unet_alone['unet_graph_ms']:.1f} ms")
    probe_s, total_s, filter_s, (h, w) = edges
    print(f"FISEditDifferenceMask alone, otsu along the original image's edges (vae): {total_s:.3f} s (probe "
          f"{probe_s:.3f} s; the edge filter over {w}x{h} pixels alone {1000 * filter_s:.1f} ms)")
    print(profile_text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
