"""Standard image augmentation in torch: random crop with padding and horizontal flip.

The augmentation of the CIFAR setups of FoRDE and HE-CKA (torchvision's
``RandomCrop(H, padding=p)`` then ``RandomHorizontalFlip()``), vectorized over
the batch and drawn from an explicit generator, so a run that reseeds the
generator per epoch (:func:`diverse.app.train.train`) augments identically after a
resume. Inputs are already normalized per channel (``(x − mean_c) / std_c``);
the padding is the normalized value of a black pixel, ``−mean_c / std_c``, as
padding the raw image with 0 before normalizing would give.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["crop_and_flip"]


def crop_and_flip(x: Tensor, padding: int, generator: torch.Generator,
                  fill: Sequence[float] | None = None, flip: bool = True) -> Tensor:
    """Random ``H × W`` crops of ``x`` padded by ``padding``, each flipped left–right
    with probability ½.

    Args:
        x: images ``(B, C, H, W)``.
        padding: pixels added on every side before cropping (0: no crop).
        generator: the source of the offsets and flips (on ``x``'s device).
        fill: per-channel padding value (default 0).
        flip: also flip horizontally.

    Returns:
        ``(B, C, H, W)``, a new tensor.
    """
    if x.dim() != 4:
        raise ValueError(f"crop_and_flip needs images (B, C, H, W), got {tuple(x.shape)}")
    b, c, h, w = x.shape
    out = x
    if padding > 0:
        values = torch.zeros(c, dtype=x.dtype, device=x.device) if fill is None else \
            torch.tensor(list(fill), dtype=x.dtype, device=x.device)
        padded = values.view(1, c, 1, 1).expand(b, c, h + 2 * padding, w + 2 * padding).clone()
        padded[:, :, padding:padding + h, padding:padding + w] = x
        oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=x.device)
        ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=x.device)
        rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (B,1,H,1)
        cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (B,1,1,W)
        batch = torch.arange(b, device=x.device)[:, None, None, None]
        channel = torch.arange(c, device=x.device)[None, :, None, None]
        out = padded[batch, channel, rows, cols]
    if flip:
        flips = torch.rand(b, generator=generator, device=x.device) < 0.5
        out = torch.where(flips[:, None, None, None], out.flip(-1), out)
    return out
