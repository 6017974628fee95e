"""What a ComfyUI user meets on the nodes, on the real host with the plugin loaded: tooltips on every input and
output, stable input names, order, types and defaults (saved UI workflows fill widgets by position), the same nodes
through the V1 and the V3 node API, progress bars through ComfyUI's own progress hook, one summary log line per
edit with a speed-up estimate, and errors that say what to do."""
from __future__ import annotations

import logging
import re
import sys

import pytest
import torch

import comfy_host
import tiny_models
from node_api import combo_options, run_node

H, W, STEPS, PROBE = 16, 24, 4, 2
PLUGIN_MODULE = f"custom_nodes.{comfy_host.PLUGIN_LINK_NAME}"

# The contract saved workflows rely on: per node, its inputs (section, name, type, default) in widget order, and its
# outputs (type, name). A change here breaks users' UI-format workflows.
CONTRACT = {
    "FISEditCacheCapture": ([("required", "model", "MODEL", None), ("required", "cache_name", "STRING", "")],
                            [("MODEL", "model"), ("FISEDIT_CACHE", "cache")]),
    "FISEditCacheStore": ([("required", "cache", "FISEDIT_CACHE", None), ("required", "latent", "LATENT", None),
                           ("optional", "save_path", "STRING", "")],
                          [("FISEDIT_CACHE", "cache")]),
    "FISEditCacheLoad": ([("required", "cache_file", "COMBO", None)], [("FISEDIT_CACHE", "cache")]),
    "FISEditDifferenceMask": ([("required", "model", "MODEL", None), ("required", "cache", "FISEDIT_CACHE", None),
                               ("required", "positive", "CONDITIONING", None),
                               ("required", "mask_mode", "COMBO", "auto"), ("required", "probe_steps", "INT", 0),
                               ("required", "threshold", "COMBO", "otsu"), ("required", "edit_size", "FLOAT", 0.15),
                               ("required", "dilate", "INT", 1), ("required", "attention_control", "BOOLEAN", True),
                               ("optional", "user_mask", "MASK", None), ("optional", "vae", "VAE", None),
                               ("optional", "attention_control_steps", "INT", 1),
                               ("optional", "word_attention", "BOOLEAN", True)],
                              [("FISEDIT_EDIT", "edit"), ("MASK", "mask"), ("IMAGE", "preview")]),
    "FISEditSparseKSampler": ([("required", "model", "MODEL", None), ("required", "edit", "FISEDIT_EDIT", None),
                               ("optional", "dense_tail", "FLOAT", 0.0), ("optional", "gn_statistics", "COMBO", "exact"),
                               ("optional", "tile_size", "INT", 0)],
                              [("LATENT", "latent"), ("FISEDIT_CACHE", "cache")]),
    "FISEditDecode": ([("required", "vae", "VAE", None), ("required", "samples", "LATENT", None),
                       ("required", "edit", "FISEDIT_EDIT", None)], [("IMAGE", "image")]),
    "FISEditToyModelLoader": ([("optional", "weights", "COMBO", "toyworld")],
                              [("MODEL", "model"), ("CLIP", "clip"), ("VAE", "vae")]),
}


def object_info(cls, node_id: str, display_names: dict) -> dict:
    """What the server's /object_info serves for a node class (server.py's node_info, both APIs)."""
    from comfy_api.internal import _ComfyNodeInternal
    if issubclass(cls, _ComfyNodeInternal):
        return cls.GET_NODE_INFO_V1()
    inputs = cls.INPUT_TYPES()
    return {"input": inputs, "input_order": {k: list(v) for k, v in inputs.items()}, "output": list(cls.RETURN_TYPES),
            "output_name": list(cls.RETURN_NAMES), "output_tooltips": list(cls.OUTPUT_TOOLTIPS), "name": node_id,
            "display_name": display_names.get(node_id, node_id), "description": cls.DESCRIPTION,
            "category": cls.CATEGORY, "output_node": bool(getattr(cls, "OUTPUT_NODE", False))}


