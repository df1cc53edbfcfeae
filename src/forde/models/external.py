"""Networks from outside forde: `model.name=timm:NAME` and `model.name=PACKAGE.MODULE:CALLABLE`, built as the trust
policy (forde.trust) allows: the module is checked before it is imported, what it names before it is called, and
the result must be an nn.Module.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from torch import nn

from forde.config import ModelConfig
from forde.errors import ConfigError, one_line
from forde.trust import model_source, network_builder


def _fail(name: str, problem: str, fix: str) -> NoReturn:
    raise ConfigError(f"model.name = {name!r}: {problem}; {fix}")


def _import(name: str, module: str):
    """The module, importable from the installed packages or the working directory (as `python -m` sees it)."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:  # e.g. under the `forde` console script
        sys.path.append(cwd)
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is not None and (module + ".").startswith(err.name + "."):  # the module itself, or its package
            _fail(
                name,
                f"no module {err.name!r} in the working directory ({cwd}) or the installed packages",
                f"run from the folder that holds {module.replace('.', '/')}.py, add that folder to PYTHONPATH, "
                "or install its package",
            )
        _fail(name, f"importing {module} failed ({one_line(err)})", f"install {err.name or 'what it imports'}")
    except Exception as err:  # a syntax error, or an error raised by the module's own code
        _fail(name, f"importing {module} failed ({one_line(err)})", f"fix {module}")


def resolve_callable(name: str) -> Callable[..., Any]:
    """The nn.Module subclass or function that `name` (PACKAGE.MODULE:CALLABLE) names, refused unless it is one."""
    _, module, attr = model_source(name)
    assert module is not None and attr is not None, name  # a PACKAGE.MODULE:CALLABLE name has both
    found = getattr(_import(name, module), attr, None)
    if found is None:
        _fail(name, f"{module} has no attribute {attr!r}", f"name a class or function defined in {module}")
    if not network_builder(found):
        _fail(
            name,
            f"{module}.{attr} is a {type(found).__name__} from {getattr(found, '__module__', None) or 'nowhere'}, "
            "not an nn.Module subclass or a Python function defined outside the standard library",
            "name the network class, or a function that returns the network",
        )
    return found


def _timm_create(name: str, timm_name: str) -> Callable[..., Any]:
    try:
        import timm
    except ImportError:
        _fail(name, "needs timm, which is not installed", "pip install 'forde[timm]' (or pip install timm)")
    if not timm.is_model(timm_name):
        import difflib

        close = difflib.get_close_matches(timm_name, timm.list_models(), n=3)
        _fail(
            name,
            f"timm has no model {timm_name!r}" + (f" (close: {', '.join(close)})" if close else ""),
            "list timm's models with python -c \"import timm; print(timm.list_models('*vit*'))\"",
        )
    return lambda **kwargs: timm.create_model(timm_name, **kwargs)


def build_external(cfg: ModelConfig, in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """CALLABLE(num_classes=C, **model.kwargs), or timm.create_model(NAME, num_classes=C, in_chans=channels, ...)."""
    kind, _, timm_name = model_source(cfg.name)
    kwargs = dict(cfg.kwargs, num_classes=num_classes)
    if kind == "timm":
        if len(in_shape) != 3:
            raise ConfigError(
                f"model.name = {cfg.name!r} needs image inputs [C, H, W], the data has shape "
                f"{list(in_shape)}; use model.name=mlp for feature data"
            )
        assert timm_name is not None  # a timm:NAME name has it
        make, kwargs["in_chans"] = _timm_create(cfg.name, timm_name), in_shape[0]
    else:
        make = resolve_callable(cfg.name)
    shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    try:
        model = make(**kwargs)
    except ConfigError:
        raise
    except Exception as err:
        _fail(
            cfg.name,
            f"building it with ({shown}) failed ({one_line(err)})",
            "fix model.kwargs (model.kwargs.KEY=VALUE), or the network's constructor",
        )
    if not isinstance(model, nn.Module):
        _fail(
            cfg.name,
            f"returned a {type(model).__name__}, not a torch.nn.Module",
            "name a function that returns the network",
        )
    return model
