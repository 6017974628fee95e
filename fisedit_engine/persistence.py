"""One cache, one file: safetensors tensors plus a JSON header (in the safetensors metadata) with the settings.

Written to a temporary name in the target folder, flushed to disk, then renamed over the target, so a crash leaves
either the previous file or the new one, never a half file under the real name. Never pickle: conditioning
extras that are not tensors or plain JSON values are refused with a message.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .cache import CacheError, FisEditCache, SamplingSettings, StepTensors

FORMAT = "fisedit-cache"
FORMAT_VERSION = 1
_JSON_SCALARS = (int, float, str, bool, type(None))


def _encode_conds(conds: dict, tensors: dict) -> dict:
    out = {}
    for kind, items in conds.items():
        encoded = []
        for i, (cross_attn, extras) in enumerate(items):
            entry = {"extras": {}, "tensor_extras": []}
            if cross_attn is not None:
                tensors[f"cond/{kind}/{i}/cross_attn"] = cross_attn.detach().cpu().contiguous()
            entry["has_cross_attn"] = cross_attn is not None
            for name, value in extras.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"cond/{kind}/{i}/{name}"] = value.detach().cpu().contiguous()
                    entry["tensor_extras"].append(name)
                elif isinstance(value, _JSON_SCALARS):
                    entry["extras"][name] = value
                else:
                    raise CacheError(f"the {kind} conditioning carries '{name}' ({type(value).__name__}), which a "
                                     f"cache file cannot hold; keep this cache in memory (leave save_path empty)")
            encoded.append(entry)
        out[kind] = encoded
    return out


def _decode_conds(header: dict, f) -> dict:
    conds = {}
    for kind, items in header.items():
        decoded = []
        for i, entry in enumerate(items):
            cross_attn = f.get_tensor(f"cond/{kind}/{i}/cross_attn") if entry["has_cross_attn"] else None
            extras = dict(entry["extras"])
            for name in entry["tensor_extras"]:
                extras[name] = f.get_tensor(f"cond/{kind}/{i}/{name}")
            decoded.append([cross_attn, extras])
        conds[kind] = decoded
    return conds


def save(cache: FisEditCache, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {
        "noise": cache.noise.contiguous(), "latent_image": cache.latent_image.contiguous(),
        "final_latent": cache.final_latent.contiguous(),
    }
    entries = []
    for i, ((key, chunk), t) in enumerate(sorted(cache.store.tensors.items())):
        tensors[f"store/{i}"] = t
        entries.append({"key": key, "chunk": chunk})
    header = {
        "format": FORMAT, "version": FORMAT_VERSION, "name": cache.name,
        "settings": cache.settings.to_json(), "store": entries,
        "steps": cache.store.steps, "batch": cache.store.batch,
        "conds": _encode_conds(cache.conds, tensors),
    }
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={"fisedit": json.dumps(header)})
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load(path: str | os.PathLike, name: str | None = None) -> FisEditCache:
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if "fisedit" not in meta:
                raise CacheError(f"{path.name} is not a FISEdit cache file (no FISEdit header)")
            header = json.loads(meta["fisedit"])
            if header.get("format") != FORMAT:
                raise CacheError(f"{path.name} is not a FISEdit cache file")
            if header.get("version") != FORMAT_VERSION:
                raise CacheError(f"{path.name} has cache format version {header.get('version')}; this FISEdit reads "
                                 f"version {FORMAT_VERSION}: re-capture the generation")
            store = StepTensors(header["steps"], header["batch"])
            for i, entry in enumerate(header["store"]):
                key = (entry["key"], entry["chunk"])
                store.tensors[key] = f.get_tensor(f"store/{i}")
                store.written[key] = torch.ones(store.steps, dtype=torch.bool)
            return FisEditCache(
                name=name or header["name"], settings=SamplingSettings.from_json(header["settings"]), store=store,
                noise=f.get_tensor("noise"), latent_image=f.get_tensor("latent_image"),
                final_latent=f.get_tensor("final_latent"), conds=_decode_conds(header["conds"], f))
    except CacheError:
        raise
    except Exception as e:  # truncated, corrupted or foreign files surface as safetensors/json errors
        raise CacheError(f"cannot read FISEdit cache {path.name}: {type(e).__name__}: {e}") from e
