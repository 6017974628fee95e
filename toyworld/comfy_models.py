"""ComfyUI's MODEL, CLIP and VAE for the toy model, built from its weights the way the checkpoint loader builds
SD1.5's, so that the stock nodes (CLIPTextEncode, KSampler, VAEDecode, VAEEncode, SetLatentNoiseMask, ...) and
FISEdit's nodes take them like any other model:
- MODEL: a model_base.BaseModel (EPS, SD's scaled-linear 1000-step schedule: ComfyUI's default sampling settings)
  around the UNet, in a ModelPatcher; the latent format has the fitted scale and preview colours.
- CLIP: a comfy.sd.CLIP whose text model is ComfyUI's SDClipModel over the toy transformer, and whose tokenizer is
  ComfyUI's SDTokenizer (prompt weights "(word:1.2)", 77-token chunks, padding with the end token) driving a word
  tokenizer over the grammar's vocabulary; unknown words become <unk>.
- VAE: a comfy.sd.VAE built from the explicit AutoencoderKL config (its state-dict detection assumes SD's width).
"""
from __future__ import annotations

import json
import logging

import torch

from . import captions, models


def _latent_format(meta: dict):
    """A LatentFormat class with the weights' own normalisation (the VAE's latents to zero mean and unit
    variance, as Flux's and SD3's formats shift and scale) and preview colours."""
    import comfy.latent_formats

    class ToyWorldLatent(comfy.latent_formats.LatentFormat):
        latent_channels = 4

        def __init__(self):
            self.shift_factor = float(meta["latent_shift"])
            self.scale_factor = float(meta["latent_scale"])
            self.latent_rgb_factors = json.loads(meta["latent_rgb_factors"])
            self.latent_rgb_factors_bias = json.loads(meta["latent_rgb_factors_bias"])

        def process_in(self, latent):
            return (latent - self.shift_factor) * self.scale_factor

        def process_out(self, latent):
            return latent / self.scale_factor + self.shift_factor

    return ToyWorldLatent


class _WordTokenizer:
    """The minimal surface of a Hugging Face tokenizer that comfy.sd1_clip.SDTokenizer uses."""

    def __init__(self, vocab: tuple[str, ...]):
        self.vocab = tuple(vocab)

    @classmethod
    def from_pretrained(cls, path, vocab=captions.VOCAB, **_):
        return cls(vocab)

    def __call__(self, text: str) -> dict:
        return {"input_ids": [captions.START] + captions.word_ids(text, self.vocab) + [captions.END]}

    def get_vocab(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.vocab)}


def clip_target(text_config: dict, vocab: tuple[str, ...]):
    """A comfy.supported_models_base.ClipTarget (tokenizer class, text model class) for this text encoder."""
    import comfy.sd1_clip
    import comfy.supported_models_base
    width = text_config["hidden_size"]
    specials = {"start": captions.START, "end": captions.END, "pad": captions.END}

    class ToyWorldTokenizer(comfy.sd1_clip.SDTokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data={}):  # noqa: B006 (ComfyUI's signature)
            super().__init__(tokenizer_path="toyworld-words", max_length=captions.MAX_TOKENS, pad_with_end=True,
                             embedding_directory=embedding_directory, embedding_size=width,
                             embedding_key=models.CLIP_NAME, tokenizer_class=_WordTokenizer,
                             tokenizer_args={"vocab": vocab}, tokenizer_data=tokenizer_data)

    class ToyWorldTokenizers(comfy.sd1_clip.SD1Tokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data={}):  # noqa: B006
            super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data,
                             name=models.CLIP_NAME, tokenizer=ToyWorldTokenizer)

    class ToyWorldTextEncoder(comfy.sd1_clip.SDClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):  # noqa: B006
            super().__init__(device=device, max_length=captions.MAX_TOKENS, layer="last",
                             textmodel_json_config=dict(text_config), dtype=dtype,
                             model_class=models.text_transformer_class(), special_tokens=specials,
                             return_projected_pooled=False, model_options=model_options)

    class ToyWorldClip(comfy.sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):  # noqa: B006
            super().__init__(device=device, dtype=dtype, model_options=model_options, name=models.CLIP_NAME,
                             clip_model=ToyWorldTextEncoder, **kwargs)

    return comfy.supported_models_base.ClipTarget(ToyWorldTokenizers, ToyWorldClip)


def _model_config(unet_config: dict, meta: dict):
    import comfy.supported_models_base

    class ToyWorld(comfy.supported_models_base.BASE):
        unet_config = {}  # noqa: RUF012  never matched against checkpoints: this loader builds the model
        unet_extra_config = {}  # noqa: RUF012
        latent_format = _latent_format(meta)
        memory_usage_factor = 1.0
        supported_inference_dtypes = [torch.float16, torch.bfloat16, torch.float32]  # noqa: RUF012 (BASE's API)

    return ToyWorld(unet_config)


def _split(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def build(sd: dict[str, torch.Tensor], meta: dict):
    """(MODEL, CLIP, VAE) from the toy model's weights and metadata."""
    from fisedit_engine import comfy_adapter as host

    unet_config = json.loads(meta["unet_config"])
    text_config = json.loads(meta["text_config"])
    vae_config = json.loads(meta["vae_config"])
    vocab = tuple(json.loads(meta["vocab"]))
    parts = {"unet": _split(sd, models.UNET_PREFIX), "text": _split(sd, models.TEXT_PREFIX),
             "vae": _split(sd, models.VAE_PREFIX)}
    for part, tensors in parts.items():
        if not tensors:
            raise ValueError(f"the toy model's weights have no {part} tensors")
    # each as the host's checkpoint loader builds SD1.5's (the adapter knows how that differs between versions)
    model, missing, unexpected = host.build_model(_model_config(unet_config, meta), parts["unet"], "EPS")
    _check("UNet", missing, unexpected)
    clip, missing, unexpected = host.build_clip(clip_target(text_config, vocab), parts["text"],
                                                host.embedding_directories())
    _check("text encoder", missing, unexpected)
    vae = host.build_vae(parts["vae"], vae_config["ddconfig"], vae_config["embed_dim"])
    return model, clip, vae


def _check(what: str, missing, unexpected) -> None:
    if missing or unexpected:
        raise ValueError(f"the toy model's {what} weights do not fit its config: missing {list(missing)[:5]}, "
                         f"unexpected {list(unexpected)[:5]}")


def load(paths) -> tuple:
    """(MODEL, CLIP, VAE, metadata) from a weights file or its shards."""
    sd, meta = models.load_weights(list(paths))
    model, clip, vae = build(sd, meta)
    logging.getLogger(__name__).info("FISEdit toy model loaded from %s: %s", ", ".join(str(p) for p in paths),
                 models.parameter_counts(sd))
    return model, clip, vae, meta
