"""Where a run computes and how fast: the device, and the precision, memory format, ensemble execution and CUDA
switches it runs with.

`auto` values take the device's entry in `config.DEVICE_DEFAULTS`; explicit values win. The CUDA switches are
process-wide PyTorch flags, set by `DeviceSettings.apply` when a run is built.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from forde.config import DEVICE_DEFAULTS, ConfigError, TrainConfig


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device = {name!r} but CUDA is not available here; set device=auto or device=cpu")
    return torch.device(name)


@dataclass(frozen=True)
class DeviceSettings:
    device: torch.device
    precision: str  # fp32 | bf16
    channels_last: bool
    execution: str  # loop | vmap
    tf32: bool = False  # CUDA only, as are the two below
    cudnn_benchmark: bool = False
    graphs: bool = False

    def apply(self) -> None:
        """Set PyTorch's process-wide CUDA switches for this run. Matrix products stay IEEE float32 (the kernels
        rely on it; see kernels.kernel_dtype); TF32 applies to convolutions only."""
        if self.device.type == "cuda":
            torch.backends.cudnn.allow_tf32 = self.tf32
            torch.backends.cudnn.benchmark = self.cudnn_benchmark

    def autocast(self, cache_enabled: bool = True) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=cache_enabled)
        return contextlib.nullcontext()

    def describe(self) -> str:
        parts = [
            str(self.device),
            self.precision,
            "channels_last" if self.channels_last else "contiguous",
            self.execution,
        ]
        if self.device.type == "cuda":
            parts += [
                f"tf32 convolutions {'on' if self.tf32 else 'off'}",
                f"cudnn.benchmark {'on' if self.cudnn_benchmark else 'off'}",
                f"CUDA graphs {'on' if self.graphs else 'off'}",
            ]
        return ", ".join(parts)


def resolve_settings(cfg: TrainConfig) -> DeviceSettings:
    """The settings `cfg` asks for on its device, `auto` values filled in from config.DEVICE_DEFAULTS."""
    device = resolve_device(cfg.device)
    defaults = DEVICE_DEFAULTS.get(device.type, DEVICE_DEFAULTS["cpu"])

    def pick(value, key):
        return defaults[key] if value in ("auto", None) else value

    precision = pick(cfg.precision, "precision")
    if precision == "bf16" and device.type != "cuda":
        raise ConfigError(
            f"precision = bf16 but the device is {device}; bf16 autocast is for CUDA devices, "
            "set precision=fp32 (or auto)"
        )
    if cfg.cuda.graphs and device.type != "cuda":
        raise ConfigError(f"cuda.graphs = true but the device is {device}; set cuda.graphs=false or run on a GPU")
    cuda = device.type == "cuda"
    return DeviceSettings(
        device,
        precision,
        pick(cfg.channels_last, "channels_last"),
        pick(cfg.model.execution, "execution"),
        tf32=cuda and cfg.cuda.tf32,
        cudnn_benchmark=cuda and cfg.cuda.cudnn_benchmark,
        graphs=cuda and cfg.cuda.graphs,
    )
