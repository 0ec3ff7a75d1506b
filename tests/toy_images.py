"""The small separable images the Python-API suites share (``fit``, forms, heterogeneous)."""

import torch

N, CLASSES = 48, 3


def images(n: int = N, classes: int = CLASSES) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images ``(n, 1, 8, 8)`` whose mean brightness gives their class, and the labels."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % classes
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.5 + y.view(-1, 1, 1, 1).float() - 1.0
    return x, y
