"""Prints the demo's short report from run_workflow.py's summary of workflows/edit_auto_toy_api.json (or
edit_auto_api.json, which has the same node ids): stock regenerate time versus edit time, the mask area, and where
the images are.

    python scripts/demo_report.py out/demo/summary.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

STOCK = ("23",)                 # KSampler with the edited prompt (regenerate)
STOCK_DECODE = ("24",)          # its VAEDecode
EDIT = ("14", "15")             # FISEditDifferenceMask (probe), FISEditSparseKSampler
EDIT_DECODE = ("16",)           # FISEditDecode


def main(argv=None) -> int:
    summary = json.loads(Path((argv or sys.argv[1:])[0]).read_text())
    nodes = summary["nodes"]

    def seconds(ids):
        return sum(nodes[i]["seconds"] for i in ids)

    def first_file(node_id):
        return (nodes.get(node_id, {}).get("files") or ["-"])[0]

    area = "-"
    mask_png = first_file("27")
    if mask_png != "-":
        import numpy as np
        from PIL import Image
        area = f"{100 * float((np.asarray(Image.open(mask_png).convert('L')) > 127).mean()):.1f}% of the image"
    rows = [("stock regenerate (KSampler + VAEDecode)", seconds(STOCK) + seconds(STOCK_DECODE)),
            ("FISEdit edit (probe + sparse sampler + FISEditDecode)", seconds(EDIT) + seconds(EDIT_DECODE))]
    print("\n| what | seconds |\n|---|---|")
    for name, s in rows:
        print(f"| {name} | {s:.2f} |")
    print(f"\nmask: {area}")
    for label, node_id in (("original", "9"), ("mask preview", "18"), ("edited (FISEditDecode)", "17"),
                           ("stock regenerate", "25")):
        print(f"{label}: {first_file(node_id)}")
    print("\nOn a CPU this shows the flow and the exactness (pixels outside the mask are the original's), not the"
          "\nspeed-up: the GPU benchmark measures that (README, 'Speed'). The toy model is small, and it draws 97%"
          "\nof scenes as their caption says (README, 'Toy world').")
    return 0


if __name__ == "__main__":
    sys.exit(main())
