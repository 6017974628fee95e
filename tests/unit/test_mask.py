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


def components_reference(mask):
    """Connected components by breadth-first search over 8-neighbours, written independently of the engine's."""
    h, w = mask.shape
    labels = [[-1] * w for _ in range(h)]
    for y in range(h):
        for x in range(w):
            if mask[y, x] and labels[y][x] < 0:
                labels[y][x], queue = y * w + x, [(y, x)]
                while queue:
                    cy, cx = queue.pop()
                    for ny in range(cy - 1, cy + 2):
                        for nx in range(cx - 1, cx + 2):
                            if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and labels[ny][nx] < 0:
                                labels[ny][nx] = y * w + x
                                queue.append((ny, nx))
    return torch.tensor(labels)


@pytest.mark.parametrize("seed", range(4))
def test_components_equal_a_breadth_first_search(seed):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(2, 13, 17, generator=gen) < 0.35 + 0.1 * seed
    labels = M.components(mask)
    for b in range(2):
        assert torch.equal(labels[b], components_reference(mask[b]))


def test_weak_regions_are_dropped_and_small_strong_ones_kept():
    """A 2x2 region (which a 3x3 opening would erase) holding the strongest difference stays; a larger region
    whose difference never reaches half of it goes; a region touching the strongest one's peak level stays."""
    diff = torch.zeros(1, 12, 12)
    diff[0, 1:3, 1:3] = 1.0              # small, strongest
    diff[0, 6:11, 6:11] = 0.4            # large, weak
    diff[0, 0:4, 8:12] = 0.3
    diff[0, 1, 9] = 0.6                  # a region whose peak passes half of the strongest
    kept = M.drop_weak_components(diff > 0.2, diff)
    expected = torch.zeros(1, 12, 12, dtype=torch.bool)
    expected[0, 1:3, 1:3] = True
    expected[0, 0:4, 8:12] = True
    assert torch.equal(kept, expected)
    assert not M.drop_weak_components(torch.zeros(1, 4, 4, dtype=torch.bool), torch.rand(1, 4, 4)).any()


def test_fill_holes_fills_enclosed_regions_only():
    m = torch.zeros(1, 10, 10, dtype=torch.bool)
    m[0, 2:7, 2] = m[0, 2:7, 6] = m[0, 2, 2:7] = m[0, 6, 2:7] = True   # a closed ring
    m[0, 0:3, 8] = m[0, 2, 8:10] = True                                  # a corner pocket open to the border
    filled = M.fill_holes(m)
    expected = m.clone()
    expected[0, 3:6, 3:6] = True
    assert torch.equal(filled, expected)
    m[0, 4, 6] = False                                                   # open the ring: nothing is enclosed
    assert torch.equal(M.fill_holes(m), m)


def brute_force_hull(cells: torch.Tensor) -> torch.Tensor:
    """The cells inside every half-plane bounded by a line through two of the points with all points on its side:
    the convex hull by its definition, in O(n^3)."""
    points = [tuple(p) for p in cells.nonzero().tolist()]
    inside = torch.ones_like(cells)
    ys, xs = torch.meshgrid(torch.arange(cells.shape[0]), torch.arange(cells.shape[1]), indexing="ij")
    for a in points:
        for b in points:
            if a == b:
                continue
            def side(y, x, a=a, b=b):
                return (b[0] - a[0]) * (x - a[1]) - (b[1] - a[1]) * (y - a[0])
            if all(side(*q) >= 0 for q in points):
                inside &= side(ys, xs) >= 0
    return inside


@pytest.mark.parametrize("seed", range(12))
def test_convex_hull_matches_its_definition(seed):
    gen = torch.Generator().manual_seed(seed)
    cells = torch.rand(11, 13, generator=gen) < 0.04 + 0.02 * (seed % 4)
    cells[5, 6] = cells[2, 3] = cells[8, 4] = True  # never collinear
    assert torch.equal(M.convex_hull(cells), brute_force_hull(cells))


