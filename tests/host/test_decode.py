"""FISEditDecode and the mask preview, with the real VAE of the sd15-small checkpoint."""
import pytest
import torch

STEPS = 3


@pytest.fixture(scope="module")
def checkpoint(models_dir):
    import comfy.sd
    model, _, vae = comfy.sd.load_checkpoint_guess_config(str(models_dir / "sd15-small.safetensors"),
                                                          output_vae=True, output_clip=False)[:3]
    return model, vae


def cond(seed):
    return [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(seed)), {}]]


@pytest.fixture(scope="module")
def source(checkpoint):
    import comfy.sample
    from fisedit_engine import api
    model, _ = checkpoint
    captured, handle = api.capture(model, "decode-src")
    latent = torch.zeros(2, 4, 16, 24)
    with torch.inference_mode():
        out = comfy.sample.sample(captured, comfy.sample.prepare_noise(latent, 5), STEPS, 7.0, "euler", "normal",
                                  cond(1), cond(2), latent, seed=5, disable_pbar=True)
    api.store(handle, {"samples": out})
    return handle, out


def edit_and_decode(checkpoint, handle, mask, prompt_seed):
    from fisedit_engine import api
    from fisedit_engine.edit import EditSpec
    model, vae = checkpoint
    spec = EditSpec(handle, cond(prompt_seed), mask)
    with torch.inference_mode():
        latent, result = api.sparse_sample(model, spec, 0.0, "exact", 4)
        return api.decode(vae, latent, spec), spec, result


def pixel_mask(mask):
    return mask.repeat_interleave(8, 1).repeat_interleave(8, 2)


def test_decode_is_the_original_outside_the_mask_bit_for_bit(checkpoint, source):
    _, vae = checkpoint
    handle, original_latent = source
    with torch.inference_mode():
        original = vae.decode(original_latent).cpu()
    mask = torch.zeros(2, 16, 24, dtype=torch.bool)
    mask[0, 3:8, 4:10] = True
    mask[1, 9:14, 15:22] = True
    image, _, _ = edit_and_decode(checkpoint, handle, mask, 77)
    outside = ~pixel_mask(mask)
    assert image.shape == original.shape
    assert torch.equal(image[outside], original[outside])
    assert not torch.equal(image[~outside], original[~outside])


def test_a_chained_edit_keeps_the_first_edits_pixels(checkpoint, source):
    handle, _ = source
    first_mask = torch.zeros(2, 16, 24, dtype=torch.bool)
    first_mask[:, 3:8, 4:10] = True
    first, spec, first_result = edit_and_decode(checkpoint, handle, first_mask, 77)
    assert spec.result is first_result
    second_mask = torch.zeros_like(first_mask)
    second_mask[:, 9:14, 14:20] = True
    second, _, _ = edit_and_decode(checkpoint, first_result, second_mask, 78)
    outside = ~pixel_mask(second_mask)
    assert torch.equal(second[outside], first[outside])


def test_a_chained_edit_decoded_before_the_first_edit_still_keeps_its_pixels(checkpoint, source):
    """ComfyUI may run the second edit's FISEditDecode first: the first result's image is then rebuilt as the first
    decode makes it, not decoded whole (which would change pixels outside both masks)."""
    from fisedit_engine import api
    from fisedit_engine.edit import EditSpec
    model, vae = checkpoint
    handle, original_latent = source
    first_mask = torch.zeros(2, 16, 24, dtype=torch.bool)
    first_mask[:, 3:8, 4:10] = True
    second_mask = torch.zeros_like(first_mask)
    second_mask[:, 9:14, 14:20] = True
    with torch.inference_mode():
        first_spec = EditSpec(handle, cond(77), first_mask)
        first_latent, first_result = api.sparse_sample(model, first_spec, 0.0, "exact", 4)
        second_spec = EditSpec(first_result, cond(78), second_mask)
        second_latent, _ = api.sparse_sample(model, second_spec, 0.0, "exact", 4)
        second = api.decode(vae, second_latent, second_spec)
        first = api.decode(vae, first_latent, first_spec)
        original = vae.decode(original_latent).cpu()
    outside_second, outside_both = ~pixel_mask(second_mask), ~pixel_mask(first_mask | second_mask)
    assert torch.equal(second[outside_second], first[outside_second])
    assert torch.equal(second[outside_both], original[outside_both])
    assert not torch.equal(second[~outside_second], first[~outside_second])


