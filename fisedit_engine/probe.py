"""Probe steps: the first steps of the edited generation, run to find where the edit changes the image.

The probe runs the cached generation's own sampler over its full schedule with the edited prompt, dense, computing
only the positive branch; the negative prediction is the cached one (the same negative prompt; at step 0 the same
latent too, later an approximation good enough to locate the change). It stops itself at step `steps` by raising
inside the model call, so its trajectory is exactly the one the full edit run takes, for every sampler (a truncated
schedule would change SDE noise and multistep coefficients). It keeps the latents it passed through and the
positive branch's model outputs: the difference of the latents to the cached ones gives the mask, and the sparse
run replays the outputs for the probe steps instead of recomputing them (edit.py). It also keeps the clean latent
that the last probe step predicts: decoded, it shows an added object where the original image has nothing to follow
(api.difference_mask). Its cross-attention layers are attention_control's substitutes, which control the first
steps (if asked) and sum where the changed words look (word_attention.py), the mask's second signal.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from . import attention_control, word_attention
from . import comfy_adapter as host
from . import warm
from .cache import CacheError, FisEditCache, same_sigma
from .graphs import StepGraph
from .layout import LATENT_KEY, MODEL_OUTPUT_KEY, UNetLayout
from .mask import difference_map


@dataclass
class ProbeState:
    steps: int                   # K: the probe ran steps 0..K-1
    cond_outputs: torch.Tensor   # [K, B, C, H, W]: the positive branch's model output at each probe step
    latents: torch.Tensor        # [K + 1, B, C, H, W]: the latent entering steps 0..K
    difference: torch.Tensor     # [B, H, W]: the accumulated, per-step normalised latent difference
    attention: torch.Tensor | None = None  # [B, H, W]: where the changed words look (word_attention.latent_map)
    predicted: torch.Tensor | None = None  # [B, C, H, W]: the clean latent the edited run predicts at the last step
    seconds: float = 0.0         # wall time of the probe run (the edit's summary line adds it to the sampling's)
    graph_replays: int = 0       # probe steps replayed as a CUDA graph

    @property
    def edit_map(self) -> torch.Tensor:
        """[B, H, W]: what the auto mask is cut from, the difference weighted by the changed words' attention."""
        return word_attention.weighted(self.difference, self.attention)


class _ProbeDone(Exception):
    """Raised inside the model call of step K: the probe has what it needs."""


class _ProbeRecorder:
    """APPLY_MODEL wrapper of the probe: records each step's latent and positive output; stops at step K.

    The probe runs one model call per step (the positive branch), so a call's step is the count of calls before it:
    reading the call's sigma on the host would wait for the device every step. The sigmas are kept on the device and
    checked against the schedule once the probe has run (`check_sigmas`)."""

    def __init__(self, sigmas: torch.Tensor, steps: int, batch: int, on_step=None):
        self.sigmas, self.steps, self.batch, self.on_step = sigmas, steps, batch, on_step
        self.latents: dict[int, torch.Tensor] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.calls: list[list[int]] = []  # cond_or_uncond of every model call, for the tests
        self.step = -1               # the step of the model call in progress
        self._sigmas: list = []      # each call's sigma, as the sampler passed it
        self._last_output = None

    def __deepcopy__(self, memo):
        return self

    def on_output(self, module, inputs, output):
        self._last_output = output

    def __call__(self, executor, *args, **kwargs):
        x, transformer_options = host.apply_model_args(args, kwargs)
        self.step = step = len(self.calls)
        self._sigmas.append(transformer_options["sigmas"].detach().reshape(-1)[:1])
        self.calls.append(list(transformer_options.get("cond_or_uncond", [])))
        self.latents[step] = _to_host(x[:self.batch])
        if step >= self.steps:
            raise _ProbeDone()
        token = attention_control.probe_step.set(step)
        try:
            out = executor(*args, **kwargs)
        finally:
            attention_control.probe_step.reset(token)
        self.outputs[step] = _to_host(self._last_output[:self.batch])
        if self.on_step is not None:
            self.on_step(step + 1)
        return out

    def check_sigmas(self) -> None:
        """Raises CacheError if a model call was not at its step's sigma (a sampler that skips or repeats steps)."""
        for step, sigma in enumerate(torch.cat(self._sigmas).float().cpu().tolist() if self._sigmas else []):
            expected = float(self.sigmas[step]) if step < len(self.sigmas) else math.nan
            if not same_sigma(expected, sigma):
                raise CacheError(f"the probe's sampler evaluated the model at sigma {sigma:.4g} where step {step} of "
                                 f"the schedule is at {expected:.4g} (it skipped or repeated steps): use mask_mode "
                                 f"'user', or a sampler that evaluates the model once per step, such as euler")


