"""Host-cache bytes per sampling step for the full-size SD1.5@512, SD2.1@768 and SDXL@1024 UNets.

Runs each full-size UNet (ComfyUI's own UNetModel, built from the same configs as scripts/make_test_checkpoint.py)
once on the `meta` device with forward hooks on exactly the modules a capture records (fisedit_engine.layout), so
the figures come from the real layout without weights or compute. CFG batch (cond + uncond), batch size 1,
activations in fp16 (the model dtype on GPU), GroupNorm statistics in fp32. The cross-attention queries for attention
control are recorded for the positive chunk in the first 30% of the steps only; the table spreads them over all
steps.

    python benchmarks/cache_bytes.py [--json benchmarks/results/cache_bytes.json] [--markdown FILE]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT)]

CASES = (("SD1.5", "sd15", 512), ("SD2.1", "sd21v", 768), ("SDXL", "sdxl", 1024))
CHUNKS = 2  # cond + uncond
ACT_BYTES = 2  # fp16
# The paper's figure for its cache of SD2.1 at 768x768 (fp32, CFG batch 2): Table 2, "987 MB" per step.
PAPER_SD21_768_MB = 987


def measure(arch: str, image_size: int) -> dict:
    import torch
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from make_test_checkpoint import unet_config
    from fisedit_engine.layout import PROBE_RECORD_FRACTION, UNetLayout

    cfg = unet_config(arch)
    unet = UNetModel(**cfg, dtype=torch.float16, device="meta", operations=comfy.ops.disable_weight_init)
    layout = UNetLayout.from_unet(unet)
    h = w = image_size // 8
    sparse = layout.sparse_levels(h, w)
    targets = layout.targets(sparse)
    modules = dict(unet.named_modules())
    per_kind: dict[str, int] = {}
    hooks = []

    def account(target, tensor):
        per_row = math.prod(tensor.shape[1:])
        nbytes = per_row * CHUNKS * (8 if target.what == "stats" else ACT_BYTES)  # stats: 2 fp32 per group
        if target.what == "probe_q":  # positive chunk only, in the first 30% of the steps: averaged per step
            nbytes = per_row * ACT_BYTES * PROBE_RECORD_FRACTION
        kind = {"attn_k": "attention K/V", "attn_v": "attention K/V", "stats": "GroupNorm statistics",
                "input": "ResBlock inner h", "probe_q": "probe queries"}.get(
            target.what, "block outputs" if target.key != "out" else "model output")
        per_kind[kind] = per_kind.get(kind, 0) + nbytes

    for t in targets:
        m = modules[t.module_path]
        if t.what == "stats":
            hooks.append(m.register_forward_pre_hook(
                lambda mod, inp, t=t: account(t, torch.empty(1, mod.num_groups, 1, device="meta"))))
        elif t.what == "input":
            hooks.append(m.register_forward_pre_hook(lambda mod, inp, t=t: account(t, inp[0])))
        else:
            hooks.append(m.register_forward_hook(lambda mod, inp, out, t=t: account(t, out)))
    x = torch.empty(CHUNKS, cfg["in_channels"], h, w, dtype=torch.float16, device="meta")
    context = torch.empty(CHUNKS, 77, cfg["context_dim"], dtype=torch.float16, device="meta")
    y = torch.empty(CHUNKS, cfg["adm_in_channels"], dtype=torch.float16, device="meta") if cfg.get("adm_in_channels") else None
    with torch.no_grad():
        unet(x, torch.empty(CHUNKS, device="meta"), context=context, y=y, transformer_options={})
    for hk in hooks:
        hk.remove()
    per_kind["latent"] = cfg["in_channels"] * h * w * 4  # fp32, one per step
    sizes = layout.level_sizes(h, w)
    return {
        "latent": f"{w}x{h}", "sparse_levels": [f"{sizes[l][1]}x{sizes[l][0]}" for l in sparse],
        "dense_levels": [f"{s[1]}x{s[0]}" for i, s in enumerate(sizes) if i not in sparse],
        "recorded_tensors": len(targets) + 1, "bytes_per_step": sum(per_kind.values()), "by_kind": per_kind,
    }


def markdown(results: dict) -> str:
    kinds = ["block outputs", "ResBlock inner h", "attention K/V", "probe queries", "GroupNorm statistics",
             "model output", "latent"]
    lines = ["| model @ size | sparse levels (dense) | tensors | MiB / step | " + " | ".join(kinds) +
             " | GiB for 20 / 50 steps |", "|" + "---|" * (len(kinds) + 5)]
    for label, r in results.items():
        mib = r["bytes_per_step"] / 2**20
        lines.append(
            f"| {label} | {', '.join(r['sparse_levels'])} ({', '.join(r['dense_levels']) or '-'}) | "
            f"{r['recorded_tensors']} | {mib:.0f} | "
            + " | ".join(f"{r['by_kind'].get(k, 0) / 2**20:.1f}" for k in kinds)
            + f" | {r['bytes_per_step'] * 20 / 2**30:.1f} / {r['bytes_per_step'] * 50 / 2**30:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "cache_bytes.json")
    parser.add_argument("--markdown", type=Path, default=ROOT / "benchmarks" / "results" / "cache_bytes.md")
    a = parser.parse_args(argv)
    import comfy_host
    comfy_host.boot(load_plugin=False)
    results = {f"{name} @ {size}": measure(arch, size) for name, arch, size in CASES}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    a.markdown.write_text(
        "Host-cache bytes per sampling step (CFG: cond + uncond, batch 1, fp16 activations), from "
        "`python benchmarks/cache_bytes.py`.\n\n" + table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
