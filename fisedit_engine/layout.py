"""The UNet's block structure as FISEdit sees it: which block runs at which resolution level, and from that, what a
capture records so that later sparse steps can take every value outside the active region from the cache.

Level 0 is the latent resolution; each Downsample goes one level down, each Upsample one up. A level runs sparse
when it has at least `min_sparse_positions` positions (default 256: 16x16). Below that a sparse step costs more in
gathers and launches than it saves, so those levels run dense on the assembled input and need no cache.

What a sparse step reads across positions, and so what is cached per step and per CFG chunk:
- every block's output at a sparse level (conv_in, ResBlock, SpatialTransformer, Down/Upsample): the input of the
  next block (conv halos, GroupNorm statistics) and the skip connections of the decoder;
- inside each ResBlock, `h` (the input of its second GroupNorm and conv, after the time embedding is added);
- the self-attention keys and values of every transformer block, so that active queries see the exact context of
  the inactive tokens without recomputing them;
- per GroupNorm at a sparse level the mean and variance per sample and group: the exact statistics update them, the
  paper's cached-statistics mode reads them as they are (a dense level's norms see their whole map);
- for the first 30% of the steps and the positive chunk only, the cross-attention queries of every transformer
  block at every level: attention control in the probe steps recomputes the original attention maps from them;
- the model output and the latent, for compositing and for the difference mask.
Token-wise layers (LayerNorm, cross-attention, feed-forward, proj_in/out) need nothing: an active token reads only
itself.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_MIN_SPARSE_POSITIONS = 256

LATENT_KEY = "x"
MODEL_OUTPUT_KEY = "out"
# Cross-attention queries for attention control in the probe steps: positive chunk only, the first 30% of the steps.
PROBE_QUERY_SUFFIX = ":q"
PROBE_RECORD_FRACTION = 0.3


def probe_record_steps(steps: int) -> int:
    return max(1, math.ceil(PROBE_RECORD_FRACTION * steps))


def is_probe_key(key: str) -> bool:
    return key.endswith(PROBE_QUERY_SUFFIX)


@dataclass(frozen=True)
class Block:
    path: str        # module path inside the UNet, e.g. "input_blocks.1.0"
    kind: str        # conv_in | resblock | transformer | downsample | upsample
    level: int       # resolution level of the block's output
    channels: int    # output channels
    depth: int = 0   # transformer blocks inside a SpatialTransformer
    inputs: tuple[str, ...] = ()  # the blocks whose outputs, concatenated along channels, form this block's input
                                  # (empty for conv_in, which reads the model input)


@dataclass(frozen=True)
class Target:
    """One recorded tensor: `key` names it in the cache; the hook sits on `module_path`."""
    key: str
    module_path: str
    what: str        # output | input | stats | attn_k | attn_v
    level: int


class UnsupportedUNet(ValueError):
    pass


@dataclass(frozen=True)
class UNetLayout:
    blocks: tuple[Block, ...]
    group_norms: tuple[str, ...]
    num_levels: int

    @classmethod
    def from_unet(cls, unet) -> "UNetLayout":
        from comfy.ldm.modules.diffusionmodules import openaimodel
        from comfy.ldm.modules.attention import SpatialTransformer

        blocks: list[Block] = []
        level = 0
        # UNetModel._forward's data flow: each layer reads the previous layer's output; every input block's output
        # is pushed on the skip stack, and each output block starts from cat(h, skip stack pop).
        previous: tuple[str, ...] = ()
        skips: list[str] = []

        def visit(prefix: str, seq, first_inputs=None) -> None:
            nonlocal level, previous
            for j, layer in enumerate(seq):
                path = f"{prefix}.{j}"
                inputs = first_inputs if j == 0 and first_inputs is not None else previous
                if isinstance(layer, openaimodel.ResBlock):
                    if layer.updown or layer.use_scale_shift_norm or type(layer) is not openaimodel.ResBlock:
                        raise UnsupportedUNet(f"{path}: ResBlock variant (up/down, scale-shift norm or video) "
                                              "is not supported")
                    blocks.append(Block(path, "resblock", level, layer.out_channels, inputs=inputs))
                elif isinstance(layer, SpatialTransformer):
                    if type(layer) is not SpatialTransformer:
                        raise UnsupportedUNet(f"{path}: {type(layer).__name__} is not supported")
                    depth = len(layer.transformer_blocks)
                    blocks.append(Block(path, "transformer", level, layer.in_channels, depth, inputs))
                elif isinstance(layer, openaimodel.Downsample):
                    level += 1
                    blocks.append(Block(path, "downsample", level, layer.out_channels, inputs=inputs))
                elif isinstance(layer, openaimodel.Upsample):
                    level -= 1
                    blocks.append(Block(path, "upsample", level, layer.out_channels, inputs=inputs))
                elif path == "input_blocks.0.0":
                    blocks.append(Block(path, "conv_in", level, layer.out_channels))
                else:
                    raise UnsupportedUNet(f"{path}: unexpected layer {type(layer).__name__}")
                previous = (path,)

        for i, seq in enumerate(unet.input_blocks):
            visit(f"input_blocks.{i}", seq)
            skips.append(previous[0])
        deepest = level
        if unet.middle_block is not None:
            visit("middle_block", unet.middle_block)
        for i, seq in enumerate(unet.output_blocks):
            visit(f"output_blocks.{i}", seq, first_inputs=previous + (skips.pop(),))
        if level != 0:
            raise UnsupportedUNet("the decoder does not return to the latent resolution")
        group_norms = tuple(name for name, m in unet.named_modules() if isinstance(m, _group_norm_types()))
        return cls(tuple(blocks), group_norms, deepest + 1)

    @property
    def output_block(self) -> str:
        """The block whose output the output head reads."""
        return self.blocks[-1].path

    def level_of(self, module_path: str) -> int | None:
        """The level of the block holding `module_path` (the output head's is 0), or None outside every block."""
        if module_path == "out" or module_path.startswith("out."):
            return 0
        return next((b.level for b in self.blocks if module_path.startswith(b.path + ".")), None)

    def consumers(self, path: str) -> list[Block]:
        return [b for b in self.blocks if path in b.inputs]

    def level_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """Spatial size per level; a stride-2 conv with padding 1 maps n to ceil(n / 2)."""
        sizes = [(height, width)]
        for _ in range(self.num_levels - 1):
            h, w = sizes[-1]
            sizes.append((math.ceil(h / 2), math.ceil(w / 2)))
        return sizes

    def sparse_levels(self, height: int, width: int, min_positions: int = DEFAULT_MIN_SPARSE_POSITIONS) -> list[int]:
        return [lvl for lvl, (h, w) in enumerate(self.level_sizes(height, width)) if h * w >= min_positions]

    def targets(self, sparse_levels) -> list[Target]:
        sparse = set(sparse_levels)
        out: list[Target] = []
        for b in self.blocks:
            if b.level not in sparse:
                continue
            out.append(Target(b.path, b.path, "output", b.level))
            if b.kind == "resblock":
                out.append(Target(f"{b.path}:h", f"{b.path}.out_layers", "input", b.level))
            elif b.kind == "transformer":
                for j in range(b.depth):
                    attn = f"{b.path}.transformer_blocks.{j}.attn1"
                    out.append(Target(f"{attn}:k", f"{attn}.to_k", "attn_k", b.level))
                    out.append(Target(f"{attn}:v", f"{attn}.to_v", "attn_v", b.level))
        for b in self.blocks:
            if b.kind == "transformer":
                for j in range(b.depth):
                    attn = f"{b.path}.transformer_blocks.{j}.attn2"
                    out.append(Target(f"{attn}{PROBE_QUERY_SUFFIX}", f"{attn}.to_q", "probe_q", b.level))
        for gn in self.group_norms:  # the statistics a sparse op reads: not those of a dense level's norms
            if self.level_of(gn) in sparse:
                out.append(Target(f"{gn}:stats", gn, "stats", -1))
        out.append(Target(MODEL_OUTPUT_KEY, "out", "output", 0))
        return out


def _group_norm_types():
    import torch
    return (torch.nn.GroupNorm,)  # comfy.ops.GroupNorm subclasses it