def widget(entry: tuple) -> dict:
    """An input's type and widget settings, in a form both APIs share (V3 writes combos and strings differently)."""
    extra = entry[1] if len(entry) > 1 else {}
    choices = combo_options(entry)
    return {"type": "COMBO" if choices is not None else entry[0], "options": choices,
            **{k: extra.get(k) for k in ("default", "min", "max", "step", "tooltip")}}


def ours(host) -> dict:
    return {k: c for k, c in host.NODE_CLASS_MAPPINGS.items()
            if getattr(c, "RELATIVE_PYTHON_MODULE", None) == PLUGIN_MODULE}


def plugin_package():
    return sys.modules[str(comfy_host._plugin_link()).replace(".", "_x_")]


# ---------------------------------------------------------------- tooltips, contract, V1 = V3


def test_every_input_and_output_of_every_node_has_a_tooltip(host):
    registered = ours(host)
    assert set(registered) == set(CONTRACT)
    missing = []
    for node_id, cls in registered.items():
        info = object_info(cls, node_id, host.NODE_DISPLAY_NAME_MAPPINGS)
        if len(info["description"] or "") < 40:
            missing.append(f"{node_id}: description")
        for section in ("required", "optional"):
            for name, entry in info["input"].get(section, {}).items():
                if len((entry[1] if len(entry) > 1 else {}).get("tooltip") or "") < 15:
                    missing.append(f"{node_id}.{name}")
        tips = info.get("output_tooltips") or []
        if len(tips) != len(info["output"]) or not all(t and len(t) >= 15 for t in tips):
            missing.append(f"{node_id}: output tooltips {tips}")
        assert info["category"] == "FISEdit"
    assert missing == []


def test_inputs_and_outputs_keep_their_names_order_types_and_defaults(host):
    for node_id, cls in ours(host).items():
        info = object_info(cls, node_id, host.NODE_DISPLAY_NAME_MAPPINGS)
        inputs = [(section, name, widget(entry)["type"], widget(entry)["default"])
                  for section in ("required", "optional") for name, entry in info["input"].get(section, {}).items()]
        outputs = list(zip(info["output"], info["output_name"]))
        assert (inputs, outputs) == CONTRACT[node_id], node_id
        assert info["input_order"].get("required", []) == [n for s, n, _, _ in inputs if s == "required"]


def test_v1_and_v3_classes_present_the_same_nodes(host):
    import nodes as _  # noqa: F401  (the host is booted)
    from fisedit_engine import comfy_adapter
    package = plugin_package()
    if comfy_adapter.v3_node_api() is None:
        pytest.skip("this ComfyUI has no V3 node API: only the V1 classes exist")
    v1, v3, names = package._nodes.v1_classes(), package._nodes.v3_classes(), package._nodes.display_names()
    assert list(v1) == list(v3) == list(CONTRACT)
    for node_id in CONTRACT:
        a, b = object_info(v1[node_id], node_id, names), object_info(v3[node_id], node_id, names)
        for key in ("name", "display_name", "description", "category", "output", "output_name", "output_tooltips",
                    "output_node"):
            assert list(a[key]) == list(b[key]) if isinstance(a[key], (list, tuple)) else a[key] == b[key], key
        for section in ("required", "optional"):
            assert a["input_order"].get(section, []) == b["input_order"].get(section, []), (node_id, section)
            for name, entry in a["input"].get(section, {}).items():
                assert widget(entry) == widget(b["input"][section][name]), (node_id, name)
        # V3 adds PROMPT and EXTRA_PNGINFO to output nodes; nothing else may differ
        assert set(a["input"].get("hidden", {})) <= set(b["input"].get("hidden", {})), node_id


