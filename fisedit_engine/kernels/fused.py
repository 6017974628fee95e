"""The fused ops of the sparse path, each run by its Triton kernel (`triton_ops.py`) or its pure-torch reference
(`reference.py`), chosen per call:

- `FISEDIT_KERNELS=reference`: the reference ops.
- `FISEDIT_KERNELS=triton`: the Triton kernels; an error where they cannot run (nothing falls back silently).
- `FISEDIT_KERNELS=auto` (default): Triton for CUDA tensors when Triton is importable and compiles its kernels, and
  for CPU tensors when TRITON_INTERPRET=1 was set before the kernels were first used (Triton's interpreter: how CI runs
  the real kernels without a GPU); the reference otherwise. Every reason for taking the reference is logged once.

`FISEDIT_PATCH_LAYOUT=nhwc` (default), `nchw` or `im2col`: how the Triton gather stores the patches for the conv that
reads them (cuDNN on the stacked tiles): channels-last (NHWC, cuDNN's native layout for tensor-core convs), or per tile
channels-first; or, with `im2col`, as the 3x3 convs' im2col rows, which one GEMM (cuBLAS) multiplies with the weight
instead of cuDNN's conv: on an H200 that GEMM beat cuDNN's implicit GEMM on the sparse levels' shapes by 1.15-2.4x
(benchmarks/conv_gemm.py), but the replayed step with it spans as long as with nhwc (6.26 against 6.33 ms, 6.72
against 6.71: benchmarks/graph_kernels.py --layouts, results/graph_kernels/nvidia-h200-2026-12-04-twelfth.md; the
gather writes nine times the bytes), hence not the default. `mixed`: im2col at the levels below the latent's
(level 1 and down: few tiles with many channels, where conv_gemm.py measured the GEMM's largest gain, 27.4 against
11.6 us at level 2, and where the rows cost least), nhwc at level 0; an experiment until a replay with it is timed
(`graph_kernels.py --layouts nhwc,mixed`). All give the same values
up to the convs' own summation order. On the H100 NHWC spares cuDNN a layout conversion per conv: the ResBlock at
SD2.1@768's level 0 (5% of the tiles) replays in 64 us instead of 121 (benchmarks/kernels.py), and the sparse step as a
CUDA graph took 20.6 ms instead of 23.3 (benchmarks/speed.py, one run each).

The Triton kernels round each output once from fp32, the reference ops after every step as the unfused torch ops do,
so in half precision the two differ by an output rounding (tests/unit/test_triton_kernels.py bounds it).
"""
from __future__ import annotations

import logging
import os

import torch

from ..graphs import outside_capture
from . import reference as R

log = logging.getLogger("FISEdit")

ENV = "FISEDIT_KERNELS"
MODES = ("auto", "triton", "reference")
LAYOUT_ENV = "FISEDIT_PATCH_LAYOUT"
LAYOUTS = ("nchw", "nhwc", "im2col", "mixed")

_module = None          # triton_ops once imported
_import_error = None    # why it could not be imported
_launched = set()       # (op, device) pairs whose first Triton launch succeeded
_broken = {}            # (op, device) -> why its first launch failed (auto mode then takes the reference)
_logged = set()         # reasons already logged


def mode() -> str:
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{ENV}={value!r}: expected one of {', '.join(MODES)}")
    return value


def patch_layout() -> str:
    value = os.environ.get(LAYOUT_ENV, "nhwc").strip().lower() or "nhwc"
    if value not in LAYOUTS:
        raise ValueError(f"{LAYOUT_ENV}={value!r}: expected one of {', '.join(LAYOUTS)}")
    return value


def conv_layout(level: int) -> str:
    """The layout of the 3x3 convs' patches at `level` under patch_layout(): nchw, nhwc or im2col."""
    layout = patch_layout()
    if layout == "mixed":
        return "im2col" if level > 0 else "nhwc"
    return layout


def triton_module():
    """triton_ops, or None with the reason in `import_error()`. Imported once: Triton decides at that moment whether
    the kernels are compiled or interpreted (TRITON_INTERPRET)."""
    global _module, _import_error
    if _module is None and _import_error is None:
        try:
            from . import triton_ops
            _module = triton_ops
        except Exception as e:  # ImportError, or a Triton build that fails to initialise
            _import_error = f"Triton is not usable ({type(e).__name__}: {e})"
    return _module


