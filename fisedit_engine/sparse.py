"""Sparse forwards for the UNet blocks of the sparse levels, substituted through the model patcher.

Each takes and returns a map of the full size, like the block it replaces, so the UNet's own traversal (skip
connections, concatenations, dense levels) runs unchanged. The output is the feed's canvas of the block (feed.py):
on the level's active tiles the block computed from its input, on the rest of the read region the cached output of
the same step and CFG chunk, and nothing that any op reads elsewhere (a map a dense op reads is uploaded whole).
The input is likewise the cached input outside the active tiles (see plan.py). Internally:
- ResBlock: gather x with a 1-px halo, GroupNorm (statistics of the whole assembled map) + SiLU, conv; add the
  time embedding; assemble h with the cached h; the same for the second half; skip connection; scatter.
- SpatialTransformer: GroupNorm, proj_in, transformer blocks and proj_out on the active tokens only; the self-
  attention keys and values of the inactive tokens come from the cache (exact context); cross-attention and
  feed-forward are token-wise. Projections of the same input run as one GEMM (joined.py).
- conv_in, Downsample, Upsample and the output head: gather (with each op's geometry), conv, scatter. The output
  head also composites with the edit mask itself, so the model output outside the mask is exactly the cached one.
GroupNorm statistics are exact (over the assembled map: cached values outside, fresh inside) unless the edit asks
for the paper's approximation, the cached statistics of the original run. The gathers, norms and scatters (with the
adds before them) go through kernels/fused.py: fused Triton kernels on CUDA, or the pure-torch reference ops.
Without an edit context (a model call outside an edit), in a dense step, and at a level whose active tiles cover
the whole map, every forward is the module's own.
"""
from __future__ import annotations

import torch

from . import comfy_adapter as host
from .cache import CacheError
from .capture import StepContext, current_step
from .kernels import fused as K
from .kernels import reference as R
from .layout import Block
from .other_packs import EVERY_TOKEN_PATCHES


class SparseForward:
    """A module's substituted forward. Marked so that model fingerprints ignore it."""
    fisedit_patch = True

    def __init__(self, module, block: Block, path: str):
        self.module, self.block, self.path = module, block, path

    def original(self, *args, **kwargs):
        return type(self.module).forward(self.module, *args, **kwargs)

    def __call__(self, *args, **kwargs):
        ctx = current_step()
        if ctx is None or ctx.edit is None or ctx.edit.is_dense(ctx.step) or self.level(ctx).full:
            return self.original(*args, **kwargs)  # a fully active level gains nothing from sparsity
        return self.sparse(ctx, *args, **kwargs)

    def __deepcopy__(self, memo):
        return self

    def level(self, ctx: StepContext):
        return ctx.edit.plan.levels[self.block.level]

    def sparse(self, ctx, *args, **kwargs):
        raise NotImplementedError


class WholeConv:
    """A conv module's forward while an edit runs on a GPU. In a sparse step a conv whose module runs (the levels
    under the smallest sparse size, a fully active level, SD1.x's 1x1 proj_in on the active tokens) takes the edit's
    channels-last copy of its weight (EditState.channels_last_weight) and returns a contiguous map, as the module
    would: given the channels-first weight, cuDNN transposed it on every call, which at SD2.1@768's 12x12 level (18
    convs of 1280 or 2560 channels) took 1.5 ms of a 10.5 ms sparse step on an H200, more than the convs
    (benchmarks/graph_kernels.py). Dense steps, steps with every level fully active and calls outside an edit run
    the module's own forward."""
    fisedit_patch = True

    def __init__(self, module):
        self.module = module

    def __call__(self, x):
        ctx = current_step()
        if (ctx is None or ctx.edit is None or ctx.edit.is_dense(ctx.step) or not ctx.edit.plan.sparse_anywhere
                or not x.is_cuda):  # a step of a whole-image mask is the stock network, bit for bit (I2)
            return type(self.module).forward(self.module, x)
        with host.cast_weights(self.module, x) as (w, b):
            return self.module._conv_forward(x, ctx.edit.channels_last_weight(self.module, w), b).contiguous()

    def __deepcopy__(self, memo):
        return self


