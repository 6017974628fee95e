"""Speedup of the sparse step over the stock KSampler step versus edit size, one line per model (PIL only: the
benchmark machines have no matplotlib). `--against graph`: over the dense UNet replayed as one CUDA graph instead,
which the GPU alone sets (the stock step is eager, and so paced by the host: the same H200 model ran it at 24 to
37 ms on different machines).

    python benchmarks/speed_plot.py benchmarks/results/<gpu>.json [--against graph]   # <gpu>.png (<gpu>-graph.png)
"""
from __future__ import annotations

import json
from pathlib import Path

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
W, H, MARGIN = 720, 440, 60


BASELINES = {"stock": ("stock_step_ms", "stock step"), "graph": ("unet_graph_ms", "dense UNet CUDA graph")}


def plot(result: dict, path: Path, against: str = "stock") -> None:
    from PIL import Image, ImageDraw
    key, label = BASELINES[against]
    series = []
    for r in result["rows"]:
        points = sorted((s["mask_area"], r[key] / s["step_ms"]) for s in r["sparse"])
        series.append((f"{r['model']}@{r['size']}", points))
    xmax = max(x for _, pts in series for x, _ in pts) * 1.1
    ymax = max(2.0, max(y for _, pts in series for _, y in pts) * 1.15)
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)

    def at(x, y):
        return MARGIN + x / xmax * (W - 2 * MARGIN), H - MARGIN - y / ymax * (H - 2 * MARGIN)

    d.line([at(0, 0), at(xmax, 0)], fill="black")
    d.line([at(0, 0), at(0, ymax)], fill="black")
    d.line([at(0, 1), at(xmax, 1)], fill=(160, 160, 160))  # break-even with the baseline
    for i in range(6):
        x = xmax * i / 5
        d.text((at(x, 0)[0] - 10, H - MARGIN + 6), f"{100 * x:.0f}%", fill="black")
        y = ymax * i / 5
        d.text((8, at(0, y)[1] - 6), f"{y:.1f}x", fill="black")
    d.text((W // 2 - 120, H - 22), "edit size (share of the latent)", fill="black")
    d.text((MARGIN, 12), f"sparse step speedup vs {label}, {result['gpu']}", fill="black")
    for i, (name, pts) in enumerate(series):
        colour = COLOURS[i % len(COLOURS)]
        d.line([at(x, y) for x, y in pts], fill=colour, width=2)
        for x, y in pts:
            px, py = at(x, y)
            d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        d.text((W - MARGIN - 130, MARGIN + 16 * i), name, fill=colour)
    img.save(path)


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path)
    parser.add_argument("--against", choices=sorted(BASELINES), default="stock")
    a = parser.parse_args()
    suffix = "" if a.against == "stock" else f"-{a.against}"
    plot(json.loads(a.json.read_text()), a.json.with_name(f"{a.json.stem}{suffix}.png"), a.against)
