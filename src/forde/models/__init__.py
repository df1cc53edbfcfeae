"""Model zoo: one builder from a ModelConfig and the data's shape, and the check that runs before any data is read."""

from __future__ import annotations

import torch
from torch import nn

from forde.config import ConfigError, ModelConfig, model_source
from forde.errors import one_line
from forde.models.external import build_external
from forde.models.mlp import MLP
from forde.models.preact import PreActResNet18
from forde.models.resnet import ResNet18
from forde.models.wrn import WideResNet


def build_model(cfg: ModelConfig, in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    builtin = model_source(cfg.name)[0] == "builtin"
    model = _architecture(cfg, in_shape, num_classes) if builtin else build_external(cfg, in_shape, num_classes)
    if cfg.zero_init_classifier:
        zero_classifier(model)
    return model


def check_model(cfg: ModelConfig, in_shape: tuple[int, ...], num_classes: int, data_name: str) -> int:
    """One member builds and maps a batch of zeros of the data's shape, [2, *in_shape], to logits [2, C]; otherwise
    a ConfigError naming the problem. Random draws here leave the global generator as they found it. Returns the
    member's number of parameters."""
    batch = [2, *in_shape]
    with torch.random.fork_rng(devices=[]):
        model = build_model(cfg, in_shape, num_classes).eval()
        try:
            with torch.no_grad():
                out = model(torch.zeros(batch))
        except Exception as err:
            raise ConfigError(
                f"model.name = {cfg.name!r} fails on a batch {batch} of {data_name} inputs "
                f"({one_line(err)}); make the network accept inputs of that shape "
                "(e.g. model.kwargs.img_size for a ViT)"
            ) from None
    shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if shape != [2, num_classes]:
        raise ConfigError(
            f"model.name = {cfg.name!r} maps a batch {batch} of {data_name} inputs to {shape}, not to "
            f"logits [2, {num_classes}] ({num_classes} classes); make its forward return one row of "
            "class scores per input"
        )
    return sum(p.numel() for p in model.parameters())


def zero_classifier(model: nn.Module) -> None:
    """Zero the weights and bias of the last linear layer (the classifier of every built-in model), as the
    release's networks start: all logits are 0 at initialisation, so members differ in their features only."""
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linear:
        raise ConfigError(
            "model.zero_init_classifier = true zeros the network's last nn.Linear layer, but it has "
            "none; set model.zero_init_classifier=false"
        )
    nn.init.zeros_(linear[-1].weight)
    if linear[-1].bias is not None:
        nn.init.zeros_(linear[-1].bias)


def _architecture(cfg: ModelConfig, in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if cfg.name == "mlp":
        return MLP(in_shape, num_classes, list(cfg.hidden))
    if len(in_shape) != 3:
        raise ConfigError(
            f"model.name = {cfg.name!r} needs image inputs [C, H, W], the data has shape {list(in_shape)}; "
            "use model.name=mlp for feature data"
        )
    channels = in_shape[0]
    if cfg.name == "resnet18":
        return ResNet18(num_classes, channels, cfg.width, tuple(cfg.blocks))
    if cfg.name == "preact_resnet18":
        return PreActResNet18(num_classes, channels, cfg.width, tuple(cfg.blocks))
    return WideResNet(num_classes, channels, depth=16, widen=4, base=max(1, cfg.width // 4))