def test_fill_concavities_completes_compact_regions_only():
    square = torch.zeros(1, 14, 14, dtype=torch.bool)
    square[0, 2:9, 2:9] = True
    bite = square.clone()                  # a triangle (apex up) redrawn as a square: outside the triangle
    for row in range(6):
        bite[0, 3 + row, 5 - row * 2 // 5:6 + row * 2 // 5] = False
    ell = torch.zeros(1, 14, 14, dtype=torch.bool)
    ell[0, 2:13, 11] = ell[0, 12, 4:12] = True
    mask = bite | ell
    filled = M.fill_concavities(mask)
    assert torch.equal(filled, square | ell)   # the L's hull would triple it: not an object's outline
    assert torch.equal(M.fill_concavities(mask, max_growth=1.0), mask)
    assert torch.equal(M.threshold_mask(mask.float(), "otsu", dilate_px=0), square | ell)
    assert torch.equal(M.threshold_mask(mask.float(), "otsu", dilate_px=0, max_hull_growth=1.0), mask)


def test_the_mask_keeps_a_small_object_and_fills_a_rim():
    """What the opening lost: a size change of a small object differs at its rim; the mask is the whole object."""
    diff = torch.zeros(1, 16, 16)
    diff[0, 5:10, 5:10] = 1.0
    diff[0, 6:9, 6:9] = 0.0    # the unchanged inside
    diff[0, 12, 1] = 0.2       # a faint speck elsewhere
    m = M.threshold_mask(diff, "otsu", dilate_px=0)
    expected = torch.zeros(1, 16, 16, dtype=torch.bool)
    expected[0, 5:10, 5:10] = True
    assert torch.equal(m, expected)


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
    assert diff[0, 0, 0] == pytest.approx(float(diff[0, 7, 7])) and diff[0, 0, 0] > 0.9  # mirrored corners


def test_an_edit_size_cut_is_never_filled():
    """edit_size bounds the area: a ring selected by the quantile stays a ring (Otsu would fill it)."""
    diff = torch.zeros(1, 16, 16)
    diff[0, 4:12, 4:12] = 1.0
    diff[0, 6:10, 6:10] = 0.0
    ring = diff > 0
    size = float(ring.float().mean())
    assert torch.equal(M.threshold_mask(diff, "edit_size", edit_size=size, dilate_px=0), ring)
    assert M.threshold_mask(diff, "otsu", dilate_px=0).sum() == 64


def test_smoothing_keeps_zero_maps_zero_and_spreads_a_point_symmetrically():
    assert torch.equal(M.smooth(torch.zeros(2, 8, 8)), torch.zeros(2, 8, 8))
    point = torch.zeros(1, 9, 9)
    point[0, 4, 4] = 1.0
    s = M.smooth(point)[0]
    assert s.sum() == pytest.approx(1.0) and s.argmax() == 4 * 9 + 4
    assert torch.allclose(s, s.flip(0)) and torch.allclose(s, s.t())
    assert s[4, 5] < s[4, 4] and s[4, 2] > 0 and s[4, 1] == 0  # a 5x5 kernel


@pytest.mark.parametrize("radius", [0, 1, 3, 7])
def test_box_mean_equals_average_pooling_clipped_at_the_borders(radius):
    x = torch.rand(3, 13, 10, generator=torch.Generator().manual_seed(radius), dtype=torch.float64)
    expected = torch.nn.functional.avg_pool2d(x[:, None], 2 * radius + 1, stride=1, padding=radius,
                                              count_include_pad=False)[:, 0] if radius <= 6 else None
    if expected is None:  # avg_pool2d caps padding at half the kernel: compare with explicit windows
        expected = torch.stack([torch.stack([x[:, max(i - radius, 0):i + radius + 1,
                                               max(j - radius, 0):j + radius + 1].mean(dim=(1, 2))
                                             for j in range(10)], -1) for i in range(13)], -2)
    assert torch.allclose(M.box_mean(x, radius), expected)


def test_the_guided_filter_is_a_double_box_filter_under_a_flat_guide():
    p = torch.rand(12, 12, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    guide = torch.full((3, 12, 12), 0.5, dtype=torch.float64)
    assert torch.allclose(M.guided_filter(guide, p, 2, 1e-3), M.box_mean(M.box_mean(p, 2), 2))


def test_the_guided_filter_reproduces_a_linear_function_of_its_guide_and_keeps_its_edges():
    gen = torch.Generator().manual_seed(5)
    guide = torch.rand(3, 16, 16, generator=gen, dtype=torch.float64)
    p = 0.3 * guide[0] - 0.7 * guide[2] + 0.2
    assert torch.allclose(M.guided_filter(guide, p, 3, 1e-9), p, atol=1e-5)
    step = torch.zeros(3, 16, 16, dtype=torch.float64)
    step[:, :, 7:] = 1.0  # an edge between columns 6 and 7
    q = M.guided_filter(step, step[0], 3, 1e-3)
    assert (q[:, :7] < 0.01).all() and (q[:, 7:] > 0.99).all()
    assert M.box_mean(step[0], 3)[0, 6] > 0.4  # where a plain smoothing would have blurred it


def test_along_edges_snaps_a_coarse_change_to_the_object_the_image_shows():
    """A square object whose edges fall inside latent cells; the probe's map covers it loosely (strong inside,
    weaker one cell around, a faint echo elsewhere). Cut along the image's edges, the mask is the cells that hold
    enough of the object's pixels, which the latent grid's own threshold cannot find."""
    scale, h = 8, 16
    image = torch.full((h * scale, h * scale, 3), 0.5)
    image[37:91, 45:83] = torch.tensor([0.9, 0.1, 0.1])  # rows 37..90, columns 45..82
    share = torch.nn.functional.avg_pool2d((image[..., 1] < 0.3).float()[None, None], scale)[0, 0]
    truth = share > M.EDGE_SHARE
    diff = torch.zeros(h, h)
    diff[5:11, 6:10] = 1.0
    diff = M.smooth(M.smooth(diff[None]))[0]
    diff[1, 14] = 0.3  # an echo, where the image has no edge
    t = M.otsu_threshold(diff)
    assert not torch.equal(diff > t, truth)
    assert torch.equal(M.along_edges(diff, image, t), truth)
    with pytest.raises(ValueError, match="whole multiple"):
        M.along_edges(diff, image[:-3], t)


def test_threshold_mask_cuts_along_the_image_only_with_otsu():
    diff = torch.zeros(1, 8, 8)
    diff[0, 2:6, 2:6] = 1.0
    image = torch.zeros(1, 64, 64, 3)
    image[0, 20:44, 20:44] = 1.0  # edges in the middle of cells 2 and 5
    assert torch.equal(M.threshold_mask(diff, "edit_size", edit_size=0.25, dilate_px=0, image=image),
                       M.threshold_mask(diff, "edit_size", edit_size=0.25, dilate_px=0))
    snapped = M.threshold_mask(M.smooth(diff), "otsu", dilate_px=0, image=image)
    expected = torch.zeros(1, 8, 8, dtype=torch.bool)
    expected[0, 2:6, 2:6] = True
    assert torch.equal(snapped, expected)
