"""Workflows in both of ComfyUI's formats: API format (what /prompt takes and the tests run) and UI format (the web
frontend's LiteGraph save, version 0.4: what users load, edit and share).

    python scripts/workflow_formats.py              # writes workflows/X_ui.json for every workflows/X_api.json
    python scripts/workflow_formats.py --check      # fails if a committed X_ui.json is stale or invalid

The conversion reads the node definitions of the real host with this plugin loaded (INPUT_TYPES, as the server's
/object_info reports them), so widget values land in the frontend's order: socket inputs first, then one widget
per INT/FLOAT/STRING/BOOLEAN/COMBO input in the definition's order (required, then optional), and after a seed
(INT named seed or noise_seed, or any input declaring control_after_generate) the frontend-only
"control_after_generate" value, here always "fixed" so that a re-queued workflow keeps its seed. Nodes are laid out
left to right in columns by dependency depth.

`ui_to_api` is the inverse for the subset these files use (no muted, bypassed or virtual nodes), and `check_ui`
checks a UI workflow against the node definitions: node types, widget values (count, order, type, range, combo
options), slots and links.
"""
from __future__ import annotations

import argparse
import json
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfy_host  # noqa: E402

WORKFLOWS = comfy_host.REPO_ROOT / "workflows"
UI_VERSION = 0.4
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
SEED_NAMES = ("seed", "noise_seed")  # the frontend adds control_after_generate to INT inputs of these names
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
CONTROL_DEFAULT = "fixed"
OPTIONAL_SHAPE = 7  # LiteGraph's hollow-circle slot shape, which the frontend gives optional inputs

# layout (canvas units)
COLUMN_GAP, ROW_GAP, LEFT, TOP = 60, 40, 0, 0
TITLE_H, SLOT_H, WIDGET_H, TEXTBOX_H, IMAGE_H = 30, 20, 24, 140, 300
WIDTHS = {"CLIPTextEncode": 420, "SaveImage": 320, "PreviewImage": 320}
DEFAULT_WIDTH = 320


class FormatError(ValueError):
    pass


# --- node definitions ---------------------------------------------------------------------------------------------

def node_info(class_type: str) -> dict:
    """What the server's /object_info says of one node class (input, input_order, output, output_name, ...)."""
    import nodes
    cls = nodes.NODE_CLASS_MAPPINGS.get(class_type)
    if cls is None:
        raise FormatError(f"unknown node type {class_type!r}: not registered in this ComfyUI")
    if hasattr(cls, "GET_NODE_INFO_V1"):  # a V3 node reports its V1 view itself
        return cls.GET_NODE_INFO_V1()
    inputs = cls.INPUT_TYPES()
    return {
        "input": inputs,
        "input_order": {k: list(v.keys()) for k, v in inputs.items()},
        "output": list(cls.RETURN_TYPES),
        "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)),
        "display_name": nodes.NODE_DISPLAY_NAME_MAPPINGS.get(class_type, class_type),
        "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
    }


def _inputs_in_order(info: dict):
    """(name, spec, optional) of the required and optional inputs, in the definition's order."""
    order = info.get("input_order") or {k: list(v) for k, v in info["input"].items()}
    for section in ("required", "optional"):
        for name in order.get(section, []):
            yield name, info["input"][section][name], section == "optional"


def input_kind(spec) -> tuple[str, dict, list | None]:
    """(type, options, combo values) of an input spec; type is COMBO for both combo spellings."""
    kind, options = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    if isinstance(kind, (list, tuple)):
        return "COMBO", options, list(kind)
    if kind == "COMBO":
        return "COMBO", options, list(options.get("options", []))
    return kind, options, None


def is_widget(spec) -> bool:
    kind, options, _ = input_kind(spec)
    return kind in WIDGET_TYPES and not options.get("forceInput", False)


def has_control(name: str, spec) -> bool:
    kind, options, _ = input_kind(spec)
    if kind == "INT":
        return bool(options.get("control_after_generate", name in SEED_NAMES))
    return kind == "COMBO" and bool(options.get("control_after_generate", False))


def sockets(info: dict) -> list[tuple[str, str, bool]]:
    return [(n, input_kind(s)[0], opt) for n, s, opt in _inputs_in_order(info) if not is_widget(s)]


def widgets(info: dict) -> list[tuple[str, object, bool]]:
    return [(n, s, opt) for n, s, opt in _inputs_in_order(info) if is_widget(s)]