def _scatter(base, tiles_out, lp, bias=None, residual_tiles=None, residual_map=None):
    """Tiles (+ bias [N, C]) (+ a residual: tiles, or the map read at the tiles) into `base`, in place."""
    positions, sources = lp.tile_scatter(base.device)
    return K.scatter_tiles_(base, tiles_out, positions, sources, bias, residual_tiles, residual_map)


def _sparse_conv(ctx, x, conv, lp, kind, norm=None, stats=None, in_size=None, stride=1):
    """Gather patches of x for `kind`'s geometry, optionally GroupNorm + SiLU them, and conv: [N, C', tiles, T, T].
    Where the level's layout is im2col (FISEDIT_PATCH_LAYOUT, kernels/fused.py) the gather writes the conv's im2col
    rows and one GEMM multiplies them with the weight."""
    layout = K.conv_layout(lp.level)
    if layout == "im2col":
        taps = _gathered(K.gather_norm_im2col, x, lp.im2col_index(kind, x.device, in_size), norm, stats)
        with host.cast_weights(conv, taps) as (w, b):
            out = torch.nn.functional.linear(taps, ctx.edit.im2col_weight(conv, w), b)  # [N, tiles, O, O, C']
        return out.permute(0, 4, 1, 2, 3)
    patches = _gathered(K.gather_norm_patches, x, lp.patch_index(kind, x.device, in_size), norm, stats,
                        channels_last=layout == "nhwc")
    with host.cast_weights(conv, patches) as (w, b):
        return R.conv_patches(patches, ctx.edit.conv_weight(conv, w, patches), b, stride)


def _gathered(gather, x, index, norm, stats, **options):
    """gather(x, rows, cols, **options), GroupNorm'ed with `stats` and SiLU'd where `norm` is given."""
    if norm is None:
        return gather(x, *index, **options)
    with host.cast_weights(norm, x) as (gw, gb):
        return gather(x, *index, stats, gw, gb, norm.eps, silu=True, **options)


class SparseResBlock(SparseForward):
    def sparse(self, ctx, x, emb):
        m, lp = self.module, self.level(ctx)
        in_norm, in_conv = m.in_layers[0], m.in_layers[2]
        out_norm, out_conv = m.out_layers[0], m.out_layers[3]
        stats = ctx.edit.group_stats(ctx, f"{self.path}.in_layers.0", x, in_norm.num_groups, self.block.inputs)
        h = _sparse_conv(ctx, x, in_conv, lp, "conv3", in_norm, stats)
        h_full = _scatter(ctx.edit.cached(ctx, f"{self.path}:h", x), h, lp,
                          bias=ctx.edit.time_embedding(ctx, m, emb).type(h.dtype))
        ctx.recording.record(f"{self.path}:h", ctx, h_full)
        stats = ctx.edit.group_stats(ctx, f"{self.path}.out_layers.0", h_full, out_norm.num_groups,
                                     (f"{self.path}:h",))
        out = _sparse_conv(ctx, h_full, out_conv, lp, "conv3", out_norm, stats)
        if isinstance(m.skip_connection, torch.nn.Identity):  # the residual is x itself, read where it lands
            return _scatter(ctx.edit.cached(ctx, self.path, x), out, lp, residual_map=x)
        skip = R.tiles_of(x, lp.tiles_on(x.device), lp.tile)
        with host.cast_weights(m.skip_connection, skip) as (w, b):
            skip = R.conv_patches(skip, w, b)
        return _scatter(ctx.edit.cached(ctx, self.path, x), out, lp, residual_tiles=skip)


