"""The edit run: the cached generation re-sampled with the edited prompt, computing only the edit's region.

The sampler, its options, the noise, the input latent, the sigmas, cfg and the negative conditioning all come from
the cache, so the run is the original generation except for the positive prompt. A clone of the model carries:
- the capture wrappers, recording the edited run into a new cache (the base for a chained edit): outside the
  active region its values are the source cache's, inside they are the edit's;
- the sparse forwards (sparse.py) on every block of the sparse levels and on the output head.
With a user mask the run is sparse from step 0; the last `dense_tail` fraction of the steps can run dense (the
whole UNet, fresh context everywhere) to soften seams. The output head composites with the mask in every step,
sparse or dense, so outside the mask the model output, and with it the latent of every step, is exactly the
cached one (invariant I4).
"""
from __future__ import annotations

import hashlib
import logging
import time
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import comfy_adapter as host
from . import cost
from . import feed as feeds
from . import other_packs
from . import tiling
from . import warm
from .cache import CacheError, FisEditCache, Region
from .capture import CacheHandle, CaptureApplyModel, CaptureOuterSample, Delta, StepContext, current_step, seal
from .feed import EditFeed
from .fingerprint import conditioning_fingerprint, model_fingerprint
from .graphs import SparseStepGraph, outside_capture
from .joined import JoinedLinears
from .kernels import fused as K
from .kernels import reference as R
from .layout import LATENT_KEY, MODEL_OUTPUT_KEY, UNetLayout
from .plan import Capacity, EditPlan
from .probe import ProbeState
from .registry import registry
from .sparse import SPARSE_FORWARDS, SparseOutput, WholeConv

log = logging.getLogger("FISEdit")

STATS_MODES = ("exact", "cached")


@dataclass
class EditSpec:
    """FISEDIT_EDIT: what to edit (the cache), how (the edited positive conditioning) and where (the mask)."""
    cache: CacheHandle
    positive: list
    mask: torch.Tensor                      # [B or 1, H, W] bool at latent resolution, dilated
    mode: str = "user"
    probe: ProbeState | None = None         # auto modes: the probe steps, replayed instead of recomputed
    result: CacheHandle | None = None       # the edited result's cache, once FISEditSparseKSampler has run

    def __deepcopy__(self, memo):
        return self