def test_the_plugin_registers_v3_where_the_host_has_it_and_v1_when_asked(host, tmp_path, monkeypatch):
    from comfy_api.internal import _ComfyNodeInternal
    from fisedit_engine import comfy_adapter
    package = plugin_package()
    on_v3 = comfy_adapter.v3_node_api() is not None
    assert hasattr(package, "comfy_entrypoint") == on_v3 and hasattr(package, "NODE_CLASS_MAPPINGS") != on_v3
    assert all(issubclass(c, _ComfyNodeInternal) == on_v3 for c in ours(host).values())

    # the same plugin loaded by ComfyUI's loader with FISEDIT_NODE_API=v1 (under another folder name, its IDs ignored
    # so that the registered nodes stay): V1 mappings only, the same IDs
    import asyncio
    link = tmp_path / "fisedit_v1"
    link.symlink_to(comfy_host.REPO_ROOT, target_is_directory=True)
    monkeypatch.setenv("FISEDIT_NODE_API", "v1")
    monkeypatch.setattr(sys, "path", list(sys.path))  # the plugin appends its folder: here the temporary link
    monkeypatch.setattr(host, "LOADED_MODULE_DIRS", dict(host.LOADED_MODULE_DIRS))
    before = dict(host.NODE_CLASS_MAPPINGS)
    name = str(link).replace(".", "_x_")
    try:
        assert asyncio.run(host.load_custom_node(str(link), ignore=set(host.NODE_CLASS_MAPPINGS)))
        assert host.NODE_CLASS_MAPPINGS == before
        v1_module = sys.modules[name]
        assert not hasattr(v1_module, "comfy_entrypoint")
        assert list(v1_module.NODE_CLASS_MAPPINGS) == list(CONTRACT)
        assert not any(issubclass(c, _ComfyNodeInternal) for c in v1_module.NODE_CLASS_MAPPINGS.values())
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]

    monkeypatch.setenv("FISEDIT_NODE_API", "v2")
    with pytest.raises(ValueError, match="set it to 'v1' or 'v3'"):
        package._nodes.node_api()