def import_error() -> str | None:
    triton_module()
    return _import_error


def not_supported_reasons(device: torch.device) -> list[str]:
    """Why the Triton kernels cannot run on tensors of `device` (empty: they can)."""
    module = triton_module()
    if module is None:
        return [_import_error]
    device = torch.device(device)
    if device.type == "cuda":
        if module.INTERPRETED:
            return ["TRITON_INTERPRET=1: the Triton kernels run interpreted, on CPU tensors only"]
        return []
    if device.type == "cpu":
        if not module.INTERPRETED:
            return ["tensors on the CPU and TRITON_INTERPRET is not set (Triton compiles for GPUs only)"]
        if os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("1", "true", "yes", "on", "y"):
            return ["the Triton kernels were loaded interpreted, but TRITON_INTERPRET is no longer set"]
        return []
    return [f"no Triton kernels for {device.type} tensors"]


def reset() -> None:
    """Forgets the launches and logged reasons (tests; the import and its interpret mode stay)."""
    _launched.clear()
    _broken.clear()
    _logged.clear()


def _log_once(reason: str) -> None:
    if reason not in _logged:
        _logged.add(reason)
        log.info("FISEdit kernels: using the pure-torch reference ops: %s", reason)


def _pick(op: str, device: torch.device) -> str:
    """'triton' or 'reference' for `op` on `device`."""
    m = mode()
    if m == "reference":
        _log_once(f"{ENV}=reference")
        return "reference"
    reasons = not_supported_reasons(device)
    if (op, str(device)) in _broken:
        reasons = reasons + [_broken[(op, str(device))]]
    if not reasons:
        return "triton"
    if m == "triton":
        raise RuntimeError(f"{ENV}=triton, but the Triton kernels cannot run here: {'; '.join(reasons)}")
    _log_once("; ".join(reasons))
    return "reference"


def backend(op: str, device) -> str:
    """Which implementation `op` takes for tensors on `device` under the current mode (logs like a call)."""
    return _pick(op, torch.device(device))


def _run(op: str, device, kernel, reference):
    """The kernel, or the reference. In auto mode a first launch that fails (a Triton build that cannot compile
    for this GPU, a missing compiler) is logged with its traceback and that op takes the reference from then on;
    later failures, and every failure in triton mode, propagate."""
    device = torch.device(device)
    if _pick(op, device) == "reference":
        return reference()
    key = (op, str(device))
    if key not in _launched:  # compiled and tried eagerly first: a failure inside a capture would end the capture
        outside_capture(device, f"the Triton kernel {op} (its first launch)")
    if key in _launched or mode() == "triton":
        out = kernel()
        _launched.add(key)
        return out
    try:
        out = kernel()
    except ValueError:  # the launcher's argument checks: a caller's bug, not the environment
        raise
    except Exception as e:
        _broken[key] = f"the Triton kernel {op} failed on its first launch on {device} ({type(e).__name__}: {e})"
        log.exception("FISEdit kernels: %s; this op takes the reference ops from now on", _broken[key])
        _logged.add(_broken[key])
        return reference()
    _launched.add(key)
    return out


def gather_norm_patches(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, stats: torch.Tensor | None = None,
                        weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, eps: float = 1e-5,
                        silu: bool = True, channels_last: bool = True) -> torch.Tensor:
    """Patches [N, C, tiles, P, Q] of x [N, C, H, W] at (rows, cols) ([tiles, P], [tiles, Q], -1 = outside: zero),
    GroupNorm'ed with `stats` [N, G, 2] (fp32 mean, biased variance) and weight/bias [C], and SiLU'd with `silu`;
    with stats None, the patches only. In x's dtype. `channels_last`: the Triton kernel stores them channels
    innermost (conv_layout "nhwc"), else per tile channels-first ("nchw"); the reference keeps x's layout."""
    return _run("gather_norm", x.device,
                lambda: _module.gather_norm_patches(x, rows, cols, stats, weight, bias, eps, silu,
                                                    channels_last=channels_last),
                lambda: R.gather_norm_patches(x, rows, cols, stats, weight, bias, eps, silu))


