"""Saving and loading caches: exact round trip, atomic replace, refusal of paths outside the cache folder."""
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

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


def rewrite(source: Path, target: Path, header=None, drop: str | None = None) -> Path:
    """A copy of a cache file with its FISEdit header changed by `header(dict)` and/or one tensor dropped, written by
    safetensors itself (so the file is well-formed and only FISEdit's own checks can refuse it)."""
    import json
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(source), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != drop}
    if header is not None:
        h = json.loads(meta["fisedit"])
        header(h)
        meta["fisedit"] = json.dumps(h)
    save_file(tensors, str(target), metadata=meta)
    return target


def with_header_checksum(h):
    from fisedit_engine import persistence
    h["header_crc32"] = persistence._header_crc32(h)


def test_the_header_carries_a_format_version_and_a_checksum(captured):
    import json
    from safetensors import safe_open
    from fisedit_engine import persistence
    with safe_open(str(captured[1]), framework="pt") as f:
        header = json.loads(f.metadata()["fisedit"])
    assert header["format"] == "fisedit-cache" and header["version"] == persistence.FORMAT_VERSION == 3
    assert header["header_crc32"] == persistence._header_crc32(header)
    assert set(header["crc32"]) >= {"noise", "final_latent", "store/0"}


def test_a_newer_or_unknown_format_version_is_refused(captured, cache_folder):
    from fisedit_engine import persistence
    from fisedit_engine.cache import CacheError
    for version in (4, 1, 0, "3", None, True):
        def set_version(h, version=version):
            h["version"] = version
            with_header_checksum(h)
        path = rewrite(captured[1], cache_folder / "future.safetensors", set_version)
        with pytest.raises(CacheError, match=f"cache format version {version}; this FISEdit reads versions 2, 3"):
            persistence.load(path)


def test_a_version_2_file_without_a_header_checksum_still_loads(captured, cache_folder):
    from fisedit_engine import persistence

    def as_version_2(h):
        h["version"] = 2
        del h["header_crc32"]
    loaded = persistence.load(rewrite(captured[1], cache_folder / "v2.safetensors", as_version_2))
    assert loaded.settings == captured[0].settings and torch.equal(loaded.final_latent, captured[0].final_latent)


def test_a_changed_setting_in_the_header_fails_its_checksum(captured, cache_folder):
    """Damage that still parses: one digit of the seed in the stored settings, flipped in place in the file."""
    from fisedit_engine import persistence
    from fisedit_engine.cache import CacheError
    data = captured[1].read_bytes()
    seed = f'\\"seed\\": {captured[0].settings.seed}'.encode()
    assert data.count(seed) == 1
    damaged = data.replace(seed, seed[:-1] + bytes([seed[-1] ^ 1]))  # 3 -> 2: same length, still valid JSON
    (cache_folder / "seed-flipped.safetensors").write_bytes(damaged)
    with pytest.raises(CacheError, match="its header, which holds the sampling settings, fails its checksum"):
        persistence.load(cache_folder / "seed-flipped.safetensors")


@pytest.mark.parametrize("damage", ["empty", "random bytes", "missing tensor", "header not JSON", "no crc32"])
def test_damaged_files_are_refused_and_the_loaded_cache_stays(captured, cache_folder, damage):
    """A failed load changes nothing: the cache loaded earlier from the same file name stays in the registry."""
    import reliability
    from fisedit_engine import api
    from fisedit_engine.cache import CacheError
    target = cache_folder / "damaged.safetensors"
    target.write_bytes(captured[1].read_bytes())
    good = api.load("damaged.safetensors")
    before = reliability.registry_snapshot()
    if damage == "empty":
        target.write_bytes(b"")
    elif damage == "random bytes":
        target.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8,
                                         generator=torch.Generator().manual_seed(0)).numpy().tobytes())
    elif damage == "missing tensor":
        rewrite(captured[1], target, drop="final_latent")
    elif damage == "header not JSON":
        rewrite(captured[1], target).write_bytes(target.read_bytes().replace(b'{\\"format', b'[\\"format', 1))
    else:
        def drop_crc(h):
            del h["crc32"]
            with_header_checksum(h)
        rewrite(captured[1], target, drop_crc)
    with pytest.raises(CacheError, match="damaged.safetensors"):
        api.load("damaged.safetensors")
    reliability.assert_registry_unchanged(before)
    assert good.get().settings == captured[0].settings