def widget_slots(info: dict) -> list[tuple[str, object | None]]:
    """One entry per widgets_values position: (input name, spec), or (name, None) for a control value."""
    slots = []
    for name, spec, _ in widgets(info):
        slots.append((name, spec))
        if has_control(name, spec):
            slots.append((name, None))
    return slots


def object_info(class_types) -> dict:
    return {t: node_info(t) for t in sorted(set(class_types))}


# --- API -> UI ----------------------------------------------------------------------------------------------------

def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def _default(spec):
    kind, options, values = input_kind(spec)
    if "default" in options:
        return options["default"]
    return values[0] if values else {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[kind]


def _node_height(info: dict, class_type: str) -> int:
    n_sockets = len(sockets(info))
    n_out = len(info["output"])
    h = TITLE_H + SLOT_H * max(n_sockets, n_out, 1) + 10
    for name, spec, _ in widgets(info):
        kind, options, _ = input_kind(spec)
        h += TEXTBOX_H if kind == "STRING" and options.get("multiline") else WIDGET_H
        if has_control(name, spec):
            h += WIDGET_H
    if class_type in ("SaveImage", "PreviewImage"):
        h += IMAGE_H
    return h


def api_to_ui(prompt: dict, infos: dict | None = None, name: str = "workflow") -> dict:
    """The UI-format twin of an API-format workflow. Every widget input must be given (as "Export (API)" does)."""
    infos = infos or object_info(n["class_type"] for n in prompt.values())
    ids = {}
    for key in prompt:
        if not key.isdigit():
            raise FormatError(f"node id {key!r}: UI node ids are integers")
        ids[key] = int(key)

    links, link_of = [], {}  # link_of[(node, input name)] = link id
    for key in sorted(prompt, key=int):
        node = prompt[key]
        info = infos[node["class_type"]]
        known = {n for n, _, _ in _inputs_in_order(info)}
        for input_name in node["inputs"]:
            if input_name not in known:
                raise FormatError(f"node {key} ({node['class_type']}) has no input {input_name!r}")
        for input_name, spec, optional in _inputs_in_order(info):
            value = node["inputs"].get(input_name)
            if _is_link(value):
                src, slot = value
                if src not in prompt:
                    raise FormatError(f"node {key} input {input_name!r} links to missing node {src}")
                out_type = infos[prompt[src]["class_type"]]["output"][slot]
                links.append([len(links) + 1, ids[src], slot, ids[key], input_name, out_type])
                link_of[(key, input_name)] = len(links)
            elif value is None and is_widget(spec):
                raise FormatError(f"node {key} ({node['class_type']}): no value for widget {input_name!r}; "
                                  "give every widget input, as ComfyUI's Export (API) does")
            elif value is None and not optional:
                raise FormatError(f"node {key} ({node['class_type']}): required input {input_name!r} not connected")

    depth = _depths(prompt)
    order = sorted(prompt, key=lambda k: (depth[k], int(k)))
    ui_nodes = {}
    for rank, key in enumerate(order):
        node = prompt[key]
        info = infos[node["class_type"]]
        inputs = []
        for input_name, kind, optional in sockets(info):
            entry = {"localized_name": input_name, "name": input_name}
            if optional:
                entry["shape"] = OPTIONAL_SHAPE
            entry.update(type=kind, link=link_of.get((key, input_name)))
            inputs.append(entry)
        values = []
        for input_name, spec, optional in widgets(info):
            entry = {"localized_name": input_name, "name": input_name}
            if optional:
                entry["shape"] = OPTIONAL_SHAPE
            entry.update(type=input_kind(spec)[0], widget={"name": input_name}, link=link_of.get((key, input_name)))
            inputs.append(entry)
            value = node["inputs"].get(input_name)
            values.append(_default(spec) if _is_link(value) else value)
            if has_control(input_name, spec):
                values.append(CONTROL_DEFAULT)
        outputs = [{"localized_name": out_name, "name": out_name, "type": out_type,
                    "links": [l[0] for l in links if l[1] == ids[key] and l[2] == slot] or None}
                   for slot, (out_type, out_name) in enumerate(zip(info["output"], info["output_name"]))]
        ui_node = {"id": ids[key], "type": node["class_type"], "pos": [0, 0],
                   "size": [WIDTHS.get(node["class_type"], DEFAULT_WIDTH), _node_height(info, node["class_type"])],
                   "flags": {}, "order": rank, "mode": 0, "inputs": inputs, "outputs": outputs}
        title = node.get("_meta", {}).get("title")
        if title and title != info.get("display_name", node["class_type"]):
            ui_node["title"] = title
        ui_node["properties"] = {"Node name for S&R": node["class_type"]}
        ui_node["widgets_values"] = values
        ui_nodes[key] = ui_node
    _layout(prompt, ui_nodes, depth)

    for link in links:  # the target slot by position among the node's inputs
        target = ui_nodes[str(link[3])]
        link[4] = next(i for i, e in enumerate(target["inputs"]) if e["name"] == link[4])
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"fisedit-workflow:{name}")),
        "revision": 0,
        "last_node_id": max(ids.values()),
        "last_link_id": len(links),
        "nodes": [ui_nodes[k] for k in order],
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 0.6, "offset": [40, 40]}},
        "version": UI_VERSION,
    }


