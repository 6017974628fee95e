"""The UI-format workflows (what users load in the web UI) against the node definitions of the real host with this
plugin loaded, and against their API-format twins (what the tests run). The browser test
(tests/browser/test_browser.py) loads the same files into the real frontend and checks its own conversion."""
import json
from pathlib import Path

import pytest

import workflow_formats as wf

ROOT = Path(__file__).resolve().parents[2]
API_FILES = sorted((ROOT / "workflows").glob("*_api.json"))
UI_FILES = sorted((ROOT / "workflows").glob("*_ui.json"))


@pytest.fixture(scope="module")
def defs(host, checkpoints):
    """The host's node definitions, with the sd15-small checkpoint listed (its workflows name it)."""
    return wf


def load(path):
    return json.loads(path.read_text())


PASS_THROUGH_OUTPUT_NODES = ("SaveImage", "SaveLatent")  # no outputs on the pinned host, one in v0.33


def _without_unlinked_outputs(ui):
    for node in ui["nodes"]:
        if node["type"] in PASS_THROUGH_OUTPUT_NODES and not any(o.get("links") for o in node.get("outputs", [])):
            node["outputs"] = []
    return ui


def test_every_workflow_has_both_formats():
    assert {p.name[:-len("_api.json")] for p in API_FILES} == {p.name[:-len("_ui.json")] for p in UI_FILES}
    assert {"edit_auto_toy", "edit_chained_toy", "edit_user_mask_toy"} <= {p.name[:-len("_api.json")] for p in API_FILES}


@pytest.mark.parametrize("api_path", API_FILES, ids=lambda p: p.stem)
def test_ui_workflow_fits_the_node_definitions_and_is_its_api_twin(defs, api_path):
    ui_path = wf.ui_path(api_path)
    api, ui = load(api_path), load(ui_path)
    assert wf.check_ui(ui) == []
    assert wf.same_graph(api, wf.ui_to_api(ui)) == []
    # the committed file is what the converter makes of the API twin today (regenerate with the script), up to the
    # outputs that output nodes gained in newer hosts (SaveImage and SaveLatent pass their input through in v0.33)
    committed, generated = ui_path.read_text(), wf.convert_file(api_path)
    if committed != generated:
        assert _without_unlinked_outputs(json.loads(committed)) == _without_unlinked_outputs(json.loads(generated)), \
            "stale: run python scripts/workflow_formats.py"
    # and ComfyUI's own validation (types of links, ranges, combo options, VALIDATE_INPUTS) accepts what it queues
    import comfy_host
    assert comfy_host.validate(wf.ui_to_api(ui))


@pytest.mark.parametrize("ui_path", UI_FILES, ids=lambda p: p.stem)
def test_ui_layout_reads_left_to_right_without_overlaps(ui_path):
    ui = load(ui_path)
    nodes = {n["id"]: n for n in ui["nodes"]}
    for _, src, _, dst, _, _ in ui["links"]:
        assert nodes[src]["pos"][0] + nodes[src]["size"][0] < nodes[dst]["pos"][0]
    boxes = [(n["pos"][0], n["pos"][1], n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1] + wf.TITLE_H)
             for n in ui["nodes"]]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)


def test_widget_values_are_where_the_frontend_puts_them(defs):
    """What ComfyUI's frontend 1.32.9 itself wrote when it loaded workflows/edit_auto_toy_api.json (its KSampler and
    FISEditDifferenceMask nodes), with the seed control set to fixed rather than the frontend's randomize; the
    optional vae socket, added since, follows user_mask as the frontend orders optional sockets, and the optional
    attention_control_steps and word_attention widgets, added since, follow the required widgets."""
    ui = load(ROOT / "workflows" / "edit_auto_toy_ui.json")
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert nodes[6]["widgets_values"] == [7, "fixed", 20, 5.0, "euler", "normal", 1.0]
    assert nodes[14]["widgets_values"] == ["auto", 0, "otsu", 0.15, 1, True, 1, True]
    assert [i["name"] for i in nodes[14]["inputs"]] == ["model", "cache", "positive", "user_mask", "vae",
                                                       "mask_mode", "probe_steps", "threshold", "edit_size", "dilate",
                                                       "attention_control", "attention_control_steps",
                                                       "word_attention"]
    assert [l[1:] for l in ui["links"] if l[3] == 14 and l[5] == "VAE"] == [[1, 2, 14, 4, "VAE"]]
    assert nodes[15]["widgets_values"] == [0.0, "exact", 0]  # tile_size 0 (the cost model) since the frontend run
    assert nodes[14]["title"] == "FISEdit Difference Mask (auto)"
    assert [l[1:] for l in ui["links"] if l[3] == 15] == [[1, 0, 15, 0, "MODEL"], [14, 0, 15, 1, "FISEDIT_EDIT"]]


