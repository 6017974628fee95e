"""The probe's recorder counts its model calls as steps (reading each call's sigma would wait for the device) and
checks the sigmas against the schedule once the probe has run: a sampler off the schedule is refused, naming why."""
import pytest
import torch

from fisedit_engine.cache import CacheError
from fisedit_engine.probe import _ProbeDone, _ProbeRecorder


def run(recorder, sigmas):
    """Model calls at `sigmas`, as ComfyUI's apply_model passes them to an APPLY_MODEL wrapper."""
    x = torch.zeros(1, 4, 2, 2)
    for sigma in sigmas:
        options = {"sigmas": torch.tensor([sigma]), "cond_or_uncond": [0]}
        try:
            recorder.on_output(None, None, x + sigma)
            recorder(lambda *args, **kwargs: x, x, None, None, None, None, options)
        except _ProbeDone:
            return


def test_calls_are_steps_and_their_sigmas_are_checked_afterwards():
    schedule = torch.tensor([14.6, 7.0, 2.5, 0.9])
    recorder = _ProbeRecorder(schedule, steps=2, batch=1)
    run(recorder, [14.6, 7.0, 2.5])
    recorder.check_sigmas()
    assert sorted(recorder.outputs) == [0, 1] and sorted(recorder.latents) == [0, 1, 2]
    assert torch.equal(recorder.outputs[1], torch.full((1, 4, 2, 2), 7.0))
    skipping = _ProbeRecorder(schedule, steps=2, batch=1)
    run(skipping, [14.6, 2.5, 0.9])
    with pytest.raises(CacheError, match="at sigma 2.5 where step 1 of the schedule is at 7 .*skipped or repeated"):
        skipping.check_sigmas()
