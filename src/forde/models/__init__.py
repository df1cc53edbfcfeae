"""Model zoo: one builder from a ModelConfig and the data's shape."""

from __future__ import annotations

from torch import nn

from forde.config import ConfigError, ModelConfig
from forde.models.mlp import MLP
from forde.models.preact import PreActResNet18
from forde.models.resnet import ResNet18
from forde.models.wrn import WideResNet


def build_model(cfg: ModelConfig, in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    model = _architecture(cfg, in_shape, num_classes)
    if cfg.zero_init_classifier:
        zero_classifier(model)
    return model


def zero_classifier(model: nn.Module) -> None:
    """Zero the weights and bias of the last linear layer (the classifier of every model here), as the
    release's networks start: all logits are 0 at initialisation, so members differ in their features only."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    nn.init.zeros_(last.weight)
    if last.bias is not None:
        nn.init.zeros_(last.bias)


def _architecture(cfg: ModelConfig, in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if cfg.name == "mlp":
        return MLP(in_shape, num_classes, list(cfg.hidden))
    if len(in_shape) != 3:
        raise ConfigError(f"model.name = {cfg.name!r} needs image inputs [C, H, W], the data has shape {list(in_shape)}; "
                          "use model.name=mlp for feature data")
    channels = in_shape[0]
    if cfg.name == "resnet18":
        return ResNet18(num_classes, channels, cfg.width, tuple(cfg.blocks))
    if cfg.name == "preact_resnet18":
        return PreActResNet18(num_classes, channels, cfg.width, tuple(cfg.blocks))
    if cfg.name == "wrn16_4":
        return WideResNet(num_classes, channels, depth=16, widen=4, base=max(1, cfg.width // 4))
    raise ConfigError(f"model.name = {cfg.name!r}: unknown model")
