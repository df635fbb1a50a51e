"""Positional encodings for 2-D feature maps.

Attention is permutation invariant: without extra information the transformer
cannot tell where a feature came from. DETR adds a positional encoding to the
queries and keys of every attention layer. Two variants, as in the official
code:

* ``PositionEmbeddingSine`` -- the sinusoids of "Attention is all you need",
  applied separately to the row and the column coordinate. Coordinates are
  counted over the *non-padding* pixels only, so an image's encoding does not
  depend on how much padding its batch added.
* ``PositionEmbeddingLearned`` -- one learned vector per row and per column
  (at most 50 of each).

Both return ``(B, C, H, W)`` with the ``y`` half of the channels first, then
the ``x`` half.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["PositionEmbeddingSine", "PositionEmbeddingLearned", "check_padding_mask", "sine_encode"]


def check_padding_mask(mask: Tensor, name: str = "mask") -> None:
    """Raise unless ``mask`` is a (B, H, W) bool tensor (True = padding)."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = padding), got dtype {mask.dtype}")
    if mask.dim() != 3:
        raise ValueError(f"{name} must have shape (B, H, W), got {tuple(mask.shape)}")


def sine_encode(coord: Tensor, num_pos_feats: int, temperature: float) -> Tensor:
    """Sinusoids of one coordinate: (...) -> (..., num_pos_feats).

    Channel ``i`` has wavelength ``dim_t[i] = temperature ** (2 * (i // 2) / num_pos_feats)``;
    even channels hold ``sin(coord / dim_t)``, odd ones ``cos`` of the same wavelength.
    """
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=coord.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)  # (F,)
    pos = coord[..., None] / dim_t  # (..., F)
    # interleave: channel 2j = sin, channel 2j+1 = cos (same wavelength)
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)


class PositionEmbeddingSine(nn.Module):
    """Sine/cosine encoding of each pixel's (row, column) among the valid pixels.

    For a coordinate ``p`` (1-based index counted over non-padding pixels,
    optionally shifted by ``offset`` and normalised to ``(0, scale]``) and
    channel ``i < num_pos_feats``::

        dim_t[i] = temperature ** (2 * (i // 2) / num_pos_feats)
        enc[i]   = sin(p / dim_t[i]) if i is even else cos(p / dim_t[i])

    Args:
        num_pos_feats: channels per coordinate; the output has twice as many.
            DETR uses ``hidden_dim // 2``.
        temperature: base of the geometric progression of wavelengths.
        normalize: divide each coordinate by the number of valid pixels in its
            row/column (plus 1e-6) and multiply by ``scale``, so encodings are
            comparable across image sizes. DETR builds it with ``normalize=True``.
        scale: range of normalised coordinates; 2*pi when omitted. Only
            meaningful with ``normalize=True``.
        offset: added to the 1-based coordinates before normalising; Deformable
            DETR uses -0.5 (pixel centres). Only meaningful with ``normalize=True``.
    """

    def __init__(self, num_pos_feats: int = 64, temperature: float = 10000,
                 normalize: bool = False, scale: Optional[float] = None,
                 offset: float = 0.0) -> None:
        super().__init__()
        if not isinstance(num_pos_feats, int) or num_pos_feats < 2 or num_pos_feats % 2:
            raise ValueError(f"num_pos_feats must be an even int >= 2, got {num_pos_feats!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature!r}")
        if scale is not None and not normalize:
            raise ValueError("scale is only used with normalize=True; pass normalize=True or drop scale")
        if offset != 0.0 and not normalize:
            raise ValueError("offset is only used with normalize=True; pass normalize=True or drop offset")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale
        self.offset = offset

    def forward(self, mask: Tensor) -> Tensor:
        """Padding mask (B, H, W) bool, True = padding -> encoding (B, 2*num_pos_feats, H, W)."""
        check_padding_mask(mask)
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)  # (B, H, W): 1, 2, ... down each column
        x_embed = not_mask.cumsum(2, dtype=torch.float32)  # (B, H, W): 1, 2, ... along each row
        if self.normalize:
            eps = 1e-6
            # the last entry of the cumsum is the number of valid pixels of that column/row
            y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + eps) * self.scale

        pos_x = sine_encode(x_embed, self.num_pos_feats, self.temperature)  # (B, H, W, F)
        pos_y = sine_encode(y_embed, self.num_pos_feats, self.temperature)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)  # (B, 2F, H, W)


class PositionEmbeddingLearned(nn.Module):
    """Learned absolute encoding: a row vector and a column vector per pixel.

    ``row_embed`` and ``col_embed`` hold ``max_size`` (50, as official) vectors
    of ``num_pos_feats`` channels; pixel (i, j) gets ``[col_embed[j], row_embed[i]]``
    (x half first, as in the official code). It ignores padding: a pixel's
    encoding depends only on its index in the padded batch.
    """

    max_size = 50

    def __init__(self, num_pos_feats: int = 256) -> None:
        super().__init__()
        if not isinstance(num_pos_feats, int) or num_pos_feats < 1:
            raise ValueError(f"num_pos_feats must be a positive int, got {num_pos_feats!r}")
        self.row_embed = nn.Embedding(self.max_size, num_pos_feats)
        self.col_embed = nn.Embedding(self.max_size, num_pos_feats)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, mask: Tensor) -> Tensor:
        """Padding mask (B, H, W) bool -> encoding (B, 2*num_pos_feats, H, W)."""
        check_padding_mask(mask)
        b, h, w = mask.shape
        if h > self.max_size or w > self.max_size:
            raise ValueError(f"PositionEmbeddingLearned supports feature maps up to "
                             f"{self.max_size}x{self.max_size}, got {h}x{w}")
        x_emb = self.col_embed(torch.arange(w, device=mask.device))  # (W, F)
        y_emb = self.row_embed(torch.arange(h, device=mask.device))  # (H, F)
        pos = torch.cat([x_emb[None].expand(h, w, -1), y_emb[:, None].expand(h, w, -1)], dim=-1)  # (H, W, 2F)
        return pos.permute(2, 0, 1)[None].repeat(b, 1, 1, 1)  # (B, 2F, H, W)
