"""Many row copies run together: what an edit moves per step (feed.py) is hundreds of (key, chunk) maps, and one
kernel launch per map cost the H200's host more time than the sparse step took on the GPU.

A copy is out[b, out_index[i], :] = source[b, src_index[i], :] for i < rows, with source [B, L, C] and out
[B, L', C] (any strides), an index left out meaning 0..rows-1. That covers a gather (the read region of a cached map,
or the active positions of a map [B, C, H, W] seen as [B, H*W, C]), a scatter (into such a canvas) and a plain copy.
A copy's source may differ per step (each step's cached values: same shape and strides every step) and lie in pinned
host memory, which the GPU reads in place (best with channels contiguous: whole transactions on the host link).

`fused.copy_rows` runs them: the Triton kernel takes every copy of one element size in one launch (bitwise), from
tables of addresses and strides built on the first run and kept on the device; the reference copies one by one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def as_rows(value: torch.Tensor) -> torch.Tensor:
    """A value as the rows a copy reads or writes: a map [B, C, H, W] as [B, H*W, C] (a view, channels strided),
    anything else as it is."""
    return value.flatten(2).transpose(1, 2) if value.dim() == 4 else value


@dataclass(frozen=True)
class RowCopy:
    sources: tuple[torch.Tensor, ...] | torch.Tensor   # per step, or one for every step; or [steps, ...] stepped
    out: torch.Tensor
    src_index: torch.Tensor | None
    out_index: torch.Tensor | None
    rows: int


class RowCopies:
    """A fixed set of copies over `steps` steps, on `device`. The tensors must stay where they are while the set
    lives (the kernel's tables hold their addresses; the set holds the tensors)."""

    def __init__(self, device, steps: int, max_programs: int | None = None):
        self.device = torch.device(device)
        self.max_programs = max_programs  # a launch's programs at most (triton_ops.RowCopyLaunches)
        if self.device.type == "cuda" and self.device.index is None:  # as tensors name it: "cuda" -> "cuda:0"
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.steps = steps
        self.copies: list[RowCopy] = []
        self.launches = None  # kernels.triton_ops.RowCopyLaunches, built by the first kernel run

    def add(self, sources, out: torch.Tensor, src_index: torch.Tensor | None = None,
            out_index: torch.Tensor | None = None) -> None:
        """`sources`: a list of per-step tensors (or of one for every step), or one tensor [steps, B, L, C] whose
        step s is the source of step s (checked once: its steps share storage and strides)."""
        stepped = isinstance(sources, torch.Tensor)
        sources = sources if stepped else tuple(sources)
        first = sources[0]
        rows = next((len(i) for i in (src_index, out_index) if i is not None), out.shape[1])
        _check(self.launches is None, lambda: "the copies were run already: add every copy before the first run")
        _check(len(sources) == self.steps or (len(sources) == 1 and not stepped),
               lambda: f"{len(sources)} sources for {self.steps} steps")
        _check(first.dim() == 3 and out.dim() == 3 and first.shape[0] == out.shape[0]
               and first.shape[2] == out.shape[2], lambda: f"source [B, L, C] and out [B, L', C] expected, got "
               f"{tuple(first.shape)} and {tuple(out.shape)}")
        for s in (first,) if stepped else sources:
            _check(s.shape == first.shape and s.stride() == first.stride() and s.dtype == out.dtype,
                   lambda: f"every step's source must be {tuple(first.shape)} with strides {first.stride()} in "
                   f"{out.dtype}, got {tuple(s.shape)}, {s.stride()}, {s.dtype}")
            _check(s.device == self.device or (s.device.type == "cpu" and s.is_pinned()),
                   lambda: f"a source on {s.device} cannot be read from {self.device}: it must be there or pinned")
        _check(out.device == self.device, lambda: f"out is on {out.device}, the copies on {self.device}")
        for name, index, length in (("src_index", src_index, first.shape[1]), ("out_index", out_index, out.shape[1])):
            if index is None:
                _check(rows <= length, lambda: f"{rows} rows, but {name} is left out and the tensor has {length}")
            else:
                _check(index.dtype == torch.int64 and index.dim() == 1 and index.is_contiguous()
                       and index.device == self.device and len(index) == rows,
                       lambda: f"{name}: {rows} contiguous int64 indices on {self.device} expected")
        self.copies.append(RowCopy(sources, out, src_index, out_index, rows))

    def add_whole(self, sources, out: torch.Tensor) -> None:
        """A copy of whole contiguous tensors, seen as rows of up to 128 elements; `sources` as add() takes them."""
        n = out.numel()
        width = 128 if n % 128 == 0 else max(n, 1)
        if isinstance(sources, torch.Tensor):
            _check(sources[0].is_contiguous(), lambda: "add_whole copies contiguous tensors")
            self.add(sources.view(len(sources), 1, -1, width), out.view(1, -1, width))
        else:
            self.add([s.view(1, -1, width) for s in sources], out.view(1, -1, width))

    def nbytes(self, step: int, where: str = "cpu") -> int:
        """The bytes read at `step` from sources on `where` ("cpu": pinned host memory, "cuda": the device)."""
        total = 0
        for c in self.copies:
            s = c.sources[step if len(c.sources) > 1 else 0]
            if s.device.type == where:
                total += s.shape[0] * c.rows * s.shape[2] * s.element_size()
        return total


def _check(cond: bool, message) -> None:
    """`message`: a callable, formatted only on failure (add() runs for every copy of an edit's plan)."""
    if not cond:
        raise ValueError(message())