def _depths(prompt: dict) -> dict:
    depth: dict[str, int] = {}

    def visit(key, trail=()):
        if key in depth:
            return depth[key]
        if key in trail:
            raise FormatError(f"the workflow has a cycle through node {key}")
        sources = [v[0] for v in prompt[key]["inputs"].values() if _is_link(v)]
        depth[key] = 1 + max((visit(s, trail + (key,)) for s in sources), default=-1)
        return depth[key]

    for key in prompt:
        visit(key)
    return depth


def _layout(prompt: dict, ui_nodes: dict, depth: dict) -> None:
    """Columns by dependency depth; within a column, nodes ordered by where their inputs come from."""
    columns: dict[int, list[str]] = {}
    for key in sorted(prompt, key=int):
        columns.setdefault(depth[key], []).append(key)
    x, centre = LEFT, {}
    for col in sorted(columns):
        keys = columns[col]

        def anchor(k):
            ys = [centre[v[0]] for v in prompt[k]["inputs"].values() if _is_link(v) and v[0] in centre]
            return (sum(ys) / len(ys) if ys else 0.0, int(k))

        y = TOP
        for key in sorted(keys, key=anchor):
            node = ui_nodes[key]
            node["pos"] = [x, y]
            centre[key] = y + node["size"][1] / 2
            y += node["size"][1] + TITLE_H + ROW_GAP
        x += max(ui_nodes[k]["size"][0] for k in keys) + COLUMN_GAP


# --- UI -> API ----------------------------------------------------------------------------------------------------

