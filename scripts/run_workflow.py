"""Runs an API-format ComfyUI workflow headless, in this process, with the FISEdit plugin loaded.

    python scripts/run_workflow.py WORKFLOW.json [--models DIR] [--out DIR]

Validates the workflow first (any node error fails with ComfyUI's message), executes it, writes its outputs
(SaveImage images, SaveLatent files, saved caches) under --out, and prints a JSON summary as the last line:
{"ok": true, "nodes": {id: {"class_type", "seconds", "files"}}, "out": DIR}. Exit status 0 on success, 1 on a
validation or execution failure, 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfy_host  # noqa: E402


def _files_from_ui(ui: dict, out_dir: Path) -> list[str]:
    files = []
    for items in (ui or {}).values():
        for item in items if isinstance(items, list) else []:
            if isinstance(item, dict) and "filename" in item:
                files.append(str(out_dir / item.get("subfolder", "") / item["filename"]))
            elif isinstance(item, str) and Path(item).is_absolute():  # FISEdit nodes report saved files by path
                files.append(item)
    return files


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Run an API-format ComfyUI workflow headless with FISEdit loaded.")
    parser.add_argument("workflow", type=Path, help="API-format workflow JSON")
    parser.add_argument("--models", type=Path, action="append", default=[],
                        help="a folder searched first for checkpoints (and loras, vae); repeatable")
    parser.add_argument("--out", type=Path, default=Path("out"), help="where outputs are written (default ./out)")
    parser.add_argument("--summary", type=Path, help="also write the JSON summary to this file")
    a = parser.parse_args(argv)
    try:
        prompt = json.loads(a.workflow.read_text())
    except (OSError, json.JSONDecodeError) as e:
        print(f"error: cannot read {a.workflow}: {e}", file=sys.stderr)
        return 2
    if not isinstance(prompt, dict) or not all(isinstance(n, dict) and "class_type" in n for n in prompt.values()):
        print(f"error: {a.workflow} is not an API-format workflow (export it with 'Export (API)')", file=sys.stderr)
        return 2

    out_dir = a.out.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    comfy_host.boot(work_dir=out_dir / ".comfy")
    import folder_paths
    folder_paths.set_output_directory(str(out_dir))
    folder_paths.folder_names_and_paths["fisedit_caches"] = ([str(out_dir / "fisedit_caches")], {".safetensors"})
    for models in a.models:
        for kind in ("checkpoints", "loras", "vae"):
            comfy_host.add_model_folder(kind, models.resolve())

    t0 = time.perf_counter()
    try:
        run = comfy_host.run_prompt(prompt, prompt_id=a.workflow.stem)
    except comfy_host.WorkflowError as e:
        print(f"error: {e}", file=sys.stderr)
        print(json.dumps({"ok": False, "error": str(e)}))
        return 1
    summary = {"ok": True, "workflow": str(a.workflow), "out": str(out_dir),
               "seconds": round(time.perf_counter() - t0, 3), "nodes": {}}
    for node_id, node in prompt.items():
        summary["nodes"][node_id] = {
            "class_type": node["class_type"],
            "seconds": round(run.seconds.get(node_id, 0.0), 3),
            "files": _files_from_ui(run.ui.get(node_id), out_dir),
        }
        for text in (run.ui.get(node_id) or {}).get("text", []):  # FISEdit nodes' one-line summaries
            print(f"[{node_id} {node['class_type']}] {text}")
    if a.summary:
        a.summary.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
