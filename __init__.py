"""wanrt: compiled engines and a thin runtime for the Wan2.1 / Wan2.2 video diffusion models.

Installed, this folder is the `wanrt` package (`wanrt.engines`, `wanrt.export`, `wanrt.runtime`, ...),
so its generic sub-package names never clash with other installed packages. From a checkout,
`python cli.py` binds the name `wanrt` to the checkout itself (see `cli.bind_checkout`).
"""

__version__ = "0.1.0"
