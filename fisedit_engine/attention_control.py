"""Cross-attention control in the probe steps (prompt-to-prompt), so that the latent difference concentrates where
the edited words act.

In every cross-attention layer, at the prompt positions the edit did not change, the attention probabilities are
the original run's, recomputed from the captured queries of that step and layer and the original prompt's keys,
rescaled to the share of attention that the edited run gives those positions; the other positions keep the edited
run's probabilities. So the original decides where, among the words both prompts share, each pixel looks, and the
edited run decides how much each pixel looks at those words rather than at the new ones: every row stays a
distribution. Prompt-to-prompt's "refine" takes the original's probabilities unscaled, which suits its alignment
of every original word with an edited one (the original's row then sums to one over them); here only the common
start is aligned (below). Unscaled ("refine", kept to compare with), the controlled probe lost added objects on the
toy world: 3 of 40 edits failed (benchmarks/results/edit_quality-fifth-run-unscaled-refine.json); on the CPU's masks
(benchmarks/results/mask_control-cpu/) additions scored 0.68 unscaled, 0.71 rescaled and 0.71 without control.
The values are always the edited prompt's, which at unchanged positions equal the original's.

Which positions are unchanged: ComfyUI's CONDITIONING holds embeddings, not tokens, so a position is unchanged when
its edited embedding equals the original one exactly. Under CLIP's causal attention that is the common prefix of the
two prompts (up to the first edited word) and nothing after it: words that follow an insertion or a change have
other embeddings even when the words are the same, and are left uncontrolled.

Which steps: prompt-to-prompt controls the first part of the schedule only, where the layout forms, and lets the
later steps follow the edited prompt. `steps` does the same with the probe's first steps; the others run the edited
prompt's own attention (computed the same way, so that a CUDA graph of the probe step serves both). The node
controls the first probe step only (api.CONTROL_STEPS): on the quality benchmark's 200 toy pairs (GPU, before the
word-attention weighting; benchmarks/results/edit_quality-control-every-step/), controlling all four probe steps
lost an added object whose place shares a word with an existing object's ("at the top" beside "at the top right"),
the controlled mask landing on the existing object; additions scored 0.683 that way, 0.712 with the first step
controlled (none lost) and 0.708 without control; shape changes 0.700, 0.695 and 0.691. With the word-attention
weighting, control in the first step and none score alike (benchmarks/results/edit_quality.md).

The same layers sum, in every probe step, the attention that the edited prompt's changed positions receive, and the
original run's changed positions (from its captured queries, in the steps the cache holds them for): the auto mask's
second signal (word_attention.py). So they replace the cross-attention in every probe, controlled or not: a probe
without control is one whose layers control no step.
"""
from __future__ import annotations

import contextvars

import torch

from . import comfy_adapter as host
from .cache import CacheError, FisEditCache
from .graphs import outside_capture

probe_step: contextvars.ContextVar[int | None] = contextvars.ContextVar("fisedit_probe_step", default=None)
MODES = ("rescaled", "refine")  # the node's; prompt-to-prompt's unscaled refine


def unchanged_positions(original: list, edited: list) -> torch.Tensor:
    """[tokens] bool: prompt positions whose embedding the edit left exactly as it was."""
    a, b = original[0][0], edited[0][0]
    n = min(a.shape[1], b.shape[1])
    same = torch.zeros(b.shape[1], dtype=torch.bool)
    same[:n] = (a[0, :n] == b[0, :n].to(a.dtype)).all(dim=-1)
    return same


