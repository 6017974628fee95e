"""The difference-mask pieces (fisedit_engine/mask.py) on controlled data."""
import pytest
import torch

from fisedit_engine import mask as M


def latents_with_change(region, steps=3, seed=0, amount=1.0):
    gen = torch.Generator().manual_seed(seed)
    cached = [torch.randn(1, 4, 16, 16, generator=gen) for _ in range(steps)]
    edited = []
    for i, c in enumerate(cached):
        e = c.clone()
        e[:, :, region[0], region[1]] += amount * (i + 1) + 0.01 * torch.randn(e[:, :, region[0], region[1]].shape,
                                                                              generator=gen)
        edited.append(e)
    return edited, cached


def test_identical_latents_give_an_empty_mask_not_nan():
    _, cached = latents_with_change((slice(0, 1), slice(0, 1)))
    diff = M.difference_map(cached, [c.clone() for c in cached])
    assert torch.equal(diff, torch.zeros_like(diff))
    for method in ("otsu", "edit_size"):
        assert not M.threshold_mask(diff, method, edit_size=0.2).any()


def test_rounding_noise_is_not_an_edit():
    """The probe runs another batch than the original did: on GPUs the last bits differ. That must stay empty."""
    _, cached = latents_with_change((slice(0, 1), slice(0, 1)))
    gen = torch.Generator().manual_seed(7)
    noisy = [c * (1 + 1e-3 * torch.randn(c.shape, generator=gen)) for c in cached]
    assert not M.threshold_mask(M.difference_map(noisy, cached), "otsu").any()


def test_otsu_finds_the_changed_region():
    region = (slice(4, 9), slice(6, 12))
    edited, cached = latents_with_change(region)
    m = M.threshold_mask(M.difference_map(edited, cached), "otsu", dilate_px=0)
    expected = torch.zeros(1, 16, 16, dtype=torch.bool)
    expected[:, region[0], region[1]] = True
    assert torch.equal(m, expected)  # found, cleaned, and not shifted by a pixel


def test_edit_size_selects_that_share_of_the_area():
    gen = torch.Generator().manual_seed(1)
    diff = torch.rand(1, 32, 32, generator=gen)
    for size in (0.05, 0.15, 0.3):
        t = M.quantile_threshold(diff[0], size)
        assert abs(float((diff[0] >= t).float().mean()) - size) < 0.01


def test_otsu_splits_a_bimodal_histogram_between_its_modes():
    gen = torch.Generator().manual_seed(2)
    values = torch.cat([torch.randn(900, generator=gen) * 0.1, 3 + torch.randn(100, generator=gen) * 0.1])
    t = M.otsu_threshold(values)
    assert (values[:900] <= t).all() and (values[900:] > t).all()


def test_opening_removes_specks_keeps_blobs_and_is_centred():
    m = torch.zeros(1, 12, 12, dtype=torch.bool)
    m[0, 1, 1] = True             # a speck
    m[0, 5:9, 5:9] = True         # a blob
    m[0, 0:4, 9:12] = True        # a blob at the border
    opened = M.opening(m)
    expected = torch.zeros_like(m)
    expected[0, 5:9, 5:9] = True
    expected[0, 0:4, 9:12] = True
    assert torch.equal(opened, expected)
    with pytest.raises(ValueError, match="odd"):
        M.opening(m, 2)


def test_dilate_grows_by_the_given_pixels():
    m = torch.zeros(1, 9, 9, dtype=torch.bool)
    m[0, 4, 4] = True
    assert M.dilate(m, 2).sum() == 25 and M.dilate(m, 0) is m


def test_late_steps_weigh_as_much_as_early_ones():
    """Per-step normalisation: a region that changes only late, by a little, still shows."""
    gen = torch.Generator().manual_seed(3)
    cached = [torch.randn(1, 4, 8, 8, generator=gen) for _ in range(2)]
    edited = [c.clone() for c in cached]
    edited[0][:, :, 0:2, 0:2] += 100.0   # early and large
    edited[1][:, :, 6:8, 6:8] += 0.01    # late and small
    diff = M.difference_map(edited, cached)
    assert diff[0, 0, 0] == pytest.approx(1.0) and diff[0, 7, 7] == pytest.approx(1.0)