class SparseConv(SparseForward):
    """conv_in: a 3x3 conv at level 0."""

    def sparse(self, ctx, x):
        lp = self.level(ctx)
        out = _sparse_conv(ctx, x, self.module, lp, "conv3")
        return _scatter(ctx.edit.cached(ctx, self.path, x), out, lp)


class SparseDownsample(SparseForward):
    def sparse(self, ctx, x):
        lp = self.level(ctx)
        out = _sparse_conv(ctx, x, self.module.op, lp, "down", in_size=tuple(x.shape[-2:]), stride=2)
        return _scatter(ctx.edit.cached(ctx, self.path, x), out, lp)


class SparseUpsample(SparseForward):
    def sparse(self, ctx, x, output_shape=None):
        lp = self.level(ctx)
        size = tuple(output_shape[2:4]) if output_shape is not None else (x.shape[2] * 2, x.shape[3] * 2)
        if size != (lp.height, lp.width):
            raise CacheError(f"{self.path}: upsampling to {size}, but the plan's level is {lp.height}x{lp.width}: "
                             f"this UNet resizes differently from SD1.x/SD2.x/SDXL, which FISEdit needs")
        out = _sparse_conv(ctx, x, self.module.conv, lp, "up", in_size=tuple(x.shape[-2:]))
        return _scatter(ctx.edit.cached(ctx, self.path, x), out, lp)


class SparseOutput(SparseForward):
    """The output head (GroupNorm, SiLU, conv), composited with the edit mask: outside it, the cached output."""

    def __call__(self, h):
        ctx = current_step()
        if ctx is None or ctx.edit is None:
            return self.original(h)
        cached = ctx.edit.cached(ctx, "out", h)  # read once: the scatter base and the composite's outside
        latent_level = ctx.edit.plan.levels.get(0)  # None: the latent is under the smallest sparse level
        dense = ctx.edit.is_dense(ctx.step) or latent_level is None or latent_level.full
        fresh = self.original(h) if dense else self._active_tiles(ctx, h, cached)
        return torch.where(ctx.edit.mask_rows(ctx, fresh.device), fresh, cached)

    @classmethod
    def for_unet(cls, unet, layout) -> "SparseOutput":
        return cls(unet.out, Block("out", "output", 0, unet.out[-1].out_channels, inputs=(layout.output_block,)), "out")

    def sparse(self, ctx, h):
        """The sparse op alone: fresh on the active tiles, the cached output elsewhere (before the composite)."""
        return self._active_tiles(ctx, h, ctx.edit.cached(ctx, "out", h))

    def _active_tiles(self, ctx, h, cached):
        norm, conv = self.module[0], self.module[2]
        lp = ctx.edit.plan.levels[0]
        stats = ctx.edit.group_stats(ctx, "out.0", h, norm.num_groups, self.block.inputs)
        out = _sparse_conv(ctx, h, conv, lp, "conv3", norm, stats)
        return _scatter(cached.clone(), out, lp)  # the composite still needs the cached output