class ControlledCrossAttention:
    """A cross-attention layer's forward during the probe: the original maps at the unchanged positions in the
    controlled steps, and the attention both runs give the changed positions, summed (`sums`)."""
    fisedit_patch = True

    def __init__(self, module, key: str, source: FisEditCache, original_context: torch.Tensor,
                 unchanged: torch.Tensor, mode: str = "rescaled", steps: int | None = None,
                 changed: tuple[torch.Tensor, torch.Tensor] | None = None, grid: tuple[int, int] = (0, 0),
                 original_steps: int = 0):
        if mode not in MODES:
            raise ValueError(f"attention control's mode is one of {MODES}, got '{mode}'")
        if steps is not None and steps < 0:
            raise ValueError(f"attention control's steps is 0 or more (or None: every probe step), got {steps}")
        self.module, self.key, self.source, self.mode, self.steps = module, key, source, mode, steps
        self.original_context, self.unchanged = original_context, unchanged
        # per prompt position of the edited and of the original prompt, how far the edit moved its embedding
        # (word_attention.changed_weights); None: no sums
        self.changed = changed
        self.grid = grid                      # the layer's (height, width) in latent cells of its level
        self.original_steps = original_steps  # the first probe steps whose original queries the cache holds
        self.sums: torch.Tensor | None = None  # [2, B, queries]: the edited and original runs' attention to changes
        self._on_device: dict = {}  # (device, dtype) -> (original keys, unchanged positions, changed weights)
        self._staged: torch.Tensor | None = None  # this step's original queries on the device (stage())
        self._active: torch.Tensor | None = None  # 0-d bool on the device: whether this step is controlled (stage())
        self._reads: torch.Tensor | None = None   # 0-d on the device: 1 where the staged queries are this step's

    def controls(self, step: int) -> bool:
        return self.steps is None or step < self.steps

    def reads_original(self, step: int) -> bool:
        """Whether step `step` computes the original run's attention (for control, for the sums)."""
        return self.controls(step) or (self.changed is not None and step < self.original_steps)

    def __deepcopy__(self, memo):
        return self

    def __call__(self, x, context=None, value=None, mask=None, transformer_options={}):  # noqa: B006 (ComfyUI's)
        step = probe_step.get()
        m = self.module
        if step is None or mask is not None or context is None:
            return type(m).forward(m, x, context=context, value=value, mask=mask,
                                   transformer_options=transformer_options)
        q, k, v = m.to_q(x), m.to_k(context), m.to_v(context if value is None else value)
        # Nothing here waits for the GPU: a blocking upload or a boolean-mask index in each of SDXL's 70 layers
        # would serialise the host's launches with the GPU's work.
        probs = _probabilities(q, k, m.heads)
        k_original, unchanged, changed = self._constants(context)
        n = min(k.shape[1], k_original.shape[1], unchanged.shape[0])
        if self._staged is not None:  # a step of the probe's CUDA graph: what it reads is staged, its flags say
            original = _probabilities(self._staged.to(q.dtype), k_original, m.heads)
            if changed is not None:
                self._add_sums(probs, original * self._reads, changed)
            probs[..., :n] = torch.where(self._active, self._controlled(probs[..., :n], original[..., :n],
                                                                        unchanged[:n]), probs[..., :n])
        else:
            original = None
            if self.reads_original(step):
                q_original = self.source.read(self.key, step, host.COND).to(q.device, q.dtype, non_blocking=True)
                original = _probabilities(q_original, k_original, m.heads)
            if changed is not None:
                self._add_sums(probs, original if step < self.original_steps else None, changed)
            if self.controls(step):
                probs[..., :n] = self._controlled(probs[..., :n], original[..., :n], unchanged[:n])
        b, tokens, inner = q.shape
        heads_v = v.reshape(v.shape[0], v.shape[1], m.heads, -1).transpose(1, 2).float()
        out = (probs @ heads_v).transpose(1, 2).reshape(b, tokens, inner).to(x.dtype)
        return m.to_out(out)

    def _add_sums(self, edited: torch.Tensor, original: torch.Tensor | None, changed) -> None:
        """Adds each query's attention to the changed positions (weighted by how far each moved), averaged over
        heads, in the edited run and (where given) the original run, to `sums`."""
        w_edited, w_original = changed
        parts = [edited.mean(1) @ w_edited,
                 original.mean(1) @ w_original if original is not None else torch.zeros_like(edited[:, 0, :, 0])]
        step_sums = torch.stack(parts)
        if self.sums is None:  # an eager probe's first step; the CUDA graph's buffer is made in stage()
            outside_capture(step_sums.device, "a cross-attention layer's attention sums")
            self.sums = step_sums
        else:
            self.sums.add_(step_sums)

    def _controlled(self, probs: torch.Tensor, original: torch.Tensor, unchanged: torch.Tensor) -> torch.Tensor:
        if self.mode == "rescaled":
            return controlled_probabilities(probs, original, unchanged)
        return torch.where(unchanged, original / original.sum(-1, keepdim=True), probs)

    def stage(self, step: int, x: torch.Tensor) -> None:
        """Copies the original queries of `step` into this layer's buffer on x's device, and whether `step` is
        controlled and reads them into its flags there, which the layer reads from then on: a probe step replayed as
        a CUDA graph (probe.py) reads them there, refilled before each replay. The attention sums start at the
        probe's first step. `x`: the UNet's input of the step."""
        device = x.device
        if self._staged is None:
            outside_capture(device, "a cross-attention layer's buffers")
            first = self.source.read(self.key, 0, host.COND)
            self._staged = torch.zeros(first.shape, dtype=first.dtype, device=device)
            self._active = torch.empty((), dtype=torch.bool, device=device)
            self._reads = torch.empty((), dtype=torch.float32, device=device)
            if self.changed is not None:
                self.sums = torch.zeros(2, x.shape[0], self.grid[0] * self.grid[1], device=device)
        elif step == 0 and self.sums is not None:
            self.sums.zero_()
        self._active.fill_(self.controls(step))
        self._reads.fill_(float(step < self.original_steps))
        if self.reads_original(step):
            self._staged.copy_(self.source.read(self.key, step, host.COND), non_blocking=True)

    def adopt(self, kept: "ControlledCrossAttention") -> None:
        """Reads from the buffers of the same layer of an earlier probe of the source, whose CUDA graph this probe
        replays (warm.py): this prompt's unchanged positions and changed weights are copied into them."""
        self._staged, self._active, self._reads, self.sums = kept._staged, kept._active, kept._reads, kept.sums
        for _, unchanged, changed in kept._on_device.values():
            unchanged.copy_(self.unchanged)
            for buffer, weights in zip(changed or (), self.changed or ()):
                buffer.copy_(weights)
        self._on_device = kept._on_device

    def prepare(self, context: torch.Tensor) -> None:
        """Builds what every step reads on context's device, before a CUDA graph captures a probe step."""
        self._constants(context)

    def _constants(self, context: torch.Tensor) -> tuple:
        key = (context.device, context.dtype)
        if key not in self._on_device:
            outside_capture(context.device, "a cross-attention layer's original keys")
            original_keys = self.module.to_k(self.original_context.to(context.device, context.dtype))
            changed = None if self.changed is None else tuple(w.to(context.device, torch.float32)
                                                              for w in self.changed)
            self._on_device[key] = original_keys, self.unchanged.to(context.device), changed
        return self._on_device[key]


