"""benchmarks/mask_variants.py's segment completion on a drawn image: the regions it adds are the ones the mask
covers enough of, and nothing leaks into the background."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import mask_variants as V  # noqa: E402


def drawn_image():
    image = torch.full((64, 64, 3), 0.5)
    image[8:24, 8:24] = torch.tensor([0.9, 0.1, 0.1])    # a red square: cells 1-2 of the 8x8 grid
    image[40:56, 40:56] = torch.tensor([0.1, 0.1, 0.9])  # a blue one: cells 5-6
    return image


def test_segments_are_the_flat_regions():
    labels = V.image_segments(drawn_image(), 0.05)
    assert len(torch.unique(labels)) == 3
    assert len(torch.unique(labels[8:24, 8:24])) == 1 and labels[8, 8] != labels[0, 0] != labels[40, 40]


def test_completion_adds_the_regions_the_mask_covers_enough_of():
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[1, 1:3] = True   # half the red square
    mask[5, 5] = True     # a quarter of the blue one
    completed = V.complete_segments(mask, drawn_image(), 0.05, share=0.4)
    expected = mask.clone()
    expected[1:3, 1:3] = True  # the red square whole; the blue one (25% < 40%) and the background not
    assert torch.equal(completed, expected)
    everything = V.complete_segments(mask, drawn_image(), 0.05, share=0.2)
    assert everything[5:7, 5:7].all() and not everything[0, 0]  # the background is too large to be taken
