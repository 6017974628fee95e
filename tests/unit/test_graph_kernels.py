"""benchmarks/graph_kernels.py sorts kernels by kind from their names as the H200's profiler reported them."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from graph_kernels import kind_of  # noqa: E402


def test_kernel_names_sort_into_their_kinds():
    names = {
        "_exact_stats_kernel": "triton",
        "triton_poi_fused_add_0": "triton",
        "sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize64x128x64_warpgroupsize1x1x1_g1_execute_"
        "segment_k_off_kernel__5x_cudnn": "convolution",
        "nvjet_sm90_hsh_64x32_64x16_2x4_h_bz_bias_TNT": "gemm",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64_4x1x1_cga1x1x1_kernel0_0":
            "attention",
        "void at::native::vectorized_elementwise_kernel<8, at::native::CUDAFunctor_add<c10::Half>>": "elementwise",
        "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::Half, float, false>": "norm",
    }
    assert {name: kind_of(name) for name in names} == names
