"""Torch-free runtime: backends, schedulers, pipelines, expert swap, weight streaming, video I/O."""
