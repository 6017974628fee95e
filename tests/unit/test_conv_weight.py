"""EditState.conv_weight: channels-last conv weights for channels-last patches, made once per edit."""
import torch

from fisedit_engine.edit import EditState
from fisedit_engine.kernels import reference as R


def _state():
    return EditState(plan=None, source=None, dense_from=0)


def test_channels_last_patches_get_one_channels_last_copy_of_the_weight_per_edit():
    conv = torch.nn.Conv2d(8, 6, 3)
    stored = torch.randn(2, 5, 6, 6, 8)            # [N, tiles, P, Q, C]: the Triton gather's NHWC patches
    patches = stored.permute(0, 4, 1, 2, 3)        # seen as [N, C, tiles, P, Q]
    state = _state()
    with torch.no_grad():
        w = state.conv_weight(conv, conv.weight, patches)
        assert w.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous(
            memory_format=torch.channels_last)
        assert torch.equal(w, conv.weight)
        assert state.conv_weight(conv, conv.weight, patches) is w
        torch.testing.assert_close(R.conv_patches(patches, w, conv.bias), R.conv_patches(patches, conv.weight,
                                                                                         conv.bias))
        conv.weight.mul_(2.0)  # written in place (a kept edit outlives ComfyUI's patches): copied again
        again = state.conv_weight(conv, conv.weight, patches)
        assert again is not w and torch.equal(again, conv.weight)


def test_other_patches_and_cast_copies_keep_the_weight_they_were_given():
    conv = torch.nn.Conv2d(8, 6, 3)
    state = _state()
    nchw = torch.randn(2, 8, 5, 6, 6)
    channels_last = torch.randn(2, 5, 6, 6, 8).permute(0, 4, 1, 2, 3)
    assert state.conv_weight(conv, conv.weight, nchw) is conv.weight
    cast = conv.weight.detach().half()            # what ComfyUI's casting hands over for an offloaded weight
    assert state.conv_weight(conv, cast, channels_last) is cast
    assert not state._conv_weights


def test_im2col_weights_are_made_for_the_levels_whose_convs_multiply_im2col_rows(monkeypatch):
    convs = [(level, torch.nn.Conv2d(4, 4, 3)) for level in (0, 1, 2, 0)]
    state = EditState(plan=None, source=None, dense_from=0, sparse_convs=convs)
    for layout, levels in (("nhwc", ()), ("nchw", ()), ("im2col", (0, 1, 2, 0)), ("mixed", (1, 2))):
        monkeypatch.setenv("FISEDIT_PATCH_LAYOUT", layout)
        assert state.im2col_convs() == [conv for level, conv in convs if level in levels], layout