def _mutated(change):
    ui = load(ROOT / "workflows" / "edit_auto_toy_ui.json")
    nodes = {n["id"]: n for n in ui["nodes"]}
    change(ui, nodes)
    return wf.check_ui(ui)


@pytest.mark.parametrize("change, expected", [
    (lambda ui, n: n[6]["widgets_values"].__setitem__(slice(2, 4), [5.0, 20]), "widget steps: 5.0 is not an integer"),
    (lambda ui, n: n[6]["widgets_values"].pop(1), "6 widget values, expected 7"),
    (lambda ui, n: n[6]["widgets_values"].__setitem__(1, "sometimes"), "control_after_generate of seed"),
    (lambda ui, n: n[6]["widgets_values"].__setitem__(2, 0), "widget steps: 0 is below the minimum 1"),
    (lambda ui, n: n[14]["widgets_values"].__setitem__(3, 1.5), "widget edit_size: 1.5 is above the maximum 1.0"),
    (lambda ui, n: n[14]["widgets_values"].__setitem__(0, "magic"), "widget mask_mode: 'magic' is not one of"),
    (lambda ui, n: n[14]["widgets_values"].__setitem__(5, 1), "widget attention_control: 1 is not a boolean"),
    (lambda ui, n: n[1]["widgets_values"].__setitem__(0, "missing"), "widget weights: 'missing' is not one of"),
    (lambda ui, n: n[15].__setitem__("type", "FISEditSparseSampler"), "unknown node type 'FISEditSparseSampler'"),
    (lambda ui, n: ui["links"][0].__setitem__(5, "CLIP"), "type 'CLIP' from 'MODEL' into 'MODEL'"),
    (lambda ui, n: n[15]["inputs"][1].__setitem__("link", None), "required input 'edit' is not connected"),
    (lambda ui, n: n[15]["outputs"].pop(), "output types ['LATENT'], expected ['LATENT', 'FISEDIT_CACHE']"),
    (lambda ui, n: ui.__setitem__("last_link_id", 3), "last_link_id 3 is below the largest link id"),
    (lambda ui, n: ui.__setitem__("version", 0.3), "version 0.3, expected 0.4"),
], ids=["float-steps", "no-control-value", "bad-control-value", "below-min", "above-max", "bad-combo", "int-bool",
        "missing-weights", "unknown-type", "link-type", "unconnected", "outputs", "last-link-id", "version"])
def test_check_ui_names_each_mistake(defs, change, expected):
    problems = _mutated(change)
    assert any(expected in p for p in problems), problems


def test_swapped_widget_values_are_caught_by_the_api_comparison(defs):
    """Two values of one type swapped (the user box's width and height) break no definition; the API twin catches
    them."""
    api = load(ROOT / "workflows" / "edit_user_mask_api.json")
    ui = load(ROOT / "workflows" / "edit_user_mask_ui.json")
    node = next(n for n in ui["nodes"] if n["id"] == 12)
    assert node["widgets_values"] == [1.0, 48, 40]
    node["widgets_values"][1:] = [40, 48]
    assert wf.check_ui(ui) == []
    assert wf.same_graph(api, wf.ui_to_api(ui)) == ["node 12 input height: API 40 vs UI 48",
                                                     "node 12 input width: API 48 vs UI 40"]


def test_an_api_workflow_must_give_every_widget_value(defs):
    api = load(ROOT / "workflows" / "edit_auto_toy_api.json")
    del api["15"]["inputs"]["tile_size"]
    with pytest.raises(wf.FormatError, match="no value for widget 'tile_size'"):
        wf.api_to_ui(api)
    api = load(ROOT / "workflows" / "edit_auto_toy_api.json")
    api["6"]["inputs"]["sead"] = 7
    with pytest.raises(wf.FormatError, match="has no input 'sead'"):
        wf.api_to_ui(api)


def test_a_linked_widget_input_keeps_its_link(defs):
    """A widget input fed by a link (EmptyLatentImage's width from a PrimitiveInt) is a socket with that link in the
    UI, its widget value the definition's default, and back in API form the link again."""
    api = load(ROOT / "workflows" / "edit_user_mask_toy_api.json")
    api["30"] = {"class_type": "PrimitiveInt", "inputs": {"value": 256}}
    api["5"]["inputs"]["width"] = ["30", 0]
    ui = wf.api_to_ui(api)
    assert wf.check_ui(ui) == []
    node = next(n for n in ui["nodes"] if n["id"] == 5)
    width = next(i for i in node["inputs"] if i["name"] == "width")
    link = next(l for l in ui["links"] if l[0] == width["link"])
    assert width["widget"] == {"name": "width"} and link[1:3] == [30, 0] and link[5] == "INT"
    assert node["widgets_values"] == [512, 256, 1]  # width's default, then height and batch_size as given
    assert wf.same_graph(api, wf.ui_to_api(ui)) == []