class SparseSpatialTransformer(SparseForward):
    def sparse(self, ctx, x, context=None, transformer_options=None):
        m, lp = self.module, self.level(ctx)
        transformer_options = {} if transformer_options is None else transformer_options
        if _attention_patched(transformer_options):  # other_packs.check_edit refuses these before sampling
            raise CacheError(f"{self.path}: another node patches attention here, which a sparse step cannot honour; "
                             f"set dense_tail to 1.0 or remove that node from the model")
        blocks = m.transformer_blocks
        contexts = context if isinstance(context, list) else [context] * len(blocks)
        tokens_idx = lp.tokens(x.device)
        stats = ctx.edit.group_stats(ctx, f"{self.path}.norm", x, m.norm.num_groups, self.block.inputs)
        with host.cast_weights(m.norm, x) as (gw, gb):
            t = K.group_norm_tokens(x, tokens_idx, stats, gw, gb, m.norm.eps)  # [N, C, P]
        if m.use_linear:
            t = m.proj_in(t.transpose(1, 2))
        else:
            t = m.proj_in(t[..., None]).squeeze(-1).transpose(1, 2)    # a 1x1 conv on the active tokens
        for j, block in enumerate(blocks):
            transformer_options["block_index"] = j
            t = self._block(ctx, block, f"{self.path}.transformer_blocks.{j}", t, contexts[j], lp,
                            transformer_options)
        if m.use_linear:
            t = m.proj_out(t).transpose(1, 2)
        else:
            t = m.proj_out(t.transpose(1, 2)[..., None]).squeeze(-1)
        out = ctx.edit.cached(ctx, self.path, x)  # + the residual x, at the active tokens
        return K.scatter_tiles_(out, t[..., None, None], tokens_idx, None, residual_map=x)

    @staticmethod
    def _block(ctx, block, path, x, context, lp, transformer_options):
        if block.ff_in or block.disable_self_attn or block.attn2 is None or block.switch_temporal_ca_to_sa:
            raise CacheError(f"{path}: this transformer block variant is not supported by FISEdit: edit "
                                 f"generations of SD1.x, SD2.x or SDXL checkpoints")
        attn1 = block.attn1
        n = block.norm1(x)
        # not the modules: the recording hooks on to_k / to_v expect every token; the full K/V is recorded below
        q, k_active, v_active = ctx.edit.linears((attn1.to_q, attn1.to_k, attn1.to_v), n)
        tokens_idx = lp.tokens(x.device)
        k = ctx.edit.cached(ctx, f"{path}.attn1:k", n)  # the step's own copy: the active tokens are written in
        v = ctx.edit.cached(ctx, f"{path}.attn1:v", n)
        k[:, tokens_idx] = k_active.to(k.dtype)
        v[:, tokens_idx] = v_active.to(v.dtype)
        ctx.recording.record(f"{path}.attn1:k", ctx, k)
        ctx.recording.record(f"{path}.attn1:v", ctx, v)
        a = host.attention()(q, k, v, attn1.heads, attn_precision=attn1.attn_precision,
                             transformer_options=transformer_options)
        x = attn1.to_out(a) + x
        attn2, n = block.attn2, block.norm2(x)
        with host.cast_weights(attn2.to_q, n) as (w, b):  # not attn2.to_q(n): its recording hook wants every token
            q = torch.nn.functional.linear(n, w, b)
        ctx.edit.record_probe_query(ctx, f"{path}.attn2:q", q, lp)
        k, v = (ctx.edit.shared_linear(ctx, ctx.edit.cross_kv, proj, context) for proj in (attn2.to_k, attn2.to_v))
        a = host.attention()(q, k, v, attn2.heads, attn_precision=attn2.attn_precision,
                             transformer_options=transformer_options)
        x = attn2.to_out(a) + x
        x_skip = x
        x = _feed_forward(block.ff, block.norm3(x))
        return x_skip + x if block.is_res else x


def _feed_forward(ff, x):
    """ff(x); with ComfyUI's GEGLU feed-forward, its GELU and product as one kernel (kernels/fused.py)."""
    if not host.geglu_feed_forward(ff):
        return ff(x)
    geglu, _, out = ff.net
    with host.cast_weights(geglu.proj, x) as (w, b):
        h = torch.nn.functional.linear(x, w, b)
    return out(K.geglu(h))


def _attention_patched(transformer_options: dict) -> bool:
    patches = transformer_options.get("patches", {})
    block = tuple(transformer_options.get("block", ()))
    replaced = transformer_options.get("patches_replace", {})
    return (any(patches.get(name) for name in EVERY_TOKEN_PATCHES)
            or any(tuple(key[:2]) == block for keyed in replaced.values() for key in keyed))


SPARSE_FORWARDS = {
    "resblock": SparseResBlock, "transformer": SparseSpatialTransformer, "conv_in": SparseConv,
    "downsample": SparseDownsample, "upsample": SparseUpsample,
}
