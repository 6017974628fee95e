"""One cache, one file: safetensors tensors plus a JSON header (in the safetensors metadata) with the settings.

Written to a temporary name in the target folder, flushed, marked sealed (one byte of the header flips from "0" to
"1"), flushed again, then renamed over the target: a crash leaves the previous file under the real name, and a
temporary file that no reader accepts unless it was complete. The header carries the format version, a CRC32 per
tensor and (from version 3) a CRC32 of the header itself, all checked on load, so a file damaged later, in its data
or in its settings, fails to load too. Version 2 files (no header checksum) still load; version 1 (channels-first
maps) and newer versions are refused.
Never pickle: conditioning extras that are not tensors or plain JSON values are refused with a message.
"""
from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .cache import CacheError, FisEditCache, SamplingSettings, StepTensors

FORMAT = "fisedit-cache"
FORMAT_VERSION = 3  # 2: activation maps stored channels-last; 3: a CRC32 of the header too
READABLE_VERSIONS = (2, 3)  # version 1 stored activation maps channels-first
_HEADER_CRC_KEY = "header_crc32"
_SEALED_KEY = "fisedit_sealed"
_JSON_SCALARS = (int, float, str, bool, type(None))


def _crc32(t: torch.Tensor) -> int:
    return zlib.crc32(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def _header_crc32(header: dict) -> int:
    body = {k: v for k, v in header.items() if k != _HEADER_CRC_KEY}
    return zlib.crc32(json.dumps(body, sort_keys=True).encode())


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


def _decode_conds(header: dict, tensor) -> dict:
    conds = {}
    for kind, items in header.items():
        decoded = []
        for i, entry in enumerate(items):
            cross_attn = tensor(f"cond/{kind}/{i}/cross_attn") if entry["has_cross_attn"] else None
            extras = dict(entry["extras"])
            for name in entry["tensor_extras"]:
                extras[name] = tensor(f"cond/{kind}/{i}/{name}")
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
    for i, (key, chunk) in enumerate(sorted(cache.store.tensors)):
        # an edit's delta is saved whole; its planned keys are columns of one block (StepTensors.plan_rows)
        tensors[f"store/{i}"] = cache.store.whole_tensor(key, chunk).contiguous()
        entries.append({"key": key, "chunk": chunk})
    header = {
        "format": FORMAT, "version": FORMAT_VERSION, "name": cache.name,
        "settings": cache.settings.to_json(), "store": entries,
        "steps": cache.store.steps, "batch": cache.store.batch,
        "conds": _encode_conds(cache.conds, tensors),
    }
    header["crc32"] = {name: _crc32(t) for name, t in tensors.items()}
    header[_HEADER_CRC_KEY] = _header_crc32(header)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={"fisedit": json.dumps(header), _SEALED_KEY: "0"})
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
            _mark_sealed(fh)
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _mark_sealed(fh) -> None:
    header_len = int.from_bytes(fh.read(8), "little")
    header = fh.read(header_len)
    token = f'"{_SEALED_KEY}":"0"'.encode()
    at = header.find(token)
    if at < 0 or header.find(token, at + 1) >= 0:
        raise CacheError("cannot seal the cache file: unexpected safetensors header layout")
    fh.seek(8 + at + len(token) - 2)
    fh.write(b"1")
    fh.flush()


def load(path: str | os.PathLike, name: str | None = None) -> FisEditCache:
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if "fisedit" not in meta:
                raise CacheError(f"{path.name} is not a FISEdit cache file (no FISEdit header): choose a file saved "
                                 f"by FISEditCacheStore")
            if meta.get(_SEALED_KEY) != "1":
                raise CacheError(f"{path.name} is an unfinished write (the process saving it stopped); it cannot "
                                 f"be used: re-save the cache")
            header = json.loads(meta["fisedit"])
            if header.get("format") != FORMAT:
                raise CacheError(f"{path.name} is not a FISEdit cache file: choose a file saved by FISEditCacheStore")
            version = header.get("version")
            if type(version) is not int or version not in READABLE_VERSIONS:  # not True == 1, not "2"
                raise CacheError(f"{path.name} has cache format version {version}; this FISEdit reads versions "
                                 f"{', '.join(map(str, READABLE_VERSIONS))}: update FISEdit, or re-capture the "
                                 f"generation with this one")
            if version >= 3 and header.get(_HEADER_CRC_KEY) != _header_crc32(header):
                raise CacheError(f"{path.name} is corrupted (its header, which holds the sampling settings, fails "
                                 f"its checksum): re-capture or re-save the cache")
            checksums = header["crc32"]

            def tensor(tensor_name: str) -> torch.Tensor:
                t = f.get_tensor(tensor_name)
                if _crc32(t) != checksums[tensor_name]:
                    raise CacheError(f"{path.name} is corrupted ('{tensor_name}' fails its checksum; the file may "
                                     f"be a partial write): re-capture or re-save the cache")
                return t

            store = StepTensors(header["steps"], header["batch"])
            for i, entry in enumerate(header["store"]):
                key = (entry["key"], entry["chunk"])
                store.tensors[key] = tensor(f"store/{i}")
                store.written[key] = torch.ones(store.tensors[key].shape[0], dtype=torch.bool)
            return FisEditCache(
                name=name or header["name"], settings=SamplingSettings.from_json(header["settings"]), store=store,
                noise=tensor("noise"), latent_image=tensor("latent_image"), final_latent=tensor("final_latent"),
                conds=_decode_conds(header["conds"], tensor))
    except CacheError:
        raise
    except Exception as e:  # truncated, corrupted or foreign files surface as safetensors/json errors
        raise CacheError(f"cannot read FISEdit cache {path.name}: {type(e).__name__}: {e}; the file is damaged or "
                         f"not a cache: re-save it with FISEditCacheStore") from e
