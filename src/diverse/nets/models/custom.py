"""Your own ``nn.Module`` (``[model] name = "custom"``) and pretrained weights from a
safetensors file (:mod:`diverse.nets.models`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from diverse.errors import UserError


@dataclass(frozen=True)
class CustomConfig:
    """Your own ``nn.Module``: ``[model] name = "custom"``.

    Attributes:
        name: ``"custom"``.
        factory: ``"module:function"``; ``function(input_shape, num_outputs)`` returns a
            freshly initialized module mapping ``(B, *input_shape)`` to
            ``(B, num_outputs)``. It is called once per member under the member's seed.
            Give it a ``feature_layers`` attribute (module names) for the
            feature-space methods.
        search_path: the folder the module is imported from first (default: the config
            file's folder, filled in by :func:`diverse.app.config.load_config`; then the
            Python path). The module runs with your rights, like any script you run.
        weights: a safetensors file of pretrained weights loaded into the module after
            it is built (path relative to the config file); keys it lacks keep the
            module's initialization (a new head), a key the module lacks or a shape
            that differs is refused.
        weights_sha256: the file's SHA-256, filled in when the run starts and recorded
            in its config: a resume or a load refuses a file that changed.
    """

    name: str = "custom"
    factory: str = ""
    search_path: str = ""
    weights: str = ""
    weights_sha256: str = ""

    def __post_init__(self) -> None:
        module, _, function = self.factory.partition(":")
        if not (module and function and all(p.isidentifier() for p in module.split("."))
                and function.isidentifier()):
            raise UserError(f"[model] factory = {self.factory!r}: expected \"module:function\""
                            ", e.g. \"my_models:make_cnn\" (my_models.py next to the config)")


def build_custom(cfg: CustomConfig, input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """Builder for ``"custom"``: import ``cfg.factory`` and call it; the module's output
    shape is checked on a probe batch of two zeros in eval mode."""
    import importlib
    import sys

    module_name, _, function_name = cfg.factory.partition(":")
    added = bool(cfg.search_path) and cfg.search_path not in sys.path
    if added:
        sys.path.insert(0, cfg.search_path)
    try:
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            where = f" (searched {cfg.search_path!r} first)" if cfg.search_path else ""
            raise UserError(f"[model] factory = {cfg.factory!r}: cannot import "
                            f"{module_name!r}{where}: {err}") from err
    finally:
        if added:
            sys.path.remove(cfg.search_path)
    function = getattr(module, function_name, None)
    if not callable(function):
        raise UserError(f"[model] factory = {cfg.factory!r}: {module_name!r} has no function "
                        f"{function_name!r}")
    net = function(tuple(input_shape), num_outputs)
    if not isinstance(net, nn.Module):
        raise UserError(f"[model] factory = {cfg.factory!r} returned {type(net).__name__}, not "
                        "a torch.nn.Module")
    if cfg.weights:
        load_weights(net, cfg.weights, cfg.weights_sha256)
    was_training = net.training
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        out = net.eval()(torch.zeros(2, *input_shape))
    net.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_outputs):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"[model] factory = {cfg.factory!r}: the module maps (2, "
                        f"{', '.join(map(str, input_shape))}) to {shape}; expected (2, "
                        f"{num_outputs}) (one output per class or target)")
    return net


def weights_digest(path: str) -> str:
    """SHA-256 of a weights file; UserError naming it when it cannot be read."""
    import hashlib

    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except OSError as err:
        raise UserError(f"[model] weights = {path!r}: cannot read it ({err.strerror})") from None
    return digest.hexdigest()


def load_weights(net: nn.Module, path: str, sha256: str = "") -> None:
    """Load a safetensors file into ``net`` (no pickle): checked against ``sha256`` when
    given; keys the file lacks keep ``net``'s values, unknown keys or shapes are refused."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if sha256 and weights_digest(path) != sha256:
        raise UserError(f"[model] weights = {path!r}: its SHA-256 is not the recorded "
                        f"{sha256[:12]}…; the file changed since the run started")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as err:
        raise UserError(f"[model] weights = {path!r}: not a safetensors file ({err})") from None
    own = net.state_dict()
    unknown = sorted(set(tensors) - set(own))
    if unknown:
        raise UserError(f"[model] weights = {path!r}: tensor {unknown[0]!r} is not in the "
                        "model")
    for key, value in tensors.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise UserError(f"[model] weights = {path!r}: {key!r} has shape "
                            f"{tuple(value.shape)}, the model's is {tuple(own[key].shape)}")
    net.load_state_dict(tensors, strict=False)


