"""The sparse ops and edits with the Triton kernels instead of the reference ops, on the CPU under Triton's
interpreter: a representative subset of tests/host/test_sparse_ops.py (I5 for every sparse block kind, the convs on
stacked patches, as im2col GEMMs and by level, with the plan's index maps as the tiles need them and padded) and
tests/host/test_edit.py (I3, I4, batch 2 with CFG, the SD2.1-v and SDXL structures, tile size 7), run in a
subprocess with TRITON_INTERPRET=1 and FISEDIT_KERNELS=triton (Triton reads the variable when the
kernels are defined, so it cannot be switched on inside this process; `triton` mode fails instead of falling back).
The same tolerances as with the reference ops hold. About 80 s of CPU; all of test_sparse_ops.py passes this way too
(README, Tests).
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import kernel_checks

kernel_checks.require_triton()

ROOT = Path(__file__).resolve().parents[2]
SUBSET = [
    "tests/host/test_sparse_ops.py::test_resblock[nhwc-unpadded-sd15-hw0-4-0]",
    "tests/host/test_sparse_ops.py::test_resblock[im2col-padded-sdxl-hw2-5-2]",
    "tests/host/test_sparse_ops.py::test_spatial_transformer[padded-sd21v-hw1-3-1]",
    "tests/host/test_sparse_ops.py::test_conv_in_downsample_upsample[nhwc-unpadded-sd15-hw0-4-0]",
    "tests/host/test_sparse_ops.py::test_conv_in_downsample_upsample[im2col-unpadded-sd15-hw0-4-0]",
    "tests/host/test_sparse_ops.py::test_conv_in_downsample_upsample[mixed-padded-sd15-hw0-4-0]",
    "tests/host/test_sparse_ops.py::test_output_head[im2col-unpadded-sdxl-hw2-5-2]",
    "tests/host/test_edit.py::test_i3_unchanged_prompt_returns_the_original[sd15-dpmpp_2m-2-7.0-hw11]",
    "tests/host/test_edit.py::test_i4_outside_the_mask_the_latent_is_the_original[sd15-dpmpp_2m-2-7.0-hw11]",
    "tests/host/test_edit.py::test_i4_outside_the_mask_the_latent_is_the_original[sd21v-dpmpp_2m-2-7.0-hw28]",
    "tests/host/test_edit.py::test_i4_outside_the_mask_the_latent_is_the_original[sdxl-euler_ancestral-1-1.0-hw31]",
    "tests/host/test_edit.py::test_i4_holds_for_every_option[options3]",
]


def test_sparse_ops_and_edits_with_interpreted_triton_kernels():
    env = {**os.environ, "TRITON_INTERPRET": "1", "FISEDIT_KERNELS": "triton"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *SUBSET], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=1800)
    tail = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    assert re.search(rf"\b{len(SUBSET)} passed\b", proc.stdout), tail  # every test ran, none was skipped