def test_a_result_whose_source_left_memory_is_decoded_whole_and_says_so(checkpoint, source, caplog):
    import logging
    import weakref
    from fisedit_engine import api
    from fisedit_engine.decode import original_image
    from fisedit_engine.edit import EditSpec
    model, vae = checkpoint
    handle, _ = source
    mask = torch.zeros(2, 16, 24, dtype=torch.bool)
    mask[:, 3:8, 4:10] = True
    with torch.inference_mode():
        _, result = api.sparse_sample(model, EditSpec(handle, cond(79), mask), 0.0, "exact", 4)
        cache = result.get()
        gone = type("Gone", (), {})()
        cache.edited_from = (weakref.ref(gone), mask)
        del gone
        with caplog.at_level(logging.WARNING, logger="FISEdit"):
            image = original_image(vae, cache)
        assert torch.equal(image, vae.decode(cache.final_latent).cpu())
    assert "decoded whole: its source left memory" in caplog.text


def test_an_empty_mask_decodes_to_the_original(checkpoint, source):
    _, vae = checkpoint
    handle, original_latent = source
    image, _, _ = edit_and_decode(checkpoint, handle, torch.zeros(2, 16, 24, dtype=torch.bool), 77)
    with torch.inference_mode():
        assert torch.equal(image, vae.decode(original_latent).cpu())


def test_preview_tints_the_mask_over_the_cached_image(checkpoint, source):
    from fisedit_engine import api
    model, _ = checkpoint
    handle, _ = source
    user_mask = torch.zeros(2, 128, 192)
    user_mask[:, 24:64, 32:96] = 1.0
    spec, mask, preview = api.difference_mask(model, handle, cond(3), "user", user_mask, dilate=0)
    assert mask.shape == (2, 128, 192) and torch.equal(mask > 0, user_mask > 0)
    assert preview.shape == (2, 128, 192, 3) and 0 <= preview.min() and preview.max() <= 1
    inside, outside = preview[:, 30, 40], preview[:, 100, 150]
    assert (inside[:, 0] >= 0.5).all() and not torch.equal(inside, outside)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_latent_with_nan_or_inf_is_refused_before_any_decoding(checkpoint, source, value):
    """A latent changed on the way (or a diverged one) would paste NaN pixels into the original image; refused
    before the VAE runs, and the cache's decoded original is not touched."""
    from fisedit_engine import api
    from fisedit_engine.cache import CacheError
    from fisedit_engine.edit import EditSpec
    _, vae = checkpoint
    handle, original_latent = source
    mask = torch.zeros(2, 16, 24, dtype=torch.bool)
    mask[:, 3:8, 4:10] = True
    bad = original_latent.clone()
    bad[1, 0, 5, 5] = value
    images_before = dict(handle.get().images)
    with pytest.raises(CacheError, match="NaN or infinite"):
        api.decode(vae, {"samples": bad}, EditSpec(handle, cond(77), mask))
    assert handle.get().images.keys() == images_before.keys()


def test_with_a_vae_the_auto_mask_follows_the_decoded_images_and_keeps_the_original_for_the_decode(checkpoint, source):
    from fisedit_engine import api
    from fisedit_engine import mask as M
    from fisedit_engine.fingerprint import vae_fingerprint
    model, vae = checkpoint
    handle, original_latent = source
    with torch.inference_mode():
        original = vae.decode(original_latent).cpu()
        spec, _, preview = api.difference_mask(model, handle, cond(31), "auto", probe_steps=1, vae=vae)
        plain, _, plain_preview = api.difference_mask(model, handle, cond(31), "auto", probe_steps=1)
        sized = [api.difference_mask(model, handle, cond(31), "auto", probe_steps=1, threshold="edit_size",
                                     edit_size=0.2, vae=v)[0].mask for v in (vae, None)]
    assert spec.mask.any() and torch.equal(spec.probe.difference, plain.probe.difference)
    with torch.inference_mode():  # the cut follows the original's edges and those of the probe's prediction
        guide = M.edge_guide(original, vae.decode(spec.probe.predicted))
    assert not torch.equal(guide, original)
    assert torch.equal(spec.mask, M.threshold_mask(spec.probe.edit_map, "otsu", dilate_px=1, image=guide))
    assert torch.equal(plain.mask, M.threshold_mask(plain.probe.edit_map, "otsu", dilate_px=1))
    assert torch.equal(sized[0], sized[1])  # the edit_size cut bounds the area: it does not move to the edges
    assert torch.equal(handle.get().images[vae_fingerprint(vae)], original)  # FISEditDecode will not decode again
    outside = ~pixel_mask(spec.mask)
    assert preview.shape == original.shape and plain_preview.shape == original.shape
    assert torch.equal(preview[outside], original[outside].float())
    assert not torch.allclose(preview, plain_preview)