_PICKLE_PAYLOAD = textwrap.dedent("""
    import pickle, sys
    class Payload:
        def __reduce__(self):
            return (open, (sys.argv[2], "w"))  # unpickling this creates the marker file
    with open(sys.argv[1], "wb") as f:
        pickle.dump({"weights": Payload()}, f)
""")


def test_a_pickle_is_never_unpickled(captured, cache_folder, tmp_path):
    """Cache files are read with safetensors only: a pickle under a cache name is refused, its code never runs."""
    from fisedit_engine import api
    from fisedit_engine.cache import CacheError
    marker = tmp_path / "pickle-ran"
    subprocess.run([sys.executable, "-c", _PICKLE_PAYLOAD, str(cache_folder / "pickled.safetensors"), str(marker)],
                   check=True)
    with pytest.raises(CacheError, match="cannot read FISEdit cache pickled.safetensors"):
        api.load("pickled.safetensors")
    assert not marker.exists()
    engine = Path(__file__).resolve().parents[2] / "fisedit_engine"
    sources = "".join(p.read_text() for p in engine.rglob("*.py"))
    assert not any(call in sources for call in ("import pickle", "pickle.load", "torch.load(", "weights_only=False"))


def test_links_in_the_cache_folder_cannot_lead_out(captured, cache_folder, tmp_path):
    from fisedit_engine import api
    from fisedit_engine.cache import CacheError
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(captured[1].read_bytes())
    (cache_folder / "link-out.safetensors").symlink_to(outside)
    (cache_folder / "link-in.safetensors").symlink_to(captured[1])
    (cache_folder / "loop").symlink_to(cache_folder / "loop")
    for name in ("link-out", "link-out.safetensors"):
        with pytest.raises(CacheError, match="outside the FISEdit cache folder"):
            api.resolve_cache_path(name)
    with pytest.raises(CacheError, match="outside the FISEdit cache folder"):
        api.load("link-out.safetensors")  # as FISEditCacheLoad's cache_file
    with pytest.raises(CacheError, match="save_path 'loop/x' cannot be used"):
        api.resolve_cache_path("loop/x")
    assert api.load("link-in.safetensors").get().settings == captured[0].settings  # a link inside is fine


@pytest.mark.parametrize("bad", ["../../etc/passwd", "/etc/passwd", "a/../../x", "x\x00y", "tab\there", "..",
                                 "sub/../../../x.safetensors"])
def test_cache_file_names_cannot_leave_the_folder_either(captured, bad):
    from fisedit_engine import api
    from fisedit_engine.cache import CacheError
    with pytest.raises(CacheError):
        api.load(bad)


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.one_of(
    st.lists(st.sampled_from(["a", "b", ".", "..", "/", "\\", "~", " ", "\x00", "\n", "é", "*", ":"]),
             max_size=12).map("".join),
    st.lists(st.sampled_from(["..", ".", "", "a", "~", "x.safetensors", "/", "C:"]), max_size=6).map("/".join),
    st.text(max_size=30)))
def test_any_save_path_resolves_inside_the_cache_folder_or_is_refused(captured, cache_folder, name):
    from fisedit_engine import api
    from fisedit_engine.cache import CacheError
    try:
        target = api.resolve_cache_path(name)
    except CacheError:
        event("refused")
        return
    event("accepted")
    folder = cache_folder.resolve()
    assert folder in target.parents and target == target.resolve() and target.suffix == ".safetensors"
