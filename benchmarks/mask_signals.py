"""Collects the probe's raw difference signals on toy-world edit pairs, for tuning the automatic mask offline.

    python benchmarks/mask_signals.py --pairs 40 --probe-steps 6 --out out/mask_signals.pt

Per pair (`sample_edits(--pairs, --seed)` with benchmarks/edit_quality.py's seeds and settings; the same pairs as
its shards only where they draw as many: see benchmarks/mask_control.py): the original generation through
FISEditCacheCapture, then the probe with the edited caption (attention control as the node runs it) for
--probe-steps steps, and per probe step the edited minus the cached latent (entering and leaving the step) and
positive model output; the
original image; the clean image each run predicts at the probe's steps 4 and `--probe-steps` (decoded, the edited
run's with the cached negative branch as in the probe); the generator's true region on the latent grid.
benchmarks/mask_variants.py scores mask rules on the saved file.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT)]


def predicted_images(model, vae, source, probe, step: int, cfg: float):
    """The decoded clean image that the original run and the probe predict at `step` ([H, W, 3] each)."""
    import torch
    from fisedit_engine.comfy_adapter import COND, UNCOND
    from fisedit_engine.layout import LATENT_KEY, MODEL_OUTPUT_KEY
    sampling = model.get_model_object("model_sampling")
    sigma = torch.tensor([source.settings.sigmas[step]])
    uncond = source.read(MODEL_OUTPUT_KEY, step, UNCOND).float()
    images = []
    for x, cond in ((source.read(LATENT_KEY, step), source.read(MODEL_OUTPUT_KEY, step, COND)),
                    (probe.latents[step], probe.cond_outputs[step])):
        eps = uncond + cfg * (cond.float() - uncond)
        images.append(vae.decode(sampling.calculate_denoised(sigma, eps, x.float()))[0].float())
    return images


def captured_original(model, clip, encode, caption: str, seed: int, a, name: str):
    """The handle of a stored cache of `caption` generated at --size (euler/normal, --steps, --cfg, empty negative),
    as benchmarks/edit_quality.py generates its originals; call under torch.inference_mode()."""
    import comfy.sample
    import torch
    from fisedit_engine import api
    latent = torch.zeros(1, 4, a.size // 8, a.size // 8)
    captured, handle = api.capture(model, name)
    out = comfy.sample.sample(captured, comfy.sample.prepare_noise(latent, seed), a.steps, a.cfg, "euler", "normal",
                              encode.encode(clip, caption)[0], encode.encode(clip, "")[0], latent, seed=seed,
                              disable_pbar=True)
    api.store(handle, {"samples": out})
    return handle, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--probe-steps", type=int, default=6)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)

    import comfy_host
    import torch
    nodes = comfy_host.boot(work_dir=Path(tempfile.mkdtemp(prefix="fisedit-mask-signals-")))
    from edit_quality import _on_latent_grid, all_edits_slice
    from fisedit_engine import api, registry
    from fisedit_engine.comfy_adapter import COND
    from fisedit_engine.layout import LATENT_KEY, MODEL_OUTPUT_KEY
    from fisedit_engine.probe import run_probe
    from toyworld import comfy_models, models
    from toyworld import edits as edits_mod
    model, clip, vae, _ = comfy_models.load(models.weight_sets(ROOT / "toyworld" / "weights")["toyworld"])
    encode = nodes.CLIPTextEncode()
    edits = edits_mod.sample_edits(a.pairs, seed=a.seed)
    records = []
    for i in range(a.pairs):
        edit = all_edits_slice(edits, i)
        old, new = edit.captions()[0][0], edit.captions()[1][0]
        with torch.inference_mode():
            handle, out = captured_original(model, clip, encode, old, a.seed * 100_003 + i, a, f"mask-signals-{i}")
            source = handle.get()
            probe, _ = run_probe(model, source, encode.encode(clip, new)[0], a.probe_steps, attention_control_on=True,
                                 control_steps=api.CONTROL_STEPS)
            image = vae.decode(out)[0].float()  # [H, W, 3]
            x0_steps = sorted({min(4, a.probe_steps) - 1, a.probe_steps - 1})
            x0_original, x0_edited = zip(*(predicted_images(model, vae, source, probe, k, a.cfg) for k in x0_steps))
        # signed differences [K, C, H, W]: rules may combine them (the predicted clean latent is x - sigma * eps)
        latent_diff = torch.stack([probe.latents[k + 1][0].float() - source.read(LATENT_KEY, k + 1)[0].float()
                                   for k in range(a.probe_steps)])
        output_diff = torch.stack([probe.cond_outputs[k][0].float() - source.read(MODEL_OUTPUT_KEY, k, COND)[0].float()
                                   for k in range(a.probe_steps)])
        entering_diff = torch.stack([probe.latents[k][0].float() - source.read(LATENT_KEY, k)[0].float()
                                     for k in range(a.probe_steps)])
        truth = edit.regions(a.size)[0][0]
        records.append({"pair": i, "kind": edits_mod.EDIT_KINDS[int(edit.kind[0])], "before": old, "after": new,
                        "latent_diff": latent_diff, "output_diff": output_diff,
                        "entering_diff": entering_diff,
                        "sigmas": torch.tensor(source.settings.sigmas[:a.probe_steps + 1]),
                        "latent_scale": source.read(LATENT_KEY, 1).float().abs().sum(1).mean(),
                        "source_image": image,
                        "x0_steps": x0_steps, "x0_original": torch.stack(x0_original).half(),
                        "x0_edited": torch.stack(x0_edited).half(),
                        "truth_grid": _on_latent_grid(truth)})
        registry.registry().clear()
        print(f"pair {i} {records[-1]['kind']}: truth {float(records[-1]['truth_grid'].float().mean()):.3f}",
              flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"settings": vars(a) | {"out": str(a.out)}, "records": records}, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
