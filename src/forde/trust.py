"""The trust policy: every rule about code that a file (a config, a study file, a run directory's config.yaml)
can make forde run. A network named `PACKAGE.MODULE:CALLABLE` runs that module and callable, and a timm model given
keyword arguments can read files: a file that chooses either runs only with the user's consent (`--trust-code`);
the command line is that consent. Whatever is named must lie outside Python's standard library, and be a network
class or a plain function (`network_builder`), so that no file can call `os:system` or `shutil:rmtree` with
arguments of its choosing.
"""

from __future__ import annotations

import re
import sys
import types
from typing import Any

from omegaconf import OmegaConf

from forde.config.schema import BUILTIN_MODELS, MODEL_FORMS, ModelConfig
from forde.errors import ConfigError

_CALLABLE_NAME = re.compile(r"([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):([A-Za-z_]\w*)")


def _check(ok: bool, key: str, value: Any, rule: str, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {value!r}: {rule}; {fix}")


def is_stdlib(module: str | None) -> bool:
    return not module or module.split(".")[0] in sys.stdlib_module_names


def model_source(name: str) -> tuple[str, str | None, str | None]:
    """("builtin", None, None), ("timm", None, NAME) or ("callable", MODULE, CALLABLE) for a model.name, read from
    the text alone; ConfigError for any other form, and for modules of Python's standard library, which hold no
    networks but functions that must never be called by a config (os:system, subprocess:run, shutil:rmtree)."""
    if name in BUILTIN_MODELS:
        return "builtin", None, None
    if name.startswith("timm:"):
        _check(len(name) > len("timm:"), "model.name", name, "names no timm model", "set e.g. model.name=timm:resnet18")
        return "timm", None, name[len("timm:") :]
    found = _CALLABLE_NAME.fullmatch(name)
    _check(
        found is not None,
        "model.name",
        name,
        f"is none of {MODEL_FORMS}",
        "set e.g. model.name=resnet18, model.name=timm:resnet18 or model.name=my_models:ViT",
    )
    assert found is not None  # _check raised otherwise
    module, attr = found.groups()
    _check(
        not is_stdlib(module),
        "model.name",
        name,
        f"{module} is part of Python's standard library, which holds no networks",
        "name a network class or a "
        "function that builds one, from your own module or an installed package (e.g. model.name=my_models:ViT)",
    )
    return "callable", module, attr


TRUST_FIX = "pass --trust-code if you trust this file"


def runs_code(model: ModelConfig) -> bool:
    """Whether building `model` runs code its config chooses: a PACKAGE.MODULE:CALLABLE, or a timm model given
    keyword arguments (checkpoint_path, pretrained_cfg_overlay and the like make timm read files). The built-in
    networks and timm's registered architectures without arguments run none."""
    kind = model_source(model.name)[0]
    return kind == "callable" or (kind == "timm" and bool(model.kwargs))


def code_from_file(model: ModelConfig, overrides: list[str]) -> str | None:
    """The field (model.name or model.kwargs) through which a file, not the command line, chooses code that
    building `model` runs; None when the command line gave it (the user's own consent) or no code runs. A timm
    name only picks a registered architecture: what matters there is who gave the arguments."""
    if not runs_code(model):
        return None
    given = OmegaConf.to_container(OmegaConf.from_dotlist([o for o in overrides if o.startswith("model")]))
    typed = given.get("model") if isinstance(given, dict) else None
    typed = typed if isinstance(typed, dict) else {}
    if typed.get("name") != model.name and model_source(model.name)[0] == "callable":
        return "model.name"
    return None if (typed.get("kwargs") or {}) == model.kwargs else "model.kwargs"


def refuse_code_from_file(where: str, model: ModelConfig, overrides: list[str]) -> None:
    """One line, before anything is imported or built: the file `where` names code to run (see code_from_file)."""
    key = code_from_file(model, overrides)
    if key == "model.name":
        raise ConfigError(f"{where}: model.name {model.name!r} names code to run; {TRUST_FIX}")
    if key == "model.kwargs":
        raise ConfigError(
            f"{where}: model.kwargs {model.kwargs} are arguments of the code {model.name!r} runs; {TRUST_FIX}"
        )


def network_builder(found: Any) -> bool:
    """Whether what a PACKAGE.MODULE:CALLABLE name reached may be called: an nn.Module subclass or a plain Python
    function (not a builtin, a functools.partial or a class of another kind), defined outside the standard library
    (so an imported `rmtree` is refused too)."""
    from torch import nn

    is_network_class = isinstance(found, type) and issubclass(found, nn.Module)
    return (is_network_class or type(found) is types.FunctionType) and not is_stdlib(getattr(found, "__module__", None))