def ui_to_api(ui: dict, infos: dict | None = None) -> dict:
    """The prompt the frontend queues for a UI workflow of active, non-virtual nodes (what "Export (API)" writes)."""
    infos = infos or object_info(n["type"] for n in ui["nodes"])
    links = {l[0]: l for l in ui["links"]}
    prompt = {}
    for node in sorted(ui["nodes"], key=lambda n: n["id"]):
        if node.get("mode", 0) != 0:
            raise FormatError(f"node {node['id']} is muted or bypassed (mode {node['mode']}): not supported here")
        info = infos[node["type"]]
        inputs = {}
        values = list(node.get("widgets_values") or [])
        slots = widget_slots(info)
        if len(values) != len(slots):
            raise FormatError(f"node {node['id']} ({node['type']}): {len(values)} widget values, expected "
                              f"{len(slots)} ({', '.join(n if s is not None else 'control_after_generate' for n, s in slots)})")
        for (input_name, spec), value in zip(slots, values):
            if spec is not None:
                inputs[input_name] = value
        for entry in node.get("inputs", []):
            if entry.get("link") is not None:
                link = links[entry["link"]]
                inputs[entry["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                   "_meta": {"title": node.get("title") or info.get("display_name", node["type"])}}
    return prompt


def same_graph(api: dict, converted: dict) -> list[str]:
    """Differences between an API workflow and the API form of its UI twin (node ids, types, inputs, titles)."""
    problems = []
    for key in sorted(set(api) | set(converted), key=lambda k: (len(k), k)):
        a, b = api.get(key), converted.get(key)
        if a is None or b is None:
            problems.append(f"node {key} only in the {'UI' if a is None else 'API'} workflow")
            continue
        if a["class_type"] != b["class_type"]:
            problems.append(f"node {key}: {a['class_type']} vs {b['class_type']}")
        for name in sorted(set(a["inputs"]) | set(b["inputs"])):
            if a["inputs"].get(name, "<absent>") != b["inputs"].get(name, "<absent>"):
                problems.append(f"node {key} input {name}: API {a['inputs'].get(name, '<absent>')!r} vs "
                                f"UI {b['inputs'].get(name, '<absent>')!r}")
        title = a.get("_meta", {}).get("title")
        if title is not None and title != b["_meta"]["title"]:
            problems.append(f"node {key} title: API {title!r} vs UI {b['_meta']['title']!r}")
    return problems


# --- checking a UI workflow against the node definitions --------------------------------------------------------

def _check_value(where: str, spec, value) -> list[str]:
    kind, options, values = input_kind(spec)
    if kind == "COMBO":
        return [] if value in values else [f"{where}: {value!r} is not one of the options {values}"]
    if kind == "BOOLEAN":
        return [] if isinstance(value, bool) else [f"{where}: {value!r} is not a boolean"]
    if kind == "STRING":
        return [] if isinstance(value, str) else [f"{where}: {value!r} is not a string"]
    if kind == "INT" and (isinstance(value, bool) or not isinstance(value, int)):
        return [f"{where}: {value!r} is not an integer"]
    if kind == "FLOAT" and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return [f"{where}: {value!r} is not a number"]
    problems = []
    if "min" in options and value < options["min"]:
        problems.append(f"{where}: {value!r} is below the minimum {options['min']}")
    if "max" in options and value > options["max"]:
        problems.append(f"{where}: {value!r} is above the maximum {options['max']}")
    return problems


def check_ui(ui: dict, infos: dict | None = None) -> list[str]:
    """Everything in a UI workflow that does not fit the node definitions; empty when it loads and queues as is."""
    problems = []
    if ui.get("version") != UI_VERSION:
        problems.append(f"version {ui.get('version')!r}, expected {UI_VERSION}")
    nodes_by_id = {}
    for node in ui.get("nodes", []):
        if node["id"] in nodes_by_id:
            problems.append(f"node id {node['id']} used twice")
        nodes_by_id[node["id"]] = node
    if nodes_by_id and ui.get("last_node_id", -1) < max(nodes_by_id):
        problems.append(f"last_node_id {ui.get('last_node_id')} is below the largest node id {max(nodes_by_id)}")
    links = {}
    for link in ui.get("links", []):
        if link[0] in links:
            problems.append(f"link id {link[0]} used twice")
        links[link[0]] = link
    if links and ui.get("last_link_id", -1) < max(links):
        problems.append(f"last_link_id {ui.get('last_link_id')} is below the largest link id {max(links)}")

    if infos is None:
        infos = {}
        for node in nodes_by_id.values():
            try:
                infos[node["type"]] = node_info(node["type"])
            except FormatError as e:
                problems.append(f"node {node['id']}: {e}")
    for node in nodes_by_id.values():
        info = infos.get(node["type"])
        if info is None:
            continue
        where = f"node {node['id']} ({node['type']})"
        slots = widget_slots(info)
        values = node.get("widgets_values") or []
        if len(values) != len(slots):
            problems.append(f"{where}: {len(values)} widget values, expected {len(slots)}")
        else:
            for (input_name, spec), value in zip(slots, values):
                if spec is None:
                    if value not in CONTROL_VALUES:
                        problems.append(f"{where}: control_after_generate of {input_name} is {value!r}, "
                                        f"not one of {list(CONTROL_VALUES)}")
                else:
                    problems += _check_value(f"{where} widget {input_name}", spec, value)
        declared = {n: (k, opt) for n, k, opt in sockets(info)}
        declared.update({n: (input_kind(s)[0], opt) for n, s, opt in widgets(info)})
        seen = set()
        for entry in node.get("inputs", []):
            name = entry.get("name")
            seen.add(name)
            if name not in declared:
                problems.append(f"{where}: no input named {name!r}")
                continue
            if entry.get("type") != declared[name][0]:
                problems.append(f"{where} input {name}: type {entry.get('type')!r}, expected {declared[name][0]!r}")
            if "widget" in entry and not any(name == w for w, _, _ in widgets(info)):
                problems.append(f"{where} input {name}: marked as a widget, but it is a socket")
            link_id = entry.get("link")
            if link_id is not None:
                link = links.get(link_id)
                if link is None:
                    problems.append(f"{where} input {name}: link {link_id} is not in the links array")
                elif link[3] != node["id"] or link[4] >= len(node["inputs"]) or node["inputs"][link[4]] is not entry:
                    problems.append(f"{where} input {name}: link {link_id} targets node {link[3]} slot {link[4]}")
        for name, (kind, optional) in declared.items():
            is_socket = name in {n for n, _, _ in sockets(info)}
            if is_socket and not optional and name not in seen:
                problems.append(f"{where}: required input {name!r} is missing")
            if is_socket and not optional and name in seen:
                entry = next(e for e in node["inputs"] if e["name"] == name)
                if entry.get("link") is None:
                    problems.append(f"{where}: required input {name!r} is not connected")
        outputs = node.get("outputs", [])
        saved, expected = [o.get("type") for o in outputs], list(info["output"])
        # An output node saved without outputs is what older ComfyUI versions save for SaveImage and SaveLatent,
        # which later pass their input through (v0.33 has outputs on both); the frontend loads it either way.
        if saved != expected and not (saved == [] and info.get("output_node")):
            problems.append(f"{where}: output types {saved}, expected {expected}")
        for slot, out in enumerate(outputs):
            for link_id in out.get("links") or []:
                link = links.get(link_id)
                if link is None or link[1] != node["id"] or link[2] != slot:
                    problems.append(f"{where} output {slot}: link {link_id} does not start here")

    for link in links.values():
        link_id, src, src_slot, dst, dst_slot, link_type = link
        if src not in nodes_by_id or dst not in nodes_by_id:
            problems.append(f"link {link_id}: between missing nodes {src} -> {dst}")
            continue
        outs, ins = nodes_by_id[src].get("outputs", []), nodes_by_id[dst].get("inputs", [])
        if src_slot >= len(outs) or dst_slot >= len(ins):
            problems.append(f"link {link_id}: slot out of range ({src}:{src_slot} -> {dst}:{dst_slot})")
            continue
        out, inp = outs[src_slot], ins[dst_slot]
        if link_id not in (out.get("links") or []):
            problems.append(f"link {link_id}: not listed in node {src} output {src_slot}")
        if inp.get("link") != link_id:
            problems.append(f"link {link_id}: node {dst} input {inp.get('name')} holds link {inp.get('link')}")
        if not (link_type == out.get("type") == inp.get("type")):
            problems.append(f"link {link_id}: type {link_type!r} from {out.get('type')!r} into {inp.get('type')!r}")
    return problems


# --- files --------------------------------------------------------------------------------------------------------

def ui_path(api_path: Path) -> Path:
    if not api_path.name.endswith("_api.json"):
        raise FormatError(f"{api_path.name}: API workflows are named *_api.json")
    return api_path.with_name(api_path.name[:-len("_api.json")] + "_ui.json")


def dumps(ui: dict) -> str:
    """One node or link per line: diffs stay readable."""
    head = {k: v for k, v in ui.items() if k not in ("nodes", "links")}
    lines = ["{"]
    for key, value in head.items():
        if key == "version":
            continue
        lines.append(f"  {json.dumps(key)}: {json.dumps(value)},")
    lines.append('  "nodes": [')
    lines.append(",\n".join("    " + json.dumps(n, ensure_ascii=False) for n in ui["nodes"]))
    lines.append("  ],")
    lines.append('  "links": [')
    lines.append(",\n".join("    " + json.dumps(l) for l in ui["links"]))
    lines.append("  ],")
    lines.append(f'  "version": {json.dumps(ui["version"])}')
    lines.append("}")
    return "\n".join(lines) + "\n"


def convert_file(api_path: Path) -> str:
    return dumps(api_to_ui(json.loads(api_path.read_text()), name=ui_path(api_path).name))


def test_checkpoints() -> Path:
    """The folder of the built-in sd15-small checkpoint that the sd15-small workflows name (built once, as the
    tests and the demo do): their ckpt_name is checked against the files ComfyUI lists."""
    import make_test_checkpoint
    folder = comfy_host.REPO_ROOT / ".cache" / "models"
    if not (folder / "sd15-small.safetensors").is_file():
        make_test_checkpoint.write_checkpoint(folder / "sd15-small.safetensors", "sd15-small", seed=0)
    return folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workflows", nargs="*", type=Path, help="API workflows (default: workflows/*_api.json)")
    parser.add_argument("--check", action="store_true", help="write nothing; fail if a UI file is stale or invalid")
    a = parser.parse_args(argv)
    comfy_host.boot()
    comfy_host.add_model_folder("checkpoints", test_checkpoints())
    stale = 0
    for api_path in a.workflows or sorted(WORKFLOWS.glob("*_api.json")):
        text, target = convert_file(api_path), ui_path(api_path)
        problems = check_ui(json.loads(text)) + same_graph(json.loads(api_path.read_text()), ui_to_api(json.loads(text)))
        if problems:
            print(f"{api_path}: " + "; ".join(problems), file=sys.stderr)
            stale += 1
        elif a.check:
            if not target.is_file() or target.read_text() != text:
                print(f"{target} is stale: run python scripts/workflow_formats.py", file=sys.stderr)
                stale += 1
        else:
            target.write_text(text)
            print(f"wrote {target}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
