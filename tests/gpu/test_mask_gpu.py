"""The mask on the model's device: FISEditDifferenceMask thresholds there (the edge-following filter touches every
pixel of the image), and must cut exactly as on the CPU. Skipped without CUDA."""
import torch

from fisedit_engine import mask as M


def test_the_mask_on_cuda_equals_the_mask_on_the_cpu():
    gen = torch.Generator().manual_seed(0)
    diff = torch.zeros(2, 32, 32)
    diff[0, 5:14, 8:20] = 1.0
    diff[1, 20:30, 2:9] = 0.7
    diff = M.smooth(diff + 0.05 * torch.rand(2, 32, 32, generator=gen))
    image = torch.rand(2, 256, 256, 3, generator=gen) * 0.1
    image[0, 44:110, 70:150] += 0.8
    image[1, 165:235, 20:70] += 0.8
    for method in ("otsu", "edit_size"):
        for with_image in (False, True):
            kw = dict(edit_size=0.1, dilate_px=1, image=image if with_image else None)
            on_cpu = M.threshold_mask(diff, method, **kw)
            kw["image"] = image.cuda() if with_image else None
            on_cuda = M.threshold_mask(diff.cuda(), method, **kw)
            assert on_cuda.is_cuda and on_cpu.any()
            assert torch.equal(on_cuda.cpu(), on_cpu), (method, with_image)
