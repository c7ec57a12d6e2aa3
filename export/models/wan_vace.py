"""Export-ready Wan2.1-VACE DiT (VACE-1.3B, VACE-14B): `WanDiT` plus the VACE control branch.

Parameter names are the official `VaceWanModel` state dict's (Wan2.1 `wan/modules/vace_model.py`);
the math follows its forward:

- the control latents `vace_context` [B, vace_in_dim, F, H, W] go through `vace_patch_embedding`
  (a Conv3d like `patch_embedding`) into a control stream `c` with the latent's token layout;
- `vace_blocks.N` are Wan attention blocks (`WanBlock`, text cross-attention only) over `c`, with the
  main stream's time modulation, text context and RoPE; block 0 first adds `before_proj(c)` to the
  embedded latent `x` (`c = before_proj(c) + x`); every block N emits the hint `after_proj(c)`;
- the hints all come from the embedded latent (the control stream never reads the main one);
  main block `vace_layers[N]` adds `hint_N * context_scale[:, N]` to its output.  The official
  code computes every hint before the main blocks; here VACE block N runs just before its hint is
  added (the same values), so one control stream is alive instead of every hint (VACE-14B at
  720p: 8 hints of 75,600 x 5120 fp32, 12 GB).

Precision as `WanDiT`: the VACE blocks' linears (attention, FFN, before/after_proj) are stored and
run in the model dtype; the VACE patch embedding, norms and modulation stay float32; the control
stream `c` and the hints are float32 residual streams.

Export: `forward(latent, timestep, context, vace_context, context_scale) -> noise_pred` is the
`engines.signatures.dit_signature` VACE contract; `context_scale` [B, vace_blocks] carries the
official scalar `vace_context_scale` (or diffusers' per-block `control_hidden_states_scale`).
"""

from __future__ import annotations

import torch
from torch import nn

from wanrt.engines.model import DiTConfig

from .wan_dit import DiTError, Linear, WanBlock, WanDiT, cast, param_dtype


class VaceBlock(WanBlock):
    """Official `VaceWanAttentionBlock`: a Wan block over the control stream that emits a hint."""

    def __init__(self, cfg: DiTConfig, attention_impl: str, first: bool):
        super().__init__(cfg, attention_impl)
        if first:  # block 0 brings the control input into the latent's stream
            self.before_proj = Linear(cfg.dim, cfg.dim)
        self.after_proj = Linear(cfg.dim, cfg.dim)

    def forward(
        self, c: torch.Tensor, x: torch.Tensor, e0: torch.Tensor, context: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """c, x [B, T, N, D] float32 (control and embedded latent) -> (the next c, this block's hint), float32."""
        if hasattr(self, "before_proj"):
            c = cast(self.before_proj(c), torch.float32) + x
        c = super().forward(c, e0, context, None, cos, sin)
        return c, cast(self.after_proj(c), torch.float32)


class WanVaceDiT(WanDiT):
    """Wan2.1-VACE DiT; `forward(latent, timestep, context, vace_context, context_scale) -> noise_pred`."""

    def __init__(self, cfg: DiTConfig, dtype: torch.dtype = torch.float32, attention_impl: str = "native",
                 per_frame_timestep: bool | None = None):
        if not cfg.vace or cfg.image_branch:
            raise DiTError(f"WanVaceDiT needs a VACE config without an image branch (vace_layers {list(cfg.vace_layers)},"
                           f" image_branch {cfg.image_branch})")  # fmt: skip
        if per_frame_timestep:
            raise DiTError("VACE DiTs take one timestep per sample, not per frame")
        super().__init__(cfg, dtype, attention_impl, per_frame_timestep=False)
        self.vace_blocks = nn.ModuleList(VaceBlock(cfg, attention_impl, first=n == 0) for n in range(len(cfg.vace_layers)))
        self.vace_patch_embedding = nn.Conv3d(cfg.vace_in_dim, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        for name, p in self.named_parameters():
            if name.startswith("vace_"):
                p.data = p.data.to(param_dtype(name, dtype))

    def forward(
        self, latent: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, vace_context: torch.Tensor,
        context_scale: torch.Tensor,
    ) -> torch.Tensor:
        """latent [B, 16, F, H, W], timestep [B], context [B, 512, text_dim], vace_context [B, vace_in_dim, F, H, W],
        context_scale [B, vace_blocks] -> noise_pred [B, 16, F, H, W] float32."""
        s = self.embed(latent, timestep, context)
        x0 = s.x  # the embedded latent: every hint is computed from it, before any main block
        c = self.tokens(self.vace_patch_embedding(cast(vace_context, self.vace_patch_embedding.weight.dtype)))
        vace = {layer: n for n, layer in enumerate(self.cfg.vace_layers)}
        for i, block in enumerate(self.blocks):
            s.x = block(s.x, s.e0, s.context, s.context_img, s.cos, s.sin)
            if i in vace:  # VACE block n runs here, not all up front: one control stream is held, not every hint
                n = vace[i]
                c, hint = self.vace_blocks[n](c, x0, s.e0, s.context, s.cos, s.sin)
                s.x = s.x + hint * context_scale[:, n].reshape(-1, 1, 1, 1)
        return self.unpatchify(self.head(s.x, s.e), s)
