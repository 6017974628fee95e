"""Wall time of sparse sampling against stock sampling, with nothing synchronised inside the runs.

    python benchmarks/edit_wall.py [--models sd21v@768,sdxl@1024] [--fraction 0.05] [--steps 20] [--repeat 3]
                                   [--landers 2x1] [--upload-programs none]

speed.py and step_phases.py time each model call with the GPU synchronised around it, which hides whether the host
prepares a step while the GPU still runs the previous one. Here only the whole run is timed (synchronised at its
end): the stock sampler with the edited prompt, and the edit's sparse sampling (a user mask, a centred rectangle of
`--fraction` of the latent: no probe, every step replayed from the CUDA graph its first captured), median of
`--repeat` warm runs each. The edit runs three ways: as edits run, each taking the sparse steps (plan, feed, CUDA
graph) the last edit of the same mask kept (fisedit_engine/warm.py); planning and capturing its own
(FISEDIT_KEEP_GRAPHS=0: an edit with a new mask); and that way moving its cached values key by key (what a chained
edit's delta source takes; before the planned moves, every edit). `--landers SxT,...` times the edit with the kept
steps again per entry, its result's rows landing through S staging rows and T threads (capture.RowLander; the
default is capture.STAGING_SLOTS x capture.LANDING_THREADS; 2x1 was the lander before). `--upload-programs N,...`
does the same per limit on the programs of a step's upload launch (feed.UPLOAD_PROGRAMS; `none`, no limit, was the
upload before).

The defaults and these variants run in a palindrome, A B C C B A, each block a warm-up run and `--repeat` timed
ones, and each is given as the median of both its blocks with the blocks' own medians beside it: whatever drifts
during the runs (the host, the registry filling up and recycling stores) then weighs on every variant alike. Timed
one after the other, the first (the defaults) came out up to 21% slower than the same settings timed later.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT), str(ROOT / "benchmarks")]


def run(arch: str, size: int, fraction: float, steps: int, repeat: int, landers: list[str],
        upload_programs: list[str]) -> None:
    import torch
    import comfy.sample
    import speed
    from fisedit_engine import api, capture, feed
    from fisedit_engine.edit import EditSpec, run_edit
    from fisedit_engine.feed import EditFeed

    model, _ = speed.load_model(arch)
    lat = size // 8
    latent = torch.zeros(1, 4, lat, lat)
    noise = comfy.sample.prepare_noise(latent, 0)
    negative, edited = speed.conditioning(arch, 2, size), speed.conditioning(arch, 3, size)

    def timed_runs(fn) -> list[float]:
        times = []
        for _ in range(repeat + 1):  # the first run warms up
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return times[1:]

    def timed(fn) -> float:
        return statistics.median(timed_runs(fn))

    with torch.inference_mode():
        def stock():
            return comfy.sample.sample(model, noise, steps, 7.0, "euler", "normal", edited, negative, latent, seed=0,
                                       disable_pbar=True)
        stock_s = timed(stock)
        handle = speed.captured_generation(model, arch, size, steps, f"wall-{arch}", noise, negative, latent)
        spec = EditSpec(handle, edited, speed.region_mask(lat, fraction, "rect"))
        results = []

        def edit():
            _, result = run_edit(model, spec)
            results.append(result)
        settings = {"defaults": contextlib.nullcontext}
        for lander in landers:
            slots, threads = (int(n) for n in lander.split("x"))
            settings[f"{lander} landing"] = lambda s=slots, t=threads: mock.patch.multiple(
                capture, STAGING_SLOTS=s, LANDING_THREADS=t)
        for programs in upload_programs:
            settings[f"{programs} upload programs"] = lambda n=None if programs == "none" else int(programs): (
                mock.patch.object(feed, "UPLOAD_PROGRAMS", n))
        blocks = {name: [] for name in settings}
        for name in [*settings, *reversed(settings)]:
            with settings[name]():
                blocks[name].append(timed_runs(edit))
        blocks_of_defaults = blocks.pop("defaults")
        edit_s, variants = palindrome_median(blocks_of_defaults), blocks
        with mock.patch.dict(os.environ, {"FISEDIT_KEEP_GRAPHS": "0"}):
            fresh_s = timed(edit)
            with mock.patch.object(EditFeed, "_unplannable", lambda self, chunks, device: "edit_wall.py: key by key"):
                key_by_key_s = timed(edit)
        replays = results[repeat].graph_replays  # a timed run's (the warming one may warm the graph up eagerly)
        kept = results[0].get().store.nbytes  # what the edit's result keeps in (pinned) host memory
        assert results[0].feed_stats.planned_steps > 0 and results[-1].feed_stats.planned_steps == 0
        for r in results:
            api.registry().remove(r.name)
        api.registry().remove(handle.name)
    print(f"{arch}@{size}, {steps} euler steps, mask {100 * fraction:.0f}% rectangle: stock sampling {stock_s:.3f} s "
          f"({1000 * stock_s / steps:.1f} ms/step), sparse sampling {edit_s:.3f} s ({replays} steps replayed; "
          f"x{stock_s / edit_s:.2f}; rows landed by {capture.STAGING_SLOTS}x{capture.LANDING_THREADS}, "
          f"{feed.UPLOAD_PROGRAMS} upload programs; blocks {block_medians(blocks_of_defaults)}), "
          + "".join(f"with {k} {palindrome_median(v):.3f} s (x{stock_s / palindrome_median(v):.2f}; blocks "
                    f"{block_medians(v)}), " for k, v in variants.items())
          + f"planned and captured per edit {fresh_s:.3f} s (x{stock_s / fresh_s:.2f}), "
          f"moved key by key {key_by_key_s:.3f} s (x{stock_s / key_by_key_s:.2f}); the result keeps "
          f"{kept / 2**20:.0f} MiB", flush=True)
    del model
    torch.cuda.empty_cache()


def palindrome_median(blocks: list[list[float]]) -> float:
    """The median of a setting's timed runs over its blocks."""
    return statistics.median(t for block in blocks for t in block)


def block_medians(blocks: list[list[float]]) -> str:
    return "/".join(f"{statistics.median(block):.3f}" for block in blocks)


def main(argv=None) -> int:
    import speed

    def arguments(parser):
        parser.add_argument("--steps", type=int, default=20)
        parser.add_argument("--repeat", type=int, default=3)
        parser.add_argument("--landers", default="2x1", help="staging rows x landing threads, comma-separated")
        parser.add_argument("--upload-programs", default="none", help="upload launch limits, comma-separated")
    return speed.per_model_main(argv, __doc__, "benchmarks/edit_wall.py times GPU runs", arguments,
                                lambda arch, size, a: run(arch, size, a.fraction, a.steps, a.repeat,
                                                          [x for x in a.landers.split(",") if x],
                                                          [x for x in a.upload_programs.split(",") if x]))


if __name__ == "__main__":
    sys.exit(main())