def _to_host(value: torch.Tensor) -> torch.Tensor:
    """A copy in host memory that does not wait for the device (pinned, landed once run_probe synchronises): a
    blocking copy per step would keep the host from preparing the next step while the device runs this one."""
    if not value.is_cuda:
        return value.detach().clone()
    return torch.empty(value.shape, dtype=value.dtype, pin_memory=True).copy_(value.detach(), non_blocking=True)


def _on_host(value: torch.Tensor | None) -> torch.Tensor | None:
    return None if value is None else value.float().cpu()


class ProbeStepGraph(StepGraph):
    what = "probe step"


KEPT = "probe graph"  # warm.py: what a finished probe keeps for the next probe of its source


class KeptProbe:
    """A probe's captured graph and the controlled layers whose buffers it reads, for the next probe of the same
    source whose key is equal (warm.py)."""

    def __init__(self, graph: ProbeStepGraph, controlled: list):
        self.graph = graph
        self.layers = {layer.key: layer for layer in controlled}

    def close(self) -> None:
        self.graph.close()
        self.layers = {}


def _kept_key(model, source: FisEditCache, positive: list, control_mode: str, sums: bool) -> tuple:
    return warm.key(source=warm.same(source.store), device=str(torch.device(model.load_device)),
                    prompt_shapes=warm.conditioning_shapes(positive), options=(control_mode, sums))


class ProbeStepWrapper:
    """A DIFFUSION_MODEL wrapper: the probe's UNet calls replay one CUDA graph (graphs.py), captured at the first
    probe step (after an eager one, the first time on a device). Before each call the cross-attention layers
    stage the step's original queries and flags in their device buffers, which the graph reads."""
    fisedit_patch = True

    def __init__(self, graph: ProbeStepGraph, recorder: _ProbeRecorder, controlled: list):
        self.graph, self.recorder, self.controlled = graph, recorder, controlled

    def __deepcopy__(self, memo):
        return self

    def __call__(self, executor, *args, **kwargs):
        step = attention_control.probe_step.get()
        if step is None:
            return executor(*args, **kwargs)
        x = args[0]
        for layer in self.controlled:
            layer.stage(step, x)
        self.graph.check_weights(executor.class_obj)
        if self.graph.captures_next():
            context = kwargs.get("context", args[2] if len(args) > 2 else None)
            for layer in self.controlled:
                layer.prepare(context)
        out = self.graph.run(None, executor, args, kwargs)
        self.recorder.on_output(None, None, out)  # a replay runs no hook
        return out