def controlled_probabilities(edited: torch.Tensor, original: torch.Tensor, unchanged: torch.Tensor) -> torch.Tensor:
    """[..., keys]: at the `unchanged` keys, the original's probabilities rescaled to the edited run's total on those
    keys; elsewhere the edited run's."""
    kept = torch.where(unchanged, original, 0.0)
    share = torch.where(unchanged, edited, 0.0).sum(-1, keepdim=True)
    scale = share / kept.sum(-1, keepdim=True).clamp_min(torch.finfo(kept.dtype).tiny)
    return torch.where(unchanged, kept * scale, edited)


def _probabilities(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, heads, queries, keys] softmax attention probabilities, in fp32."""
    b, n, inner = q.shape
    d = inner // heads
    qh = q.reshape(b, n, heads, d).transpose(1, 2).float()
    kh = k.reshape(k.shape[0], k.shape[1], heads, d).transpose(1, 2).float()
    return torch.softmax(qh @ kh.transpose(-1, -2) * d ** -0.5, dim=-1)


def attach(patched, layout, source: FisEditCache, positive: list, steps: int, mode: str = "rescaled",
           control_steps: int | None = None, sums: bool = True) -> list[ControlledCrossAttention]:
    """Substitutes every cross-attention of `patched` for the probe of `steps` steps, controlled in the first
    `control_steps` of them (None: all; 0: none), summing the attention to the changed prompt positions if `sums`;
    returns the substitutes."""
    from .word_attention import changed_weights
    original = source.conds.get("positive")
    if not original:
        raise CacheError("the probe needs the original prompt, which this cache does not hold: re-capture the "
                         "generation")
    unchanged = unchanged_positions(original, positive)
    changed = changed_weights(original, positive) if sums else None
    needed = min(steps, steps if control_steps is None else control_steps)  # controlled steps read the queries
    grids = layout.level_sizes(*source.settings.latent_shape[-2:])
    unet = patched.model.diffusion_model
    modules = dict(unet.named_modules())
    layers = []
    for block in layout.blocks:
        if block.kind != "transformer":
            continue
        for j in range(block.depth):
            path = f"{block.path}.transformer_blocks.{j}.attn2"
            key = f"{path}:q"
            cached = source.cached_steps(key, host.COND)
            if cached < needed:
                raise CacheError(f"attention control needs the cross-attention queries of {needed} probe steps; "
                                 f"this cache holds them for {cached}: lower probe_steps or turn attention_control "
                                 f"off")
            if cached == 0:
                raise CacheError("this cache holds none of the original run's cross-attention queries, which the "
                                 "probe reads: re-capture the generation")
            layers.append(ControlledCrossAttention(modules[path], key, source, original[0][0], unchanged, mode,
                                                   control_steps, changed, grids[block.level], min(cached, steps)))
            patched.add_object_patch(f"diffusion_model.{path}.forward", layers[-1])
    return layers
