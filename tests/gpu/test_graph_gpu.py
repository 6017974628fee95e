"""The sparse step replayed as a CUDA graph gives what the eager sparse step gives: the same edited latent and the
same result cache (whose values a replay records through deferred, graph-owned buffers). Skipped without CUDA."""
import re

import torch

import tiny_models
from tiny_models import sample


def assert_same_caches(expected, actual, name="") -> None:
    """Two edits' result caches hold the same keys and the same values at every step, bit for bit."""
    a, b = expected.get(), actual.get()
    assert a.keys() == b.keys(), name
    for key in a.keys():
        for chunk in a.settings.chunks:
            for step in range(a.cached_steps(key, chunk)):
                assert torch.equal(a.read(key, step, chunk), b.read(key, step, chunk)), (name, key, chunk, step)


def test_graph_replay_equals_the_eager_sparse_steps(host, monkeypatch, caplog):
    """Three ways into the graph, each the eager edit bit for bit: the first edit on a device warms up (an eager
    step, then the capture); a later one captures its first sparse step; one whose capture meets an index map not
    built ahead (prepare_capture skipped) logs why, warms up and captures the next step."""
    from fisedit_engine import api, graphs
    from fisedit_engine.edit import EditSpec, EditState, run_edit
    arch, steps = "sd15", 6
    monkeypatch.setenv("FISEDIT_KEEP_GRAPHS", "0")  # each edit captures its own (the next test reuses them)
    model = tiny_models.build(arch, seed=2, dtype=torch.float16)
    captured, handle = api.capture(model, "gpu-graph")
    original = sample(captured, arch, batch=2, cfg=6.0, sampler="dpmpp_2m", size=64, steps=steps)
    api.store(handle, {"samples": original})
    mask = torch.zeros(2, 64, 64, dtype=torch.bool)
    mask[0, 10:30, 20:44] = True
    mask[1, 40:52, 5:20] = True

    def edit(graph):
        with torch.inference_mode():
            return run_edit(model, EditSpec(handle, tiny_models.conditioning(arch, 99, 2), mask), cuda_graph=graph)

    eager, eager_result = edit(False)
    assert eager_result.graph_replays == 0 and not torch.equal(eager, original)
    monkeypatch.setattr(graphs, "_warm", set())
    runs = {"warm-up": edit(True), "captured first": edit(True)}
    with monkeypatch.context() as m, caplog.at_level("INFO", logger="FISEdit"):
        m.setattr(EditState, "prepare_capture", lambda self, ctx, x: None)
        runs["capture failed"] = edit(True)
    assert "could not be captured as a CUDA graph without a warm-up step (NotPrepared" in caplog.text
    replays = {name: result.graph_replays for name, (_, result) in runs.items()}
    assert replays == {"warm-up": steps - 1, "captured first": steps, "capture failed": steps - 1}
    for name, (replayed, result) in runs.items():
        assert torch.equal(replayed, eager), name
        assert_same_caches(eager_result, result, name)


def test_the_next_edit_with_the_same_mask_replays_the_kept_graph(host, caplog):
    """warm.py: an edit with the mask of the last edit of its source replays that edit's CUDA graph from its first
    sparse step, with its own prompt, and gives the eager edit of that prompt bit for bit, result cache included.
    Weights at other addresses (a reload, a patch) make the kept graph capture anew, with the same result."""
    from fisedit_engine import api
    from fisedit_engine.edit import EditSpec, run_edit
    arch, steps = "sd15", 6
    model = tiny_models.build(arch, seed=5, dtype=torch.float16)
    captured, handle = api.capture(model, "gpu-kept-graph")
    api.store(handle, {"samples": sample(captured, arch, batch=2, cfg=6.0, sampler="dpmpp_2m", size=64,
                                         steps=steps)})
    mask = torch.zeros(2, 64, 64, dtype=torch.bool)
    mask[:, 20:36, 8:30] = True

    def edit(prompt_seed, graph=True):
        with torch.inference_mode():
            return run_edit(model, EditSpec(handle, tiny_models.conditioning(arch, prompt_seed, 2), mask),
                            cuda_graph=graph)

    eager, eager_result = edit(31, graph=False)
    _, first = edit(30)
    assert first.graph_replays > 0 and "kept from the last edit" not in first.edit_summary
    runs = {"kept": edit(31)}
    unet = model.model.diffusion_model
    unet.out[2].weight = torch.nn.Parameter(unet.out[2].weight.detach().clone(), requires_grad=False)
    with caplog.at_level("INFO", logger="FISEdit"):
        runs["weights moved"] = edit(31)
    assert "the model's weights moved since the kept sparse step graph was captured" in caplog.text
    assert runs["kept"][1].graph_replays == steps and "kept from the last edit" in runs["kept"][1].edit_summary
    assert "captured at the first sparse step" in runs["weights moved"][1].edit_summary
    summary = runs["weights moved"][1].edit_summary
    assert re.search(r"captured at the first sparse step in \d+ ms: recording \d+ \(allocating \d+ segments, "
                     r"\d+ MiB\), ending \d+, instantiating \d+", summary), summary
    for name, (latent, result) in runs.items():
        assert torch.equal(latent, eager), name
        assert_same_caches(eager_result, result, name)


