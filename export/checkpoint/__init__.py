"""Checkpoint layer: detect, lazily read and normalize every Wan / LightX2V / ComfyUI / diffusers layout."""
