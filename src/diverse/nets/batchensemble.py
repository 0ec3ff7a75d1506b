"""BatchEnsemble layers: rank-1 fast weights per member over shared slow weights.

Wen, Tran & Ba, "BatchEnsemble: an alternative approach to efficient ensemble and
lifelong learning", ICLR 2020. Member m's weight is ``W_m = W ∘ (s_m r_mᵀ)`` for a
shared slow weight ``W (O, I)`` and fast weights ``r_m (I,)``, ``s_m (O,)``, which is
computed without forming ``W_m``:

    y = ((x ∘ r_m) Wᵀ) ∘ s_m + b_m                      (Linear)
    y = conv(x ∘ r_m[:, None, None], W) ∘ s_m[:, None, None] + b_m   (Conv2d)

Here one layer holds one member's fast weights (``r``, ``s``, ``bias``, each of the
member's shape); the ensemble stacks them ``(M, ...)`` and passes ``weight`` unbatched,
so under ``vmap`` the members run as one batched product — the paper's trick of
folding members into the batch, done by ``torch.func``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from diverse.errors import UserError

#: the per-member parameters of a BatchEnsemble layer
FAST = ("r", "s", "bias")


class BatchEnsembleLayer(nn.Module):
    """A Linear or Conv2d in BatchEnsemble form (one member's fast weights).

    Args:
        base: the layer converted; its weight becomes the shared slow weight (the
            same Parameter object, so a user's ``requires_grad=False`` is kept) and its
            bias the member's initial bias (zeros if it has none).
    """

    def __init__(self, base: nn.Linear | nn.Conv2d) -> None:
        super().__init__()
        self.base = base
        self.weight = base.weight
        out_features, in_features = base.weight.shape[:2]
        like = base.weight.detach()
        self.r = nn.Parameter(like.new_ones(in_features))
        self.s = nn.Parameter(like.new_ones(out_features))
        bias = base.bias.detach().clone() if base.bias is not None else like.new_zeros(
            out_features)
        self.bias = nn.Parameter(bias)
        del base._parameters["weight"]
        del base._parameters["bias"]
        self.__dict__["base"] = base  # kept for its settings (stride, ...), not a child

    def forward(self, x: Tensor) -> Tensor:
        base = self.base
        if isinstance(base, nn.Linear):
            return F.linear(x * self.r, self.weight) * self.s + self.bias
        shape = (-1, 1, 1)
        y = F.conv2d(x * self.r.view(shape), self.weight, None, base.stride, base.padding,
                     base.dilation, base.groups)
        return y * self.s.view(shape) + self.bias.view(shape)

    def extra_repr(self) -> str:
        return f"{type(self.base).__name__}, weight {tuple(self.weight.shape)}"


def convert(module: nn.Module, names: Sequence[str] = ()) -> nn.Module:
    """``module`` with its Linear/Conv2d layers (those named, or all) in BatchEnsemble form.

    Converted in place; a named module that is not a Linear or Conv2d (or a Conv2d with
    ``padding_mode`` other than zeros, or groups) is refused with one line.
    """
    named = dict(module.named_modules())
    if names:
        unknown = [n for n in names if n not in named]
        if unknown:
            raise UserError(f"[ensemble] target_modules: {unknown[0]!r} is not a module of the "
                            "model")
        chosen = list(names)
    else:
        chosen = [n for n, m in named.items() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not chosen:
        raise UserError("[ensemble] members_as = 'batchensemble': the model has no Linear or "
                        "Conv2d layer to convert")
    for name in chosen:
        layer = named[name]
        ok = isinstance(layer, nn.Linear) or (isinstance(layer, nn.Conv2d)
                                              and layer.padding_mode == "zeros"
                                              and layer.groups == 1)
        if not ok:
            raise UserError(f"[ensemble] target_modules: {name!r} is a {type(layer).__name__}; "
                            "BatchEnsemble converts Linear and Conv2d (zeros padding, groups 1)")
        parent, _, leaf = name.rpartition(".")
        owner = module.get_submodule(parent) if parent else module
        if not name:
            raise UserError("[ensemble] batchensemble: the model itself is one layer; wrap it")
        setattr(owner, leaf, BatchEnsembleLayer(layer))
    return module


def effective_weight(layer: BatchEnsembleLayer) -> Tensor:
    """The member's full weight ``W ∘ (s rᵀ)`` (a test oracle; training never forms it)."""
    extra = (1,) * (layer.weight.dim() - 2)
    return layer.weight * layer.s.view(-1, 1, *extra) * layer.r.view(1, -1, *extra)

