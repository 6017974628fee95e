"""ComfyUI's interrupt during capture, probe and sparse sampling, at chosen steps.

Two ways the interrupt reaches a run, as in a server: the Cancel button sets ComfyUI's interrupt flag
(`interrupt_current_processing`), and the next ComfyUI op inside the model raises InterruptProcessingException; or a
sampler callback (ComfyUI's progress callback) raises it between steps. After each: the exception reaches the caller
(ComfyUI's executor reports the prompt interrupted), the registry holds exactly what it held (a cache sealed earlier
under the same name is intact, bit for bit; no half-recorded cache is registered or can be sealed; every reserved
byte is returned), and the model is unpatched (I6: a stock run gives the stock result, nothing of FISEdit stays).
"""
import pytest
import torch

import reliability
import tiny_models
from tiny_models import sample

STEPS, SIZE = 4, 16
NAME = "interrupt"


@pytest.fixture(scope="module")
def model(host):
    return tiny_models.build("sd15", seed=1)


@pytest.fixture(scope="module")
def stock(model):
    return sample(model, "sd15", size=SIZE)


@pytest.fixture(scope="module")
def sealed(model):
    """A capture sealed under NAME before any interrupt: (capture handle, Store's output handle, its digest)."""
    from fisedit_engine import api
    captured, handle = api.capture(model, NAME)
    cache, _ = api.store(handle, {"samples": sample(captured, "sd15", size=SIZE)})
    return captured, handle, api.sealed_handle(cache), reliability.cache_digest(cache)


def mm():
    import comfy.model_management  # importable once the host fixture has booted ComfyUI
    return comfy.model_management


class InterruptAt:
    """Interrupts the run at model call `call` (each run here makes one model call per step it computes)."""

    def __init__(self, unet, call: int, how: str):
        self.call, self.how, self.calls = call, how, 0
        self.hook = unet.register_forward_pre_hook(self)

    def __call__(self, module, inputs):
        if self.calls == self.call:
            if self.how == "flag":
                mm().interrupt_current_processing(True)  # the Cancel button; ComfyUI's next op raises
            else:
                raise mm().InterruptProcessingException()
        self.calls += 1

    def remove(self):
        self.hook.remove()


def callback_at(step):
    def callback(i, *args):
        if i == step:
            raise mm().InterruptProcessingException()
    return callback


def interrupted(run, unet, how, at):
    """Runs `run(callback)` with the interrupt injected; asserts it came out as ComfyUI's interrupt, and the flag
    was consumed (a flag left set would interrupt the next, unrelated prompt)."""
    injector = InterruptAt(unet, at, how) if how != "callback" else None
    try:
        with pytest.raises(mm().InterruptProcessingException):
            run(callback_at(at) if how == "callback" else None)
    finally:
        if injector is not None:
            injector.remove()
        flag_left = mm().processing_interrupted()
        mm().interrupt_current_processing(False)
    assert not flag_left


def assert_intact(sealed, before):
    _, _, store_output, digest = sealed
    reliability.assert_registry_unchanged(before)
    assert reliability.cache_digest(store_output.get()) == digest


@pytest.mark.parametrize("how", ["callback", "flag"])
@pytest.mark.parametrize("at", [0, 2])
def test_interrupted_capture(model, stock, sealed, how, at):
    """The workflow re-runs its KSampler (another seed) through the same captured model, and is interrupted."""
    from fisedit_engine import api
    from fisedit_engine.cache import CacheError
    captured, handle, _, _ = sealed
    before = reliability.registry_snapshot()
    interrupted(lambda cb: sample(captured, "sd15", size=SIZE, seed=4, callback=cb),
                model.model.diffusion_model, how, at)
    with pytest.raises(CacheError, match=r"interrupted after step \d of 4; re-run the sampler"):
        api.store(handle, {"samples": torch.zeros(1, 4, SIZE, SIZE)})
    assert not handle.recording.store.tensors and handle.recording.reserved == 0
    assert_intact(sealed, before)
    reliability.assert_unpatched(model, lambda: sample(model, "sd15", size=SIZE), stock)


@pytest.mark.parametrize("how", ["raise", "flag"])
@pytest.mark.parametrize("at", [0, 1])
def test_interrupted_probe(model, stock, sealed, how, at):
    from fisedit_engine import api
    store_output = sealed[2]
    before = reliability.registry_snapshot()

    def probe(_):
        with torch.inference_mode():
            api.difference_mask(model, store_output, tiny_models.conditioning("sd15", 99), "auto", probe_steps=2)
    interrupted(probe, model.model.diffusion_model, how, at)
    assert_intact(sealed, before)
    reliability.assert_unpatched(model, lambda: sample(model, "sd15", size=SIZE), stock)
    with torch.inference_mode():  # and the next probe runs normally
        spec, _, _ = api.difference_mask(model, store_output, tiny_models.conditioning("sd15", 99), "auto",
                                         probe_steps=2)
    assert spec.probe.steps == 2


def user_spec(model, store_output, mode="user"):
    from fisedit_engine import api
    box = torch.zeros(1, SIZE * 8, SIZE * 8)
    box[:, 24:80, 32:96] = 1.0
    with torch.inference_mode():
        spec, _, _ = api.difference_mask(model, store_output, tiny_models.conditioning("sd15", 99), mode, box,
                                         probe_steps=1)
    return spec


@pytest.mark.parametrize("how, at, mode", [("callback", 1, "user"), ("flag", 1, "user"), ("callback", 3, "user"),
                                           ("flag", 3, "user"), ("callback", 0, "auto+user")])
def test_interrupted_sparse_sampling(model, stock, sealed, how, at, mode):
    """The same edit ran to the end once, sealing its result cache; re-run and interrupted, that result must stay.
    auto+user with callback 0: interrupted in step 0, which replays the probe without a model call."""
    from fisedit_engine import api
    from fisedit_engine.edit import run_edit
    spec = user_spec(model, sealed[2], mode)
    with torch.inference_mode():
        first, result = api.sparse_sample(model, spec, 0.0, "exact", 4)
    result_digest = reliability.cache_digest(result.get())
    before = reliability.registry_snapshot()

    def edit(callback):
        with torch.inference_mode():
            run_edit(model, spec, callback=callback)
    interrupted(edit, model.model.diffusion_model, how, at)
    assert_intact(sealed, before)
    assert reliability.cache_digest(result.get()) == result_digest
    reliability.assert_unpatched(model, lambda: sample(model, "sd15", size=SIZE), stock)
    with torch.inference_mode():  # the interrupted edit, run again, gives the first result
        again, _ = api.sparse_sample(model, spec, 0.0, "exact", 4)
    assert torch.equal(again["samples"], first["samples"])
