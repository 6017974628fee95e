"""Toy world: a procedural scene generator with exact ground truth, and a small text-to-image latent diffusion
model trained on it, for FISEdit's demo and its edit-quality benchmark.

- `world`: the vocabulary (shapes, colours, sizes, grid cells, backgrounds) and batches of scenes.
- `render`: scenes -> RGB images and per-object pixel masks (pure torch, vectorised, any device).
- `captions`: scene <-> caption text (a small grammar), and caption token ids built in bulk for training.
- `edits`: caption edits (colour, shape, size, add, remove) with the exact pixels they change.
- `judge`: reads a cell of an image back into (colour, shape, size): edit success without a learned classifier.
- `models`, `comfy_models`: the UNet / text encoder / VAE definitions (ComfyUI's own classes) and the ComfyUI
  MODEL, CLIP and VAE built from a weights file. These import ComfyUI; the modules above need only torch.
"""
