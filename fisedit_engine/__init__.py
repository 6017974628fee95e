"""FISEdit engine: cache-enabled sparse diffusion inference for ComfyUI's UNets.

Importable without the node layer; ComfyUI itself is imported lazily by comfy_adapter.
"""