def gather_norm_im2col(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, stats: torch.Tensor | None = None,
                       weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, eps: float = 1e-5,
                       silu: bool = True) -> torch.Tensor:
    """The im2col rows [N, tiles, O, O, 9 * C] of a 3x3 conv from the plan's `im2col_index` (rows, cols), normed like
    `gather_norm_patches`."""
    return _run("gather_norm", x.device,
                lambda: _module.gather_norm_im2col(x, rows, cols, stats, weight, bias, eps, silu),
                lambda: R.gather_norm_im2col(x, rows, cols, stats, weight, bias, eps, silu))


def group_norm_tokens(x: torch.Tensor, tokens: torch.Tensor, stats: torch.Tensor, weight, bias,
                      eps: float) -> torch.Tensor:
    """GroupNorm (no SiLU) of x [N, C, H, W] at the flat positions `tokens` [P]: [N, C, P] in x's dtype."""
    return _run("group_norm_tokens", x.device,
                lambda: _module.group_norm_tokens(x, tokens, stats, weight, bias, eps),
                lambda: R.group_norm_tokens(x, tokens, stats, weight, bias, eps))


def scatter_tiles_(base: torch.Tensor, tiles_out: torch.Tensor, positions: torch.Tensor,
                   sources: torch.Tensor | None, bias: torch.Tensor | None = None,
                   residual_tiles: torch.Tensor | None = None,
                   residual_map: torch.Tensor | None = None) -> torch.Tensor:
    """In place into base [N, C, H, W]: tile element sources[i] of tiles_out [N, C, tiles, T, T] (+ bias [N, C])
    (+ residual_tiles [like tiles_out] or residual_map [like base, at positions[i]]) goes to flat map position
    positions[i]. Returns base."""
    return _run("scatter", base.device,
                lambda: _module.scatter_tiles_(base, tiles_out, positions, sources, bias, residual_tiles,
                                               residual_map),
                lambda: R.scatter_add_tiles_(base, tiles_out, positions, sources, bias, residual_tiles,
                                             residual_map))


def gather_rows(src: torch.Tensor, positions: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out [B, P, C] = src [B, L, C] at `positions` [P] (on out's device) along L. With the kernel, src may lie in
    pinned host memory and the GPU reads the rows in place; the reference gathers on the host, then copies."""
    return _run("gather_rows", out.device,
                lambda: _module.gather_rows(src, positions, out),
                lambda: R.gather_rows(src, positions, out))


def copy_rows(copies, step: int) -> None:
    """Runs a `row_copies.RowCopies` for `step`: with the kernel, one launch per element size (tables built on its
    first run); the reference copies one by one."""
    def kernel():
        if copies.launches is None:
            copies.launches = _module.RowCopyLaunches(copies.copies, copies.device, copies.steps,
                                                      max_programs=copies.max_programs)
        copies.launches(step)
    _run("copy_rows", copies.device, kernel, lambda: R.copy_rows(copies.copies, step))


def exact_group_stats(cached: torch.Tensor, cached_active: list[R.AtPositions], fresh_active: R.AtPositions,
                      positions: int) -> torch.Tensor:
    """[N, G, 2] fp32: the GroupNorm statistics of a map of `positions` positions whose cached statistics are
    `cached`, with its cached values at the active positions (`cached_active`: up to two maps concatenated along
    channels) replaced by `fresh_active`. The kernel reads the values where they lie; the reference gathers them."""
    return _run("exact_stats", cached.device,
                lambda: _module.exact_group_stats(cached, cached_active, fresh_active, positions),
                lambda: R.exact_group_stats(cached, R.gathered(cached_active), fresh_active.gather(), positions))


def geglu(h: torch.Tensor) -> torch.Tensor:
    """GEGLU's activation of its projection h [..., 2 * D]: [..., D], one kernel instead of a GELU and a product."""
    return _run("geglu", h.device, lambda: _module.geglu(h), lambda: R.geglu(h))
