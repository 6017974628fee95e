"""PNG figures with Pillow alone (matplotlib is not among the host's packages): loss curves and image grids."""
from __future__ import annotations

import math
from pathlib import Path

import torch

COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189))


def image_grid(images: torch.Tensor, path: str | Path, columns: int = 8, pad: int = 2) -> None:
    """images: [N, 3, H, W] in 0..1."""
    from PIL import Image
    n, _, h, w = images.shape
    rows = math.ceil(n / columns)
    canvas = torch.ones(3, rows * (h + pad) + pad, columns * (w + pad) + pad)
    for i in range(n):
        r, c = divmod(i, columns)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        canvas[:, y:y + h, x:x + w] = images[i].float().cpu()
    array = (canvas.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(array).save(str(path))


def loss_curves(curves: dict[str, list[tuple[int, float]]], path: str | Path, width: int = 900,
                panel_height: int = 260) -> None:
    """One panel per curve (each stage has its own step axis), log-scaled loss."""
    from PIL import Image, ImageDraw
    names = [k for k, v in curves.items() if v]
    height = max(1, len(names)) * panel_height
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 70, 20, 28, 36
    for i, name in enumerate(names):
        pts = [(s, v) for s, v in curves[name] if v > 0 and math.isfinite(v)]
        y0 = i * panel_height
        box = (left, y0 + top, width - right, y0 + panel_height - bottom)
        draw.rectangle(box, outline=(0, 0, 0))
        draw.text((left, y0 + 8), f"{name}: loss (log scale) vs step", fill=(0, 0, 0))
        if not pts:
            continue
        s_min, s_max = pts[0][0], max(pts[-1][0], pts[0][0] + 1)
        lv = [math.log10(v) for _, v in pts]
        l_min, l_max = min(lv), max(max(lv), min(lv) + 1e-3)
        xy = [(box[0] + (s - s_min) / (s_max - s_min) * (box[2] - box[0]),
               box[3] - (math.log10(v) - l_min) / (l_max - l_min) * (box[3] - box[1])) for s, v in pts]
        draw.line(xy, fill=COLOURS[i % len(COLOURS)], width=2)
        for frac in (0.0, 0.5, 1.0):
            lvl = l_min + frac * (l_max - l_min)
            y = box[3] - frac * (box[3] - box[1])
            draw.text((4, y - 6), f"{10 ** lvl:.3g}", fill=(0, 0, 0))
        draw.text((box[0], box[3] + 6), str(s_min), fill=(0, 0, 0))
        draw.text((box[2] - 40, box[3] + 6), str(pts[-1][0]), fill=(0, 0, 0))
    img.save(str(path))
