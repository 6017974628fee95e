"""fisedit_engine/word_attention.py: the changed positions' weights, the layers' sums on the latent grid, and the
weighting of the difference map."""
import torch

from fisedit_engine import word_attention as W


def test_changed_weights_are_how_far_each_position_moved():
    gen = torch.Generator().manual_seed(0)
    original = torch.randn(1, 6, 8, generator=gen)
    edited = original.clone()
    edited[0, 3] += 2.0          # a changed word: moved by 2 * sqrt(8)
    longer = torch.cat([edited, torch.randn(1, 2, 8, generator=gen)], dim=1)
    w_edited, w_original = W.changed_weights([[original, {}]], [[longer, {}]])
    assert w_edited.shape == (8,) and w_original.shape == (6,)
    assert torch.equal(w_original, w_edited[:6])
    assert torch.equal(w_edited[:3], torch.zeros(3)) and torch.equal(w_edited[4:6], torch.zeros(2))
    torch.testing.assert_close(w_edited[3], torch.tensor(2.0 * 8 ** 0.5))
    torch.testing.assert_close(w_edited[6:], longer[0, 6:].norm(dim=-1))  # only the edited prompt has them
    same_edited, same_original = W.changed_weights([[original, {}]], [[original.clone(), {}]])
    assert not same_edited.any() and not same_original.any()


class Sums:
    def __init__(self, sums, grid):
        self.sums, self.grid = sums, grid


def test_the_layers_sums_become_one_map_each_run_scaled_to_peak_one():
    """Two layers at two grids: carried up to the latent grid (bilinear), summed; the edited and the original
    run's sums each scaled to peak 1 per sample, then added; a layer without sums is skipped."""
    gen = torch.Generator().manual_seed(1)
    fine, coarse = torch.rand(2, 2, 64, generator=gen), torch.rand(2, 2, 16, generator=gen)
    coarse[1, 1] = 0.0  # the original run's sums of sample 1 are zero at this layer only
    layers = [Sums(fine, (8, 8)), Sums(coarse, (4, 4)), Sums(None, (2, 2))]
    out = W.latent_map(layers, (8, 8))
    up = torch.nn.functional.interpolate(coarse.reshape(4, 1, 4, 4), size=(8, 8), mode="bilinear",
                                         align_corners=False).reshape(2, 2, 8, 8)
    total = fine.reshape(2, 2, 8, 8) + up
    expected = (total / total.amax((-2, -1), keepdim=True)).sum(0)
    torch.testing.assert_close(out, expected)
    assert out.shape == (2, 8, 8)
    assert W.latent_map([Sums(None, (2, 2))], (8, 8)) is None
    zero = W.latent_map([Sums(torch.zeros(2, 1, 4), (2, 2))], (4, 4))
    assert torch.equal(zero, torch.zeros(1, 4, 4))  # nothing changed: no NaN


def test_the_weighting_keeps_where_the_words_look_and_scales_out_the_rest():
    difference = torch.zeros(2, 4, 4)
    difference[:, 0, 0], difference[:, 3, 3] = 4.0, 2.0    # the edit, and an echo of it on another object
    attention = torch.full((2, 4, 4), 0.1)
    attention[:, 0, 0] = 1.0
    attention[1] = 0.0                                     # sample 1: no position changed
    out = W.weighted(difference, attention)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor(1.0))
    torch.testing.assert_close(out[0, 3, 3], torch.tensor(0.5 * 0.1 ** W.POWER))
    assert torch.equal(out[1], difference[1])
    assert W.weighted(difference, None) is difference
    torch.testing.assert_close(W.weighted(difference, attention, power=1.0)[0, 3, 3], torch.tensor(0.05))