def toy_prompt(mask_mode: str = "auto") -> dict:
    """The toy auto-mask edit, small: 128x128, 4 steps, 1 probe step."""
    text = "a large red circle at the top left and a small blue square on the right, on a striped background"
    return {
        "1": {"class_type": "FISEditToyModelLoader", "inputs": {"weights": "toyworld"}},
        "2": {"class_type": "FISEditCacheCapture", "inputs": {"model": ["1", 0], "cache_name": "node-api"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["1", 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "positive": ["3", 0], "negative": ["4", 0],
                                                   "latent_image": ["5", 0], "seed": 7, "steps": 4, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "7": {"class_type": "FISEditCacheStore", "inputs": {"cache": ["2", 1], "latent": ["6", 0]}},
        "10": {"class_type": "CLIPTextEncode", "inputs": {"text": text.replace("blue", "green"), "clip": ["1", 1]}},
        "14": {"class_type": "FISEditDifferenceMask", "inputs": {
            "model": ["1", 0], "cache": ["7", 0], "positive": ["10", 0], "mask_mode": mask_mode, "dilate": 1,
            "probe_steps": 1, "threshold": "edit_size", "edit_size": 0.2, "attention_control": True}},
        "15": {"class_type": "FISEditSparseKSampler", "inputs": {"model": ["1", 0], "edit": ["14", 0]}},
        "16": {"class_type": "FISEditDecode", "inputs": {"vae": ["1", 2], "samples": ["15", 0], "edit": ["14", 0]}},
        "17": {"class_type": "PreviewImage", "inputs": {"images": ["16", 0]}},
    }


def test_a_workflow_runs_the_same_through_v1_and_v3_classes(host, monkeypatch):
    """The executor runs both registrations to the same latent and image; a combo value outside its list is refused
    before anything runs, by both (the pinned host checks only V1 combos itself; the V3 classes check theirs)."""
    from fisedit_engine import comfy_adapter
    if comfy_adapter.v3_node_api() is None:
        pytest.skip("this ComfyUI has no V3 node API")
    package = plugin_package()
    results = {}
    for api, classes in (("v3", package._nodes.v3_classes()), ("v1", package._nodes.v1_classes())):
        for node_id, cls in classes.items():
            cls.RELATIVE_PYTHON_MODULE = PLUGIN_MODULE
            monkeypatch.setitem(host.NODE_CLASS_MAPPINGS, node_id, cls)
        run = comfy_host.run_prompt(toy_prompt(), prompt_id=f"node-api-{api}")
        results[api] = (run.outputs["15"][0][0]["samples"], run.outputs["16"][0][0], run.outputs["14"][1][0])
        with pytest.raises(comfy_host.WorkflowError, match="mask_mode"):
            comfy_host.validate(toy_prompt(mask_mode="everywhere"))
    for a, b in zip(results["v1"], results["v3"]):
        assert torch.equal(a, b)
    assert 0 < float(results["v3"][2].mean()) < 1  # a real edit region, neither empty nor everything


# ---------------------------------------------------------------- progress, summary line, errors


@pytest.fixture(scope="module")
def model(host):
    return tiny_models.build("sd15", seed=1)


def conditioning(seed: int):
    return tiny_models.conditioning("sd15", seed)


@pytest.fixture
def progress_calls(host, monkeypatch):
    """Every call of ComfyUI's global progress-bar hook (what the server forwards to the UI) during the test. Newer
    hosts (v0.33) throttle the hook to one update per 100 ms; the throttle is off here, so that every update the bar
    gets reaches the hook."""
    import comfy.utils
    if hasattr(comfy.utils, "PROGRESS_THROTTLE_MIN_INTERVAL"):
        monkeypatch.setattr(comfy.utils, "PROGRESS_THROTTLE_MIN_INTERVAL", 0.0)
    calls, previous = [], comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: calls.append((value, total)))
    try:
        yield calls
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)


@pytest.fixture(scope="module")
def source(host, model):
    """A sealed cache of a 4-step euler generation, captured through the registered nodes and a stock KSampler."""
    (captured, handle), _ = run_node(host.NODE_CLASS_MAPPINGS["FISEditCacheCapture"], model=model,
                                     cache_name="node-experience")
    latent = {"samples": torch.zeros(1, 4, H, W)}
    with torch.inference_mode():
        out = host.common_ksampler(captured, 3, STEPS, 7.0, "euler", "normal", conditioning(11), conditioning(12),
                                   latent)[0]
    (sealed,), _ = run_node(host.NODE_CLASS_MAPPINGS["FISEditCacheStore"], cache=handle, latent=out)
    return sealed


def test_capture_shows_progress_through_the_samplers_own_bar(host, model, progress_calls):
    """Capture records inside the sampler's steps: KSampler's own bar counts them on its node, and FISEdit adds no
    second bar there (two bars on one node would jump between their totals)."""
    (captured, handle), _ = run_node(host.NODE_CLASS_MAPPINGS["FISEditCacheCapture"], model=model,
                                     cache_name="node-experience-progress")
    with torch.inference_mode():
        out = host.common_ksampler(captured, 5, STEPS, 7.0, "euler", "normal", conditioning(11), conditioning(12),
                                   {"samples": torch.zeros(1, 4, H, W)})[0]
    assert progress_calls == [(i, STEPS) for i in range(1, STEPS + 1)]
    run_node(host.NODE_CLASS_MAPPINGS["FISEditCacheStore"], cache=handle, latent=out)  # the recording is complete


def auto_edit(host, model, source, prompt_seed: int):
    with torch.inference_mode():
        (edit, mask, _), _ = run_node(host.NODE_CLASS_MAPPINGS["FISEditDifferenceMask"], model=model, cache=source,
                                      positive=conditioning(prompt_seed), mask_mode="auto", probe_steps=PROBE,
                                      threshold="edit_size", edit_size=0.5, dilate=1, attention_control=False)
    return edit, mask


def test_probe_and_sparse_sampling_report_each_step(host, model, source, progress_calls):
    edit, mask = auto_edit(host, model, source, prompt_seed=99)
    assert progress_calls == [(1, PROBE), (2, PROBE)]
    assert 0 < float(mask.mean()) < 1
    progress_calls.clear()
    with torch.inference_mode():
        run_node(host.NODE_CLASS_MAPPINGS["FISEditSparseKSampler"], model=model, edit=edit)
    # the sampler's bar over all steps; the replayed probe steps pass at once
    assert progress_calls == [(i, STEPS) for i in range(1, STEPS + 1)]


def test_an_empty_edit_fills_the_bar_at_once(host, model, source, progress_calls):
    edit, mask = auto_edit(host, model, source, prompt_seed=11)  # the cached prompt: nothing changes
    assert float(mask.mean()) == 0
    progress_calls.clear()
    with torch.inference_mode():
        _, ui = run_node(host.NODE_CLASS_MAPPINGS["FISEditSparseKSampler"], model=model, edit=edit)
    assert progress_calls == [(STEPS, STEPS)]
    assert "the mask is empty" in ui["text"][0]


SUMMARY = re.compile(r"FISEdit edit of '[^']+': mask (?P<area>[\d.]+)% of the latent; (?P<steps>\d+) steps: "
                     r"(?P<probe>\d+) probe \(replayed\), (?P<sparse>\d+) sparse, (?P<dense>\d+) dense; "
                     r"(?P<total>[\d.]+) s \(probe (?P<probe_s>[\d.]+) s, sampling (?P<sampling_s>[\d.]+) s\); "
                     r"estimated speed-up (?P<speedup>[\d.]+)x over regenerating \(a sparse step computes "
                     r"(?P<fraction>\d+)% of a dense step's MACs\); ")


def edit_with_user_box(host, model, source, box, dense_tail=0.0):
    mask = torch.zeros(1, H * 8, W * 8)
    mask[:, box[0] * 8:box[1] * 8, box[2] * 8:box[3] * 8] = 1.0
    with torch.inference_mode():
        (edit, image_mask, _), _ = run_node(host.NODE_CLASS_MAPPINGS["FISEditDifferenceMask"], model=model,
                                            cache=source, positive=conditioning(99), mask_mode="user", probe_steps=0,
                                            threshold="otsu", edit_size=0.15, dilate=0, attention_control=False,
                                            user_mask=mask)
        run_node(host.NODE_CLASS_MAPPINGS["FISEditSparseKSampler"], model=model, edit=edit, dense_tail=dense_tail)
    return image_mask


@pytest.mark.parametrize("box, dense_tail", [((0, 4, 0, 4), 0.0), ((0, 4, 0, 4), 0.5), ((0, H, 0, W), 0.0)])
def test_one_summary_line_per_edit(host, model, source, caplog, box, dense_tail):
    with caplog.at_level(logging.INFO, logger="FISEdit"):
        image_mask = edit_with_user_box(host, model, source, box, dense_tail)
    lines = [r.getMessage() for r in caplog.records if r.name == "FISEdit" and "FISEdit edit of" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]
    m = SUMMARY.match(lines[0])
    assert m, lines[0]
    assert float(m["area"]) == pytest.approx(100 * float(image_mask.mean()), abs=0.05)
    dense = round(dense_tail * STEPS)
    assert (int(m["steps"]), int(m["probe"]), int(m["sparse"]), int(m["dense"])) == (STEPS, 0, STEPS - dense, dense)
    assert float(m["total"]) == pytest.approx(float(m["probe_s"]) + float(m["sampling_s"]), abs=0.011)
    fraction, speedup = int(m["fraction"]) / 100, float(m["speedup"])
    if box == (0, H, 0, W):  # everything recomputed: no saving
        assert fraction == 1.0 and speedup == 1.0
    else:  # a 4x4 box of a 16x24 latent, tiles of 4: a sixth of the sparse level's positions at most
        assert fraction < 0.5
        assert speedup == pytest.approx(STEPS / ((STEPS - dense) * fraction + dense), rel=0.05)


def test_the_mac_count_matches_torch_flop_counter(host, model):
    """The estimate's dense count against PyTorch's FLOP counter on a dense UNet call (attention through SDPA's math
    backend, which the counter sees as matrix products)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    from fisedit_engine import cost
    from fisedit_engine.layout import UNetLayout
    unet = model.model.diffusion_model
    layout = UNetLayout.from_unet(unet)
    context = conditioning(1)[0][0]
    costs = cost.level_costs(unet, layout, layout.level_sizes(H, W), context.shape[1])
    estimate = sum(c.macs(c.positions) for c in costs.values())
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        unet(torch.randn(1, 4, H, W), torch.tensor([500.0]), context=context)
    assert estimate == pytest.approx(counter.get_total_flops() / 2, rel=0.01)


def test_errors_name_the_fix(host, model, source, tmp_path):
    from fisedit_engine.cache import CacheError
    nodes = host.NODE_CLASS_MAPPINGS
    latent = {"samples": torch.zeros(1, 4, H, W)}
    with pytest.raises(CacheError, match="connect the FISEDIT_CACHE output of FISEditCacheCapture"):
        run_node(nodes["FISEditCacheStore"], cache=latent, latent=latent)
    with pytest.raises(CacheError, match="connect the FISEDIT_CACHE output of FISEditCacheStore or FISEditCacheLoad"):
        run_node(nodes["FISEditDifferenceMask"], model=model, cache=latent, positive=conditioning(99),
                 mask_mode="user", probe_steps=0, threshold="otsu", edit_size=0.15, dilate=1,
                 attention_control=False)
    with pytest.raises(CacheError, match="connect the FISEDIT_EDIT output of FISEditDifferenceMask"):
        run_node(nodes["FISEditSparseKSampler"], model=model, edit=source)
    with pytest.raises(CacheError, match="needs a user_mask: connect a MASK"):
        run_node(nodes["FISEditDifferenceMask"], model=model, cache=source, positive=conditioning(99),
                 mask_mode="user", probe_steps=0, threshold="otsu", edit_size=0.15, dilate=1,
                 attention_control=False)
    with pytest.raises(CacheError, match="save one with FISEditCacheStore's save_path"):
        run_node(nodes["FISEditCacheLoad"], cache_file="never-saved.safetensors")
    (captured, _), _ = run_node(nodes["FISEditCacheCapture"], model=model, cache_name="node-experience-heun")
    with pytest.raises(CacheError, match="use a single-evaluation sampler such as euler"), torch.inference_mode():
        host.common_ksampler(captured, 3, STEPS, 7.0, "heun", "normal", conditioning(11), conditioning(12), latent)


def test_the_node_layer_has_no_error_without_a_fix():
    """Every raise in nodes/ carries a message that says what to do (checked in the source: an exception raised
    with no message, or one that names no action, is a defect)."""
    import ast
    from pathlib import Path
    verbs = re.compile(r"\b(connect|use|set|pick|give|choose|train|point|re-run|re-capture|remove|update|turn|edit|"
                       r"save|capture|unset|fix|lower|report)\b", re.I)
    bare = []
    for path in sorted((comfy_host.REPO_ROOT / "nodes").glob("*.py")):
        for node in ast.walk(ast.parse(Path(path).read_text())):
            if isinstance(node, ast.Raise) and node.exc is not None and isinstance(node.exc, ast.Call):
                text = " ".join(c.value for c in ast.walk(node.exc) if isinstance(c, ast.Constant)
                                and isinstance(c.value, str))
                if not verbs.search(text):
                    bare.append(f"{path.name}:{node.lineno}: {text[:80]}")
    assert bare == []