def test_another_mask_refits_the_kept_graph_and_replays_it(host, caplog):
    """KeptEdit.refit on a GPU: an edit whose mask's tiles fit the index maps kept from the last edit writes its maps
    into them and replays the kept CUDA graph from its first sparse step, capturing nothing; it gives the eager
    edit that refits the same way (the same padded maps) bit for bit, result cache included, and keeps I4."""
    from fisedit_engine import api
    from fisedit_engine.edit import EditSpec, run_edit
    arch, steps = "sd15", 6
    model = tiny_models.build(arch, seed=6, dtype=torch.float16)
    captured, handle = api.capture(model, "gpu-refit-graph")
    original = sample(captured, arch, batch=2, cfg=6.0, sampler="dpmpp_2m", size=64, steps=steps)
    api.store(handle, {"samples": original})
    first = torch.zeros(2, 64, 64, dtype=torch.bool)
    first[:, 20:36, 8:30] = True
    second = first.clone()
    second[1, :, 22:] = False  # fewer tiles, within the first mask's maps

    def edit(mask, prompt_seed, graph):
        with torch.inference_mode():
            return run_edit(model, EditSpec(handle, tiny_models.conditioning(arch, prompt_seed, 2), mask),
                            tile_size=4, cuda_graph=graph)

    runs = {}
    for graph in (False, True):
        edit(first, 30, graph)
        with caplog.at_level("INFO", logger="FISEdit"):
            runs[graph] = edit(second, 31, graph)
        assert "not reusing" not in caplog.text
        assert "refilled with this mask" in runs[graph][1].edit_summary
    (eager, eager_result), (replayed, result) = runs[False], runs[True]
    assert result.graph_replays == steps and "kept from the last edit" in result.edit_summary
    assert "captured" not in result.edit_summary
    assert torch.equal(replayed, eager)
    outside = ~second[:, None].expand_as(replayed)
    assert torch.equal(replayed[outside], original[outside]) and not torch.equal(replayed, original)
    assert_same_caches(eager_result, result)


def test_the_device_gather_feeds_what_the_host_gather_feeds(host, monkeypatch):
    """The feed moves each step with its planned copies (one launch per element size, the GPU reading the pinned
    cache in place); moved key by key (a gather launch per map), or gathered on the host, the edit and its result
    cache are the same bit for bit. A chained edit's source is a delta, whose rows the host assembles: that edit
    gathers on the host and still keeps I4."""
    from fisedit_engine import api
    from fisedit_engine.edit import EditSpec, run_edit
    from fisedit_engine.feed import EditFeed
    arch, steps = "sd15", 5
    monkeypatch.setenv("FISEDIT_KEEP_GRAPHS", "0")  # the edits forced to move key by key build their own feeds
    model = tiny_models.build(arch, seed=3, dtype=torch.float16)
    captured, handle = api.capture(model, "gpu-device-gather")
    original = sample(captured, arch, batch=2, cfg=6.0, sampler="euler", size=64, steps=steps)
    api.store(handle, {"samples": original})
    mask = torch.zeros(2, 64, 64, dtype=torch.bool)
    mask[:, 12:28, 20:40] = True

    def edit(source, seed):
        with torch.inference_mode():
            return run_edit(model, EditSpec(source, tiny_models.conditioning(arch, seed, 2), mask))

    planned_latent, planned_result = edit(handle, 99)
    stats = planned_result.feed_stats
    assert stats.planned_steps == stats.steps > 0 and stats.host_gathers == 0 and stats.bytes_uploaded > 0
    runs = []
    with monkeypatch.context() as m:
        m.setattr(EditFeed, "_unplannable", lambda self, chunks, device: "forced by the test")
        runs.append(edit(handle, 99))
        m.setattr(EditFeed, "_device_gatherable", lambda self, *args: None)
        runs.append(edit(handle, 99))
    (device_latent, device_result), (host_latent, host_result) = runs
    assert device_result.feed_stats.host_gathers == 0 < host_result.feed_stats.host_gathers
    assert device_result.feed_stats.planned_steps == host_result.feed_stats.planned_steps == 0
    assert not torch.equal(planned_latent, original)
    for latent, result in runs:
        assert result.feed_stats.bytes_uploaded == stats.bytes_uploaded
        assert torch.equal(latent, planned_latent)
        assert_same_caches(planned_result, result)
    chained, chained_result = edit(planned_result, 7)
    assert chained_result.feed_stats.host_gathers > 0
    outside = ~mask[:, None].expand_as(chained)
    assert torch.equal(chained[outside], original[outside]) and not torch.equal(chained, planned_latent)

