"""A sparse step's 3x3 convs on stacked tiles (cuDNN, what the sparse path runs) against the same work as one GEMM
over im2col rows (cuBLAS): would a gather that writes im2col rows, followed by a GEMM, beat cuDNN's implicit GEMM on
these small, odd shapes?

    python benchmarks/conv_gemm.py [--repeat 20] [--iters 50]

Per case (SD2.1@768's sparse levels at a 5% edit, with the tile sizes the cost model chose on an H200: level 0 tile 2
and 140 tiles, level 1 one tile of 16, level 2 one tile of 8; batch 2 rows, fp16), microseconds per conv, each
variant captured `--repeat` times in one CUDA graph so that the replay's own launch cost is spread over them:
- cudnn: conv2d over the stacked patches [rows * tiles, C, T + 2, T + 2] in channels-last, channels-last weight;
- gemm: the im2col rows [rows * tiles * T * T, 9 * C] times the weight [9 * C, C] (the im2col itself not counted:
  a gather kernel would write it instead of the patches, 9 / (1 + 2 / T)^2 times the bytes);
- unfold+gemm: torch's unfold then the GEMM (what it costs without a fused gather).
With `--whole`, the convs a sparse step runs on whole maps (WholeConv: the 12x12 level of SD2.1@768, batch 2) instead:
- cudnn: conv2d on the channels-first map with the channels-last weight (what WholeConv runs without the GEMM);
- cudnn, benchmark: the same with torch.backends.cudnn.benchmark on (cuDNN times its algorithms first);
- cudnn, nhwc: a channels-last map;
- unfold+bmm: torch's unfold, then one batched GEMM with the weight [C', 9 * C] (`conv_unfold`).
Needs a CUDA GPU.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import time_graph  # noqa: E402

CASES = (("level 0 (96x96x320), tile 2, 140 tiles", 320, 2, 140), ("level 1 (48x48x640), tile 16, 1 tile", 640, 16, 1),
         ("level 2 (24x24x1280), tile 8, 1 tile", 1280, 8, 1), ("level 0, tile 4, 48 tiles", 320, 4, 48))
ROWS = 2


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--whole", action="store_true", help="the convs on whole small maps instead (see the docstring)")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("conv_gemm.py needs a CUDA GPU")
        return 2
    if a.whole:
        return whole(a)
    dev, dtype = "cuda", torch.float16
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"cudnn.benchmark {torch.backends.cudnn.benchmark}")
    print("| case | cudnn us | gemm us | unfold+gemm us | cudnn / gemm |\n|---|---|---|---|---|")
    for name, c, tile, tiles in CASES:
        n, p = ROWS * tiles, tile + 2
        patches = torch.randn(n, c, p, p, device=dev, dtype=dtype).contiguous(memory_format=torch.channels_last)
        weight = (torch.randn(c, c, 3, 3, device=dev, dtype=dtype) / (3 * c ** 0.5)).contiguous(
            memory_format=torch.channels_last)
        cols = F.unfold(patches, 3).transpose(1, 2).reshape(n * tile * tile, c * 9).contiguous()
        w2 = weight.reshape(c, c * 9).t().contiguous()
        torch.testing.assert_close((cols @ w2).view(n, tile, tile, c).permute(0, 3, 1, 2).float(),
                                   F.conv2d(patches, weight).float(), rtol=2e-2, atol=2e-2)
        t_cudnn = time_graph(lambda: F.conv2d(patches, weight), a.iters, 5, a.repeat)
        t_gemm = time_graph(lambda: cols @ w2, a.iters, 5, a.repeat)
        t_unfold = time_graph(lambda: F.unfold(patches, 3).transpose(1, 2).reshape(-1, c * 9) @ w2, a.iters, 5,
                              a.repeat)
        print(f"| {name} | {t_cudnn:.1f} | {t_gemm:.1f} | {t_unfold:.1f} | {t_cudnn / t_gemm:.2f} |", flush=True)
    return 0


WHOLE_CASES = (("12x12, 1280 -> 1280", 1280, 1280, 12), ("12x12, 2560 -> 1280", 2560, 1280, 12),
               ("24x24, 1280 -> 1280", 1280, 1280, 24), ("24x24, 640 -> 640", 640, 640, 24),
               ("16x16, 1280 -> 1280", 1280, 1280, 16), ("8x8, 1280 -> 1280", 1280, 1280, 8))


def conv_unfold(x: torch.Tensor, weight2d: torch.Tensor, bias: torch.Tensor | None, kernel: int) -> torch.Tensor:
    """A stride-1 conv with `kernel // 2` padding as im2col and one batched GEMM: x [N, C, H, W], weight2d the conv
    weight [C', C, k, k] viewed as [C', C * k * k] -> [N, C', H, W], contiguous."""
    n, _, h, w = x.shape
    out = torch.matmul(weight2d, F.unfold(x, kernel, padding=kernel // 2))  # unfold's rows: the weight's C, k, k
    if bias is not None:
        out += bias[:, None]
    return out.view(n, -1, h, w)


def whole(a) -> int:
    dev, dtype = "cuda", torch.float16
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; batch {ROWS}, fp16, 3x3 convs with padding 1")
    print("| map | cudnn us | cudnn, benchmark us | cudnn, nhwc us | unfold+bmm us | cudnn / unfold+bmm |\n"
          "|---|---|---|---|---|---|")
    for name, c, o, side in WHOLE_CASES:
        x = torch.randn(ROWS, c, side, side, device=dev, dtype=dtype)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        weight = torch.randn(o, c, 3, 3, device=dev, dtype=dtype) / (3 * c ** 0.5)
        bias = torch.randn(o, device=dev, dtype=dtype)
        w_cl = weight.contiguous(memory_format=torch.channels_last)
        w2 = weight.reshape(o, c * 9)
        torch.testing.assert_close(conv_unfold(x, w2, bias, 3).float(), F.conv2d(x, weight, bias, padding=1).float(),
                                   rtol=2e-2, atol=2e-2)
        def conv(inp):
            return lambda: F.conv2d(inp, w_cl, bias, padding=1)
        t_cudnn = time_graph(conv(x), a.iters, 5, a.repeat)
        torch.backends.cudnn.benchmark = True
        try:
            t_bench = time_graph(conv(x), a.iters, 5, a.repeat)
        finally:
            torch.backends.cudnn.benchmark = False
        t_nhwc = time_graph(conv(x_cl), a.iters, 5, a.repeat)
        t_unfold = time_graph(lambda: conv_unfold(x, w2, bias, 3), a.iters, 5, a.repeat)
        print(f"| {name} | {t_cudnn:.1f} | {t_bench:.1f} | {t_nhwc:.1f} | {t_unfold:.1f} | {t_cudnn / t_unfold:.2f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
