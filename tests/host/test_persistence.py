"""Saving and loading caches: exact round trip, atomic replace, refusal of paths outside the cache folder."""
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import tiny_models
from tiny_models import sample


@pytest.fixture(scope="module")
def cache_folder(host, tmp_path_factory):
    import folder_paths
    folder = tmp_path_factory.mktemp("fisedit_caches")
    folder_paths.folder_names_and_paths["fisedit_caches"] = ([str(folder)], {".safetensors"})
    return folder


@pytest.fixture(scope="module")
def captured(host, cache_folder):
    from fisedit_engine import api
    model = tiny_models.build("sdxl", seed=5)  # SDXL structure: pooled output and sizes in the conditioning
    patched, handle = api.capture(model, "persist")
    out = sample(patched, "sdxl", batch=2, cfg=5.0, sampler="dpmpp_2m")
    cache, path = api.store(handle, {"samples": out}, save_path="round/trip")
    return cache, path


def test_round_trip_is_exact(captured, cache_folder):
    from fisedit_engine import api
    cache, path = captured
    assert path == cache_folder / "round" / "trip.safetensors" and path.is_file()
    assert "round/trip.safetensors" in api.list_cache_files()
    loaded = api.load("round/trip.safetensors").get()
    assert loaded.settings == cache.settings
    assert set(loaded.store.tensors) == set(cache.store.tensors)
    for key, t in cache.store.tensors.items():
        assert loaded.store.tensors[key].dtype == t.dtype and torch.equal(loaded.store.tensors[key], t), key
    for name in ("noise", "latent_image", "final_latent"):
        assert torch.equal(getattr(loaded, name), getattr(cache, name))
    for kind in ("positive", "negative"):
        (t0, e0), = cache.conds[kind]
        (t1, e1), = loaded.conds[kind]
        assert torch.equal(t0, t1) and e0.keys() == e1.keys()
        assert torch.equal(e0["pooled_output"], e1["pooled_output"]) and e0["width"] == e1["width"]


@pytest.mark.parametrize("bad", ["/tmp/evil", "../evil", "a/../../evil", ""])
def test_save_path_cannot_leave_the_cache_folder(captured, bad):
    from fisedit_engine import api
    from fisedit_engine.cache import CacheError
    with pytest.raises(CacheError, match="save_path"):
        api.resolve_cache_path(bad)


def test_symlink_out_of_the_cache_folder_is_refused(captured, cache_folder, tmp_path):
    from fisedit_engine import api
    from fisedit_engine.cache import CacheError
    (cache_folder / "escape").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(CacheError, match="outside the FISEdit cache folder"):
        api.resolve_cache_path("escape/x")


def test_foreign_and_truncated_files_are_refused(captured, cache_folder):
    from safetensors.torch import save_file
    from fisedit_engine import api
    from fisedit_engine.cache import CacheError
    save_file({"w": torch.zeros(3)}, str(cache_folder / "foreign.safetensors"))
    with pytest.raises(CacheError, match="not a FISEdit cache"):
        api.load("foreign.safetensors")
    data = captured[1].read_bytes()
    (cache_folder / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CacheError, match="cannot read"):
        api.load("truncated.safetensors")
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF  # one bit pattern in the last tensor's data
    (cache_folder / "flipped.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(CacheError, match="corrupted"):
        api.load("flipped.safetensors")


_WRITER = textwrap.dedent("""
    import os, sys, time
    sys.path[:0] = [sys.argv[1]]
    from fisedit_engine import persistence
    cache = persistence.load(sys.argv[2])
    cache.settings = cache.settings.__class__(**{**cache.settings.__dict__, "seed": 999})  # a different new version

    def stalled_fsync(fd):  # the data is written; stop here until killed, as a crash or power cut would
        print("syncing", flush=True)
        time.sleep(60)
    os.fsync = stalled_fsync
    persistence.save(cache, sys.argv[2])
""")


def test_a_write_killed_midway_leaves_the_previous_file_loadable(captured, cache_folder):
    from fisedit_engine import persistence
    from fisedit_engine.cache import CacheError
    cache, _ = captured
    target = cache_folder / "killed.safetensors"
    persistence.save(cache, target)
    before = target.read_bytes()
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(root), str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "syncing"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert target.read_bytes() == before
    assert persistence.load(target).settings == cache.settings
    partial, = cache_folder.glob(".killed.safetensors.partial-*")  # the kill left the temporary file behind
    with pytest.raises(CacheError, match="unfinished write"):
        persistence.load(partial)