def run_probe(model, source: FisEditCache, positive: list, steps: int, attention_control_on: bool = False,
              on_step=None, cuda_graph: bool = True,
              control_mode: str = "rescaled", control_steps: int | None = None,
              word_attention_on: bool = True) -> tuple[ProbeState, list[list[int]]]:
    """Runs `steps` probe steps of the edited generation; returns the probe state and the model calls' chunks.
    With attention control, the cross-attention maps of the prompt positions the edit left unchanged are the
    original run's (attention_control.py; `control_mode` one of its MODES), in the first `control_steps` probe steps
    (None: all). With `word_attention_on`, the state holds where the changed words look (word_attention.py).
    `on_step(done)` is called after each
    probe step (a progress bar). On a CUDA device the probe steps replay one captured CUDA graph unless `cuda_graph`
    is False."""
    s = source.settings
    if not 1 <= steps < s.steps:
        raise CacheError(f"probe_steps must be between 1 and {s.steps - 1} (the cache has {s.steps} steps); got "
                         f"{steps}")
    if control_steps is not None and control_steps < 1:
        raise ValueError(f"attention control's steps is 1 or more (or None: every probe step), got {control_steps}")
    batch = s.latent_shape[0]
    sigmas = torch.tensor(s.sigmas)
    recorder = _ProbeRecorder(sigmas[:-1], steps, batch, on_step)
    patched = model.clone()
    host.add_apply_model_wrapper(patched, recorder)
    host.add_conditioning_on_device(patched)
    controlled = attention_control.attach(patched, UNetLayout.from_unet(model.model.diffusion_model), source,
                                          positive, steps, control_mode, control_steps if attention_control_on else 0,
                                          sums=word_attention_on)
    graph = key = None
    if cuda_graph and torch.device(model.load_device).type == "cuda":
        key = _kept_key(model, source, positive, control_mode, word_attention_on)
        kept = warm.take(source, KEPT, key)
        if kept is not None:
            graph = kept.graph
            graph.restart()
            for layer in controlled:
                layer.adopt(kept.layers[layer.key])
        else:
            graph = ProbeStepGraph(model.load_device)
        host.add_diffusion_model_wrapper(patched, ProbeStepWrapper(graph, recorder, controlled))
    model_sampling = patched.get_model_object("model_sampling")

    def uncond_denoised(x, sigma):
        step = recorder.step  # the positive call of this step has just run
        eps = source.read(MODEL_OUTPUT_KEY, step, host.UNCOND).to(x.device, non_blocking=True)  # a cache: immutable
        return model_sampling.calculate_denoised(sigma, eps.float(), x)

    predicted = []  # each step's prediction of the clean latent; the last one shows the edit most clearly

    def keep_prediction(denoised):
        predicted[:] = [denoised[:batch].detach()]

    guider = host.probe_guider(patched, positive, source.conds.get("negative", []), s.cfg, uncond_denoised,
                               on_denoised=keep_prediction)
    sampler = host.make_sampler(s.sampler, s.sampler_extra_options, s.sampler_inpaint_options)
    unet_out = model.model.diffusion_model.out
    hook = unet_out.register_forward_hook(recorder.on_output)
    t0 = time.perf_counter()
    done = False
    try:
        guider.sample(source.noise, source.latent_image, sampler, sigmas, seed=s.seed, disable_pbar=True)
    except _ProbeDone:
        done = True
    else:
        raise CacheError("the probe ran to the end of the schedule without reaching its last step (the sampler skipped "
                         "model calls): use mask_mode 'user', or a sampler such as euler")
    finally:
        hook.remove()
        if torch.device(model.load_device).type == "cuda":
            torch.cuda.synchronize()  # the copies to host memory (_to_host) have landed
        if graph is not None:
            if done and graph.reusable:
                warm.keep(source, KEPT, key, KeptProbe(graph, controlled))
            else:
                graph.close()
    recorder.check_sigmas()
    latents = torch.stack([recorder.latents[i] for i in range(steps + 1)])
    cached = [source.read(LATENT_KEY, i) for i in range(1, steps + 1)]
    state = ProbeState(steps, torch.stack([recorder.outputs[i] for i in range(steps)]), latents,
                       difference_map(list(latents[1:]), cached),
                       attention=_on_host(word_attention.latent_map(controlled, tuple(s.latent_shape[-2:]))),
                       predicted=predicted[0].float().cpu() if predicted else None, seconds=time.perf_counter() - t0,
                       graph_replays=graph.replays if graph is not None else 0)
    return state, recorder.calls