@dataclass
class EditState:
    """What the sparse forwards read during an edit run."""
    plan: EditPlan
    source: FisEditCache
    dense_from: int
    stats_mode: str = "exact"
    probe: ProbeState | None = None
    feed: EditFeed | None = None
    graph: SparseStepGraph | None = None    # None: every step runs eagerly
    regions: list = field(default_factory=list)  # the result's delta regions (their device copies are dropped)
    convs: list = field(default_factory=list)    # the UNet's conv modules, which take channels-last weights
    self_attention: tuple = ()  # per sparse transformer block: its self-attention's (to_q, to_k, to_v), joined
    cross_kv: tuple = ()    # every sparse transformer block's cross-attention to_k and to_v, joined
    emb_linears: tuple = ()  # every sparse ResBlock's projection of the time embedding, joined
    linears: JoinedLinears = field(default_factory=JoinedLinears)
    _mask_rows: dict = field(default_factory=dict)
    sparse_convs: list = field(default_factory=list)  # (level, conv): the sparse forwards' 3x3 convs (im2col weights)
    _conv_weights: dict = field(default_factory=dict)  # (id(conv module), form) -> (weight, its state, its copy)

    def end_run(self) -> None:
        """After a run that went through: lets go of what only that run reads, before the state is kept for the next
        edit (warm.py) or closed."""
        self.probe = None

    def close(self) -> None:
        """Gives back what the edit held on the device."""
        for region in {id(r): r for r in self.regions}.values():
            region.release()
        for lp in self.plan.levels.values():
            lp.release()
        self._mask_rows.clear()
        if self.graph is not None:
            torch.cuda.synchronize()  # the last replay's copies to host memory have landed
            self.graph.close()
        self._conv_weights.clear()
        self.linears.clear()
        self.feed.close()

    def conv_weight(self, conv, weight: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """The weight for a conv over `patches` [N, C, tiles, P, Q]: for patches with channels innermost (the Triton
        gather's NHWC layout), `channels_last_weight`."""
        return weight if patches.stride(1) != 1 else self.channels_last_weight(conv, weight)

    def channels_last_weight(self, conv, weight: torch.Tensor) -> torch.Tensor:
        """A channels-last copy of the module's weight, made once per edit: cuDNN's tensor-core convs are
        channels-last and would otherwise transpose a channels-first weight on every call (on an H100, the kernel with
        the most GPU time in a sparse SD2.1@768 step). A cast copy passes through: cuDNN transposes it as it would."""
        if weight.dim() != 4 or weight is not conv.weight:
            return weight
        return self._weight_copy(conv, weight, "channels-last",
                                 lambda w: w.contiguous(memory_format=torch.channels_last))

    def im2col_weight(self, conv, weight: torch.Tensor) -> torch.Tensor:
        """A 3x3 conv's weight [C', C, 3, 3] as the matrix [C', 9 * C] (taps before channels) that multiplies the
        im2col rows of kernels.fused.gather_norm_im2col; made once per edit, like `channels_last_weight`."""
        return self._weight_copy(conv, weight, "im2col", lambda w: w.permute(0, 2, 3, 1).reshape(w.shape[0], -1))

    def im2col_convs(self) -> list:
        """The sparse 3x3 convs that multiply im2col rows: those of the levels whose conv_layout is im2col."""
        return [conv for level, conv in self.sparse_convs if K.conv_layout(level) == "im2col"]

    def _weight_copy(self, conv, weight: torch.Tensor, form: str, make) -> torch.Tensor:
        """`make(weight)`, kept for the edit; made again if the weight was replaced, moved or written since (an edit
        kept for the next one, warm.py, outlives ComfyUI's reloads and patches). A cast copy (offloaded or
        dtype-converted weights) is a temporary: converted on each call, not kept."""
        if weight is not conv.weight:
            return make(weight)
        kept = self._conv_weights.get((id(conv), form))
        state = warm.tensor_state(weight)
        if kept is None or kept[0] is not weight or kept[1] != state:
            outside_capture(weight.device, f"the {form} copy of a conv weight {tuple(weight.shape)}")
            with torch.no_grad():
                kept = self._conv_weights[(id(conv), form)] = (weight, state, make(weight))
        return kept[2]

    def prepare_capture(self, ctx: StepContext, x: torch.Tensor) -> None:
        """Builds on x's device what a sparse step reads besides its inputs and the feed's buffers, before a CUDA
        graph captures the step (graphs.py)."""
        self.plan.prepare(x.device)
        self.mask_rows(ctx, x.device)
        for region in self.regions:
            region.on(x.device)
        for conv in self.convs:
            with host.cast_weights(conv, x) as (w, _):
                self.channels_last_weight(conv, w)
        for conv in self.im2col_convs():
            with host.cast_weights(conv, x) as (w, _):
                self.im2col_weight(conv, w)
        for modules in (*self.self_attention, self.cross_kv, self.emb_linears):
            self.linears.weight(modules, x)

    def shared_linear(self, ctx: StepContext, group: tuple, module, x: torch.Tensor) -> torch.Tensor:
        """`module`'s output for x. The Linear layers of `group` all read x in this model call (the text context, the
        time embedding): at the first of them, one GEMM computes them all (joined.py)."""
        outs = ctx.shared.setdefault(id(x), (x, {}))[1]  # holding x: its id stays its own for the call
        if module not in outs:
            modules = group if module in group else (module,)
            outs.update(zip(modules, self.linears(modules, x)))
        return outs[module]

    def time_embedding(self, ctx: StepContext, resblock, emb: torch.Tensor) -> torch.Tensor:
        """resblock.emb_layers(emb): the SiLU once per model call, and the projections of every sparse ResBlock in
        one GEMM (`emb_linears`)."""
        layers = resblock.emb_layers
        if len(layers) != 2 or type(layers[0]) is not torch.nn.SiLU or layers[1] not in self.emb_linears:
            return layers(emb)
        act = ctx.shared.get(("silu", id(emb)))
        if act is None:
            act = ctx.shared[("silu", id(emb))] = (emb, layers[0](emb))
        return self.shared_linear(ctx, self.emb_linears, layers[1], act[1])

    def is_dense(self, step: int) -> bool:
        return step >= self.dense_from

    def replays(self, step: int) -> bool:
        return self.probe is not None and step < self.probe.steps

    def replay(self, ctx: StepContext, x: torch.Tensor, sigma: torch.Tensor, model_sampling) -> torch.Tensor:
        """A probe step without a model call: inside the mask the probe's positive output, everywhere else (and
        for the negative branch, as in the probe) the cached output. Inside the mask this retraces the probe,
        outside it the original generation, bit for bit. The result cache takes the source's activations."""
        outputs = []
        for chunk in ctx.chunks:
            cached = self.source.read(MODEL_OUTPUT_KEY, ctx.step, chunk)
            if chunk == host.COND:
                cached = torch.where(self.plan.mask[:, None], self.probe.cond_outputs[ctx.step], cached)
            outputs.append(cached)
        eps = torch.cat(outputs).to(x.device)
        ctx.recording.record(MODEL_OUTPUT_KEY, ctx, eps)
        ctx.recording.copy_step(self.source.store, ctx, skip=(MODEL_OUTPUT_KEY, LATENT_KEY))
        return model_sampling.calculate_denoised(sigma, eps.float(), x)

    def cached(self, ctx: StepContext, key: str, like: torch.Tensor) -> torch.Tensor:
        """The source cache's `key` at this step, rows ordered like the model call's chunks. A map of a sparse level
        comes from the feed: valid at the level's read region only, and the sparse op may write into it."""
        if not self.is_dense(ctx.step) and self.feed.has(key):
            self.feed.prepare(ctx.step, ctx.chunks, like.device)
            return self.feed.map(key)
        parts = [self.source.read(key, ctx.step, chunk) for chunk in ctx.chunks]  # a dense step's model output
        return torch.cat(parts).to(like.device)

    def group_stats(self, ctx: StepContext, gn_path: str, x: torch.Tensor, groups: int,
                    inputs: tuple[str, ...]) -> torch.Tensor:
        """Statistics of the GroupNorm at `gn_path`, whose input `x` is the channel concatenation of the maps
        `inputs` (cached outside the level's active region, fresh inside)."""
        cached = self.cached(ctx, f"{gn_path}:stats", x).float()
        if self.stats_mode == "exact":
            lp = self.plan.levels[self.feed.entries[inputs[0]].level]
            cached = K.exact_group_stats(cached, [self.feed.cached_active(k) for k in inputs],
                                         R.AtPositions(x.flatten(2), lp.stat_positions(x.device)[0]),
                                         lp.height * lp.width)
        ctx.recording.record(f"{gn_path}:stats", ctx, cached)
        return cached

    def record_probe_query(self, ctx: StepContext, key: str, fresh: torch.Tensor, lp) -> None:
        """Keeps, for the result cache, the positive chunk's cross-attention queries of the early steps at the active
        tokens (the result is a delta over the source), which attention control in a chained edit's probe reads."""
        if ctx.step >= self.source.cached_steps(key, host.COND) or host.COND not in ctx.chunks:
            return
        rows = fresh.new_zeros(fresh.shape[0], lp.height * lp.width, fresh.shape[2])
        rows[:, lp.tokens(fresh.device)] = fresh  # the result keeps only the active tokens (a delta over the source)
        ctx.recording.record(key, ctx, rows)

    def mask_rows(self, ctx: StepContext, device) -> torch.Tensor:
        """[rows, 1, H, W] bool: each batch row's mask, repeated per CFG chunk."""
        key = (len(ctx.chunks), ctx.batch, str(device))
        if key not in self._mask_rows:
            outside_capture(device, "the edit mask's rows")
            self._mask_rows[key] = _rows_of(self.plan.mask, *key[:2]).to(device)
        return self._mask_rows[key]

    def refit(self, plan: EditPlan) -> None:
        """Takes another mask's plan (one that `self.plan.holds`) into the index maps and mask rows built for this
        one, in place: a kept CUDA graph reads them where they are."""
        if self.graph is not None:
            torch.cuda.synchronize()  # the last replay has read them
        self.plan.refill(plan)
        for (chunks, batch, _), rows in self._mask_rows.items():
            rows.copy_(_rows_of(self.plan.mask, chunks, batch))


def _rows_of(mask: torch.Tensor, chunks: int, batch: int) -> torch.Tensor:
    """A mask [1 or B, H, W] as [chunks * B, 1, H, W]: each batch row's mask, repeated per CFG chunk."""
    mask = mask.expand(batch, *mask.shape[1:]) if mask.shape[0] == 1 else mask
    return mask.repeat(chunks, 1, 1)[:, None]


class SparseStepWrapper:
    """A DIFFUSION_MODEL wrapper: sparse steps of the edit run the UNet through its CUDA graph (graphs.py). It sits
    inside apply_model, whose timestep lookup copies through host memory and cannot be captured."""
    fisedit_patch = True

    def __init__(self, state: EditState):
        self.state = state

    def __deepcopy__(self, memo):
        return self

    def __call__(self, executor, *args, **kwargs):
        ctx, state = current_step(), self.state
        if ctx is None or ctx.edit is not state or state.graph is None or state.is_dense(ctx.step):
            return executor(*args, **kwargs)
        state.graph.check_weights(executor.class_obj)
        state.feed.prepare(ctx.step, ctx.chunks, args[0].device)  # outside the graph: a replay only runs kernels
        if state.graph.captures_next():
            state.prepare_capture(ctx, args[0])
        # this step's values are in the buffers it reads now: the next step's can be staged and uploaded while this
        # one runs and records (feed.py), except while a graph captures, when no other thread may call into CUDA
        following = ctx.step + 1
        prefetch = following < min(state.dense_from, state.source.settings.steps)
        if prefetch and not state.graph.captures_next():
            state.feed.prefetch(following, ctx.chunks, args[0].device)
            prefetch = False
        out = state.graph.run(ctx, executor, args, kwargs)
        if prefetch:
            state.feed.prefetch(following, ctx.chunks, args[0].device)
        return out


def latent_mask(mask: torch.Tensor, latent_hw: tuple[int, int], dilate: int) -> torch.Tensor:
    """An image-resolution MASK [B, H, W] (or [H, W]) -> [B, h, w] bool at latent resolution: a latent pixel is
    in the mask when any of its image pixels is above 0.5 (so soft masks are cut at 0.5, and values above 1 count as
    1); then dilated by `dilate` latent pixels. A dilation beyond the latent's size covers the whole latent, as a
    regenerate would (invariant I2)."""
    if mask.dim() == 2:
        mask = mask[None]
    h, w = latent_hw
    if mask.dim() != 3 or mask.shape[0] == 0:
        raise CacheError(f"the mask has shape {tuple(mask.shape)}; a MASK is [batch, height, width] with batch >= 1: "
                         f"connect a MASK output (LoadImage's mask, a mask editor or a mask node)")
    if tuple(mask.shape[-2:]) != (h * 8, w * 8):
        raise CacheError(f"the mask is {mask.shape[-1]}x{mask.shape[-2]} but the cached image is {w * 8}x{h * 8}: "
                         f"give a mask of the image's size (or resize it with a mask node)")
    if mask.is_floating_point() and not torch.isfinite(mask).all():
        raise CacheError("the mask has NaN or infinite values: fix the node that made it")
    if dilate < 0:
        raise CacheError(f"dilate is a number of latent pixels, 0 or more (got {dilate})")
    binary = (mask.float() > 0.5)[:, None].float()
    m = F.max_pool2d(binary, 8)
    dilate = min(dilate, max(h, w))  # the same result, without a pooling window the size of the request
    if dilate > 0:
        m = F.max_pool2d(m, 2 * dilate + 1, stride=1, padding=dilate)
    return m[:, 0] > 0


def check_model(model, source: FisEditCache) -> None:
    if model_fingerprint(model) == source.settings.model_fingerprint:
        return
    now = tuple(p.describe() for p in host.model_patches(model))
    was = source.settings.model_patches
    if now != was:
        detail = (f"; this model has {'; '.join(now) or 'no patches'}, the capture's had "
                  f"{'; '.join(was) or 'no patches'}")
    else:
        detail = (f"; it has the same kinds of patches ({'; '.join(now)}), so their settings differ or its weights"
                  if now else "; neither has patches, so its weights differ (another checkpoint or model)")
    raise CacheError(f"this model is not the one cache '{source.name}' was captured with (its weights, LoRAs or "
                     f"patches differ{detail}): edit with the model that made the image (the same LoRAs at the "
                     f"same strengths), or re-capture")


def module_forwards(modules: dict, layout: UNetLayout, sparse_levels, convs: dict) -> dict:
    """The forwards an edit substitutes, by module path in the UNet (`modules`: its named modules, "" the UNet): the
    sparse forward of every block at a sparse level, the output head's, and for the other conv modules in `convs` (on
    a GPU) WholeConv. conv_in is both a conv and a sparse block: it takes its sparse forward."""
    forwards = {path: WholeConv(module) for path, module in convs.items()}
    for block in layout.blocks:
        if block.level in sparse_levels:
            forwards[block.path] = SPARSE_FORWARDS[block.kind](modules[block.path], block, block.path)
    forwards["out"] = SparseOutput.for_unet(modules[""], layout)
    return forwards


def run_edit(model, spec: EditSpec, dense_tail: float = 0.0, stats_mode: str = "exact",
             tile_size: int | dict[int, int] | None = None, callback=None,
             cuda_graph: bool = True) -> tuple[torch.Tensor, CacheHandle]:
    """Runs the edit; returns the edited LATENT samples and a handle to the edited result's cache. `tile_size`: one
    size for every sparse level, one per level, or None: per level by the cost model (tiling.py). On a CUDA device
    the sparse steps replay one captured CUDA graph unless `cuda_graph` is False."""
    source = spec.cache.get()
    s = source.settings
    if stats_mode not in STATS_MODES:
        raise CacheError(f"GroupNorm statistics mode '{stats_mode}' is not one of {STATS_MODES}")
    if not 0.0 <= dense_tail <= 1.0:
        raise CacheError(f"dense_tail is a fraction of the steps, between 0 and 1 (got {dense_tail})")
    check_model(model, source)
    dense_steps = round(dense_tail * s.steps)
    unet = model.model.diffusion_model
    layout = UNetLayout.from_unet(unet)
    other_packs.check_edit(model, layout, s.sparse_levels, every_step_dense=dense_steps == s.steps)
    batch = s.latent_shape[0]
    if spec.mask.shape[0] not in (1, batch) or tuple(spec.mask.shape[-2:]) != tuple(s.latent_shape[-2:]):
        raise CacheError(f"the edit mask {tuple(spec.mask.shape)} does not fit the cached latent "
                         f"{s.latent_shape} ({s.describe()}): re-run FISEditDifferenceMask on this cache")
    if not spec.mask.any():  # nothing to recompute: the original, exactly
        log.info("FISEdit edit of '%s': the mask is empty; the original is returned unchanged, no step computed",
                 source.name)
        final = source.final_latent.clone()
        if callback is not None:  # a progress bar left at zero would look like a stalled node
            callback(s.steps - 1, final, final, s.steps)
        return final, spec.cache

    on_gpu = torch.device(model.load_device).type == "cuda"
    modules = dict(unet.named_modules())
    convs = {path: m for path, m in modules.items() if isinstance(m, torch.nn.Conv2d)} if on_gpu else {}
    key = _kept_key(model, source, spec, tile_size, stats_mode, dense_steps, cuda_graph and on_gpu)
    kept, grown = warm.take(source, KEPT, key), None
    if kept is not None:
        refit = warm.refit_enabled()
        refused = kept.refit(spec.mask, refit)
        if refused is not None:
            log.info("FISEdit: not reusing the sparse steps kept from the last edit: %s", refused)
            kept.close()
            kept, grown = None, kept.state.plan if refit else None
    if kept is not None:
        kept.restart(spec.probe)
    else:
        kept = _build(model, source, spec, layout, tile_size, stats_mode, s.steps - dense_steps,
                      cuda_graph and on_gpu, modules, list(convs.values()), grown)
    state, plan, graph = kept.state, kept.state.plan, kept.state.graph

    name = f"{source.name}>edit-{conditioning_fingerprint(spec.positive)[:8]}-{_mask_id(spec.mask)}"
    delta = Delta(source.store, kept.regions, state.dense_from)
    handle = CacheHandle(name, registry(), s.min_sparse_positions, delta=delta)
    patched = model.clone()
    # the model passed check_model: the result records the source's fingerprint, not another of the same model
    host.add_outer_sample_wrapper(patched, CaptureOuterSample(handle, source.settings.model_fingerprint,
                                                              known_layout=(unet, layout)))
    host.add_apply_model_wrapper(patched, CaptureApplyModel(handle, edit=state))
    host.add_conditioning_on_device(patched)
    if graph is not None:
        host.add_diffusion_model_wrapper(patched, SparseStepWrapper(state))
    for path, forward in module_forwards(modules, layout, plan.levels, convs).items():
        patched.add_object_patch(f"diffusion_model.{path}.forward", forward)

    sampler = host.make_sampler(s.sampler, s.sampler_extra_options, s.sampler_inpaint_options)
    t0 = time.perf_counter()
    try:
        samples = host.sample_custom(patched, source.noise, s.cfg, sampler, torch.tensor(s.sigmas), spec.positive,
                                     source.conds.get("negative", []), source.latent_image, s.seed, callback=callback)
    except BaseException:
        kept.close()
        raise
    state.end_run()
    if graph is None or graph.reusable:
        warm.keep(source, KEPT, key, kept)
    else:
        kept.close()
    seconds = time.perf_counter() - t0
    seal(handle, samples).edited_from = (weakref.ref(source), spec.mask)
    handle.feed_stats = state.feed.stats
    handle.graph_replays = graph.replays if graph is not None else 0
    handle.edit_summary = _summary(source, spec, plan, kept.costs, state, seconds, kept.tile_note)
    log.info("%s", handle.edit_summary)
    return samples, handle


KEPT = "sparse steps"  # warm.py: what a finished edit keeps for the next edit of its source


KEEP_TILES = 1.2  # a mask that did not fit the kept steps is planned with their tile sizes where the cost model
# predicts its sparse levels at most this much slower with them, so that the next mask can be refitted: at SD2.1@768 a
# 5% rectangle's best tiles went from (2, 16, 8) to (4, 2, 8) when it moved by 2 latent pixels, each predicted within
# 16% of the other's best (the H200's calibration)

REFIT_WASTE = 1.5  # a kept plan's padded maps may compute up to this many times the MACs a new mask needs: a
# guess until timed (a new mask's capture and planning took about 0.14 s at SD2.1@768 on an H200, its 16 sparse steps
# 0.13 s)


@dataclass
class KeptEdit:
    """An edit's sparse steps as built (plan, feed, CUDA graph, what the graph reads), for the next edit of the same
    source whose key is equal (warm.py): such an edit changes the prompt, which the graph copies in per step, and may
    change the mask, whose index maps `refit` writes into the plan's (plan.py)."""
    state: EditState
    level_regions: dict[int, Region]  # per level, the result's delta region, whose device positions the graph reads
    region_levels: dict[str, int]     # the result's recorded keys with a region, and their levels
    costs: dict                       # for the summary and the padding's waste
    tile_note: str

    @property
    def regions(self) -> dict[str, Region]:
        """The result's delta regions by key."""
        return {key: self.level_regions[lvl] for key, lvl in self.region_levels.items()}

    def refit(self, mask: torch.Tensor, enabled: bool = True) -> str | None:
        """Takes another edit's mask into the kept steps: its plan with the kept tile sizes, written into the kept
        plan's index maps (which its tiles must fit, padded to compute at most REFIT_WASTE times what they need),
        and the result's regions handed over to the new positions. Returns why it cannot, or None. The same mask
        takes them as they are; another one only where `enabled` (warm.refit_enabled)."""
        plan = self.state.plan
        if plan.mask.shape == mask.shape and torch.equal(plan.mask, mask):
            return None
        if not enabled:
            return "built for another mask (FISEDIT_REFIT=0)"
        other = EditPlan.build(mask, plan.level_sizes, list(plan.levels), {l: lp.tile for l, lp in plan.levels.items()})
        if not plan.holds(other):
            return (f"built for another mask, whose index maps ({_lengths_note(plan.lengths())}) this mask's tiles "
                    f"({_lengths_note({l: lp.needs for l, lp in other.levels.items()})}) do not fit")
        waste = _padding_waste(plan.lengths(), other, self.costs)
        if waste > REFIT_WASTE:
            return (f"built for another mask, whose index maps would compute {waste:.1f}x what this mask needs "
                    f"(at most {REFIT_WASTE}x)")
        self.state.refit(other)
        self.level_regions = {lvl: region.handover(plan.levels[lvl].tokens("cpu").clone())
                              for lvl, region in self.level_regions.items()}
        self.state.regions = list(self.level_regions.values())
        self.tile_note = "the tile sizes of the sparse steps kept from the last edit, refilled with this mask"
        return None

    def restart(self, probe: ProbeState | None) -> None:
        self.state.probe = probe
        self.state.feed.restart()
        if self.state.graph is not None:
            self.state.graph.restart()

    def close(self) -> None:
        self.state.close()


def _build(model, source: FisEditCache, spec: EditSpec, layout: UNetLayout, tile_size, stats_mode: str,
           dense_from: int, cuda_graph: bool, modules: dict, convs: list, grown: EditPlan | None = None) -> KeptEdit:
    """Plans the edit's sparse steps (tiles by the cost model unless `tile_size` is given) and builds its state.
    `modules`: the UNet's named modules; `grown`: a plan kept for another mask that this one's did not fit, whose
    tile sizes this plan keeps where the cost model allows (KEEP_TILES) and the grown maps would still take its mask
    (`_holds_both`), and whose index maps' lengths it grows from (`_grown_capacity`)."""
    s, unet = source.settings, model.model.diffusion_model
    level_sizes = layout.level_sizes(*s.latent_shape[-2:])
    context = spec.positive[0][0].shape[1] if spec.positive and spec.positive[0][0] is not None else 77
    costs = cost.level_costs(unet, layout, level_sizes, context)  # the cost model's and the summary's
    if tile_size is None:
        work = tiling.level_work(unet, layout, costs, s.sparse_levels)
        rows, (calibration, note) = s.latent_shape[0] * len(s.chunks), tiling.calibration_for(model.load_device)

        def choose(kept: dict[int, int] | None) -> tiling.TileChoice:
            return tiling.choose_tiles(spec.mask, level_sizes, s.sparse_levels, work, rows, calibration, note,
                                       kept=kept, kept_within=KEEP_TILES)
        kept_tiles = None if grown is None else {l: lp.tile for l, lp in grown.levels.items()}
        choice = choose(kept_tiles)
        if kept_tiles is not None and choice.tiles == kept_tiles and not _holds_both(
                grown, EditPlan.build(spec.mask, level_sizes, s.sparse_levels, kept_tiles), costs):
            choice = choose(None)
        tile_size, tile_note = choice.tiles, choice.note
    else:
        tile_note = "tile sizes set by the edit"
    plan = EditPlan.build(spec.mask, level_sizes, s.sparse_levels, tile_size)
    capacity = _grown_capacity(grown, plan, costs) if grown is not None else None
    if capacity is not None:
        plan = EditPlan.build(spec.mask, level_sizes, s.sparse_levels, tile_size, capacity)
    graph = SparseStepGraph(model.load_device) if cuda_graph else None
    sparse_blocks = [b for b in layout.blocks if b.level in plan.levels]
    sparse = [modules[b.path] for b in sparse_blocks]
    by_level = [*((b.level, modules[b.path]) for b in sparse_blocks), (0, unet.out)]  # a conv runs at its block's
    sparse_convs = [(level, m) for level, block in by_level for m in block.modules()
                    if isinstance(m, torch.nn.Conv2d) and tuple(m.kernel_size) == (3, 3)]
    blocks = [tb for m in sparse if hasattr(m, "transformer_blocks") for tb in m.transformer_blocks]
    emb_layers = [m.emb_layers for m in sparse if hasattr(m, "emb_layers")]
    state = EditState(plan, source, dense_from, stats_mode, probe=spec.probe,
                      feed=EditFeed.build(plan, source, layout), graph=graph, convs=convs, sparse_convs=sparse_convs,
                      self_attention=tuple((b.attn1.to_q, b.attn1.to_k, b.attn1.to_v) for b in blocks),
                      cross_kv=tuple(m for b in blocks if b.attn2 is not None for m in (b.attn2.to_k, b.attn2.to_v)),
                      emb_linears=tuple(e[1] for e in emb_layers if len(e) == 2 and type(e[0]) is torch.nn.SiLU))
    level_regions, region_levels = _result_regions(plan, layout, s)
    state.regions = list(level_regions.values())
    return KeptEdit(state, level_regions, region_levels, costs, tile_note)


def _grown_capacity(kept: EditPlan, plan: EditPlan, costs: dict[int, cost.LevelCost]) -> dict[int, Capacity] | None:
    """The index-map lengths of a plan kept for another mask, grown to hold `plan`'s at the levels where both have
    the same tile size, so that the next mask of about these sizes fits (KeptEdit.refit); None where that would
    compute more than REFIT_WASTE times what `plan` needs, or no level can grow."""
    lengths = {}
    for lvl, lp in plan.levels.items():
        old = kept.levels.get(lvl)
        if old is not None and old.tile == lp.tile and not (old.full or lp.full):
            a, b = old.lengths, lp.needs
            lengths[lvl] = Capacity(max(a.tiles, b.tiles), max(a.tokens, b.tokens), max(a.read, b.read))
    if not lengths or _padding_waste(lengths, plan, costs) > REFIT_WASTE:
        return None
    return lengths


def _holds_both(kept: EditPlan, plan: EditPlan, costs: dict[int, cost.LevelCost]) -> bool:
    """Whether index maps grown to hold `plan` (with the kept plan's tile sizes) would still take the kept plan's
    mask within REFIT_WASTE: keeping the tile sizes is for masks that come back. Coarse tiles can fail it: at
    SD2.1@768 a rectangle of 18% planned with a 15% one's tiles (8, 4, 2) covered 40 level-0 tiles against 24, so
    the 15% mask in its maps would compute 1.66x what it needs (speed.py's per-step refit row at 15%)."""
    if any(lp.full != plan.levels[lvl].full for lvl, lp in kept.levels.items()):  # EditPlan.holds refuses those
        return False
    capacity = _grown_capacity(kept, plan, costs)
    return capacity is not None and _padding_waste(capacity, kept, costs) <= REFIT_WASTE


def _padding_waste(lengths: dict[int, Capacity], plan: EditPlan, costs: dict[int, cost.LevelCost]) -> float:
    """The MACs of `plan`'s sparse levels with their index maps at `lengths` (a level left out: unpadded) over those
    its tiles need."""
    sparse = [(lvl, lp) for lvl, lp in plan.levels.items() if not lp.full]
    needed = sum(costs[lvl].macs(lp.needs.tokens) for lvl, lp in sparse)
    padded = sum(costs[lvl].macs(lengths[lvl].tokens if lvl in lengths else lp.needs.tokens) for lvl, lp in sparse)
    return padded / needed if needed > 0 else 1.0


def _lengths_note(lengths: dict[int, Capacity]) -> str:
    return "; ".join(f"level {lvl}: {c.tiles} tiles, {c.tokens} positions, {c.read} read"
                     for lvl, c in sorted(lengths.items()))


def _kept_key(model, source: FisEditCache, spec: EditSpec, tile_size, stats_mode: str, dense_steps: int,
              cuda_graph: bool) -> tuple:
    """What an edit's sparse steps are built from, besides the prompt's values (warm.py)."""
    kept = source.resident
    return warm.key(
        source=warm.same(source.store),
        resident=None if kept is None else (warm.same(kept), kept.generation, len(kept.tensors)),
        device=str(torch.device(model.load_device)),
        prompt_shapes=warm.conditioning_shapes(spec.positive),
        mask_shape=tuple(spec.mask.shape),  # the mask itself: KeptEdit.refit
        tiles=(tuple(sorted(tile_size.items())) if isinstance(tile_size, dict) else tile_size if tile_size is not None
               else tiling.calibration_for(model.load_device)),
        options=(stats_mode, dense_steps, cuda_graph, K.mode(), K.patch_layout(), feeds.UPLOAD_PROGRAMS))


def _summary(source: FisEditCache, spec: EditSpec, plan: EditPlan, costs: dict[int, cost.LevelCost],
             state: EditState, seconds: float, tile_note: str) -> str:
    """The edit's one-line summary: mask area, steps by kind, time, and the speed-up estimated from MACs (cost.py)."""
    s = source.settings
    replayed = spec.probe.steps if spec.probe is not None else 0
    dense = s.steps - max(replayed, state.dense_from)   # replayed steps are never recomputed, even in the tail
    sparse = s.steps - replayed - dense
    probe_seconds = spec.probe.seconds if spec.probe is not None else 0.0
    fraction = cost.sparse_fraction(costs, {lvl: lp.fraction for lvl, lp in plan.levels.items()})
    speedup = cost.edit_speedup(s.steps, replayed, sparse, dense, fraction, len(s.chunks))
    return (f"FISEdit edit of '{source.name}': mask {100 * float(spec.mask.float().mean()):.1f}% of the latent; "
            f"{s.steps} steps: {replayed} probe (replayed), {sparse} sparse, {dense} dense; "
            f"{probe_seconds + seconds:.2f} s (probe {probe_seconds:.2f} s, sampling {seconds:.2f} s); "
            f"estimated speed-up {speedup:.1f}x over regenerating (a sparse step computes {100 * fraction:.0f}% of "
            f"a dense step's MACs); {_graph_note(state.graph)}, "
            f"{state.feed.stats.bytes_per_step / 2**20:.1f} MiB uploaded per sparse step; {plan.describe()}; "
            f"{tile_note}")


def _graph_note(graph: SparseStepGraph | None) -> str:
    if graph is None:
        return "eager"
    if graph.failure is not None:
        return f"eager (no CUDA graph: {graph.failure})"
    if graph.runs > 1:
        start = f"kept from the last edit of this cache, now in its edit {graph.runs}"
    elif graph.failed_captures:
        start = f"after an eager step, as the first capture failed ({graph.failed_captures[0]})"
    elif graph.eager_steps:
        start = "after an eager warm-up step, the first on this device"
    else:
        start = "captured at the first sparse step"
    if graph.runs == 1 and graph.capture_seconds is not None:
        start += f" in {graph.capture_seconds.describe()}"
    return f"{graph.replays} sparse steps replayed as a CUDA graph ({start})"


def _result_regions(plan: EditPlan, layout: UNetLayout, s) -> tuple[dict[int, Region], dict[str, int]]:
    """Per sparse level that is not wholly active, its active positions (padded like the plan's maps, which the
    graph's recording reads), where the edit's result differs from the source (everything else is the source's); and
    the recorded keys at those levels. A copy of the plan's map: a refit rewrites that, the result keeps its region."""
    per_level = {lvl: Region(lp.tokens("cpu").clone()) for lvl, lp in plan.levels.items() if not lp.full}
    return per_level, {t.key: t.level for t in layout.targets(s.sparse_levels) if t.level in per_level}


def _mask_id(mask: torch.Tensor) -> str:
    return hashlib.sha256(mask.to(torch.uint8).cpu().numpy().tobytes()).hexdigest()[:6]