def test_probe_replayed_as_a_graph_equals_the_eager_probe(host, monkeypatch):
    """The probe's steps replayed from a CUDA graph (its cross-attention layers read the original queries and flags
    staged before each replay, and sum into buffers zeroed at the first step) give the eager probe's latents,
    outputs, difference and attention maps bit for bit: the first probe on a device after an eager warm-up step, a
    later one from its first step."""
    from fisedit_engine import api, graphs
    from fisedit_engine.probe import run_probe
    arch, steps, probe_steps = "sd15", 8, 3
    model = tiny_models.build(arch, seed=4, dtype=torch.float16)
    captured, handle = api.capture(model, "gpu-probe-graph")
    api.store(handle, {"samples": sample(captured, arch, batch=2, cfg=6.0, sampler="euler", size=64, steps=steps)})
    edited = tiny_models.conditioning(arch, 21, 2)
    monkeypatch.setattr(graphs, "_warm", set())
    for control, control_steps in ((True, None), (True, 1), (False, None)):
        with torch.inference_mode():
            eager, _ = run_probe(model, handle.get(), edited, probe_steps, control, cuda_graph=False,
                                 control_steps=control_steps)
            runs = [run_probe(model, handle.get(), edited, probe_steps, control, control_steps=control_steps)[0]
                    for _ in range(2)]
        assert eager.graph_replays == 0
        first_time = control and control_steps is None  # the first probe on the device: an eager warm-up step
        assert [r.graph_replays for r in runs] == ([probe_steps - 1, probe_steps] if first_time else [probe_steps] * 2)
        for replayed in runs:
            for field in ("cond_outputs", "latents", "difference", "attention", "predicted"):
                assert torch.equal(getattr(replayed, field), getattr(eager, field)), (control, control_steps, field)


def test_the_next_probe_replays_the_kept_probe_graph_with_its_own_prompt(host):
    """warm.py: a probe of the same source replays the last probe's graph from its first step, reading its own
    prompt and, with attention control, its own unchanged prompt positions (copied into the kept layers' buffers):
    the eager probe of that prompt bit for bit."""
    from fisedit_engine import api
    from fisedit_engine.probe import run_probe
    arch, steps, probe_steps = "sd15", 8, 3
    model = tiny_models.build(arch, seed=6, dtype=torch.float16)
    captured, handle = api.capture(model, "gpu-kept-probe")
    api.store(handle, {"samples": sample(captured, arch, batch=2, cfg=6.0, sampler="euler", size=64, steps=steps)})
    original = handle.get().conds["positive"]
    first = tiny_models.conditioning(arch, 40, 2)
    second = [[first[0][0].clone(), dict(first[0][1])]]
    second[0][0][:, :5] = original[0][0][:, :5]  # an edit after the fifth token: those stay under control
    for control, control_steps in ((True, None), (True, 1), (False, None)):
        with torch.inference_mode():  # the kept graph's layers control every step; the next probe's only its first
            eager, _ = run_probe(model, handle.get(), second, probe_steps, control, cuda_graph=False,
                                 control_steps=control_steps)
            run_probe(model, handle.get(), first, probe_steps, control)
            kept, _ = run_probe(model, handle.get(), second, probe_steps, control, control_steps=control_steps)
        assert kept.graph_replays == probe_steps
        for field in ("cond_outputs", "latents", "difference", "attention", "predicted"):
            assert torch.equal(getattr(kept, field), getattr(eager, field)), (control, control_steps, field)


def test_the_conditioning_reaches_the_model_calls_on_the_device(host):
    """comfy_adapter.conditioning_on_device: the edit's and the probe's model calls get the cross-attention
    conditioning already on the GPU (ComfyUI would copy it from host memory in every call, waiting for the device)."""
    from fisedit_engine import api
    from fisedit_engine.comfy_adapter import add_apply_model_wrapper
    from fisedit_engine.edit import EditSpec, run_edit
    from fisedit_engine.probe import run_probe
    arch = "sd15"
    model = tiny_models.build(arch, seed=7, dtype=torch.float16)
    captured, handle = api.capture(model, "gpu-conditioning")
    api.store(handle, {"samples": sample(captured, arch, size=64, steps=5)})
    devices = []

    class Spy:
        def __deepcopy__(self, memo):
            return self

        def __call__(self, executor, *args, **kwargs):
            devices.append(args[3].device.type)  # apply_model(x, t, c_concat, c_crossattn, ...)
            return executor(*args, **kwargs)

    spied = model.clone()
    add_apply_model_wrapper(spied, Spy())
    mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    mask[:, 10:30, 20:40] = True
    with torch.inference_mode():
        run_probe(spied, handle.get(), tiny_models.conditioning(arch, 8), 2)
        run_edit(spied, EditSpec(handle, tiny_models.conditioning(arch, 9), mask))
    assert len(devices) >= 5 and set(devices) == {"cuda"}, devices
