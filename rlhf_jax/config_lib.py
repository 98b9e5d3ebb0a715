"""What config files share: `parse_arg` for the string after the colon in
`--config FILE.py:ARG`, and `load_config` so that one config file composes another by path.

Every config file under `configs/` and `experiments/` defines `get_config(arg=None)` and
passes `arg` to `parse_arg(arg, name=default, ...)` first (no options: `parse_arg(arg)`).
"""

from __future__ import annotations

import importlib.util
import os
import types

import ml_collections

_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


def _convert(key: str, value: str, default):
    """`value` as the type of `default` (bool, int, float or str); ValueError names both."""
    try:
        if isinstance(default, bool):  # before int: bool is a subclass of int
            if value.lower() not in _TRUE + _FALSE:
                raise ValueError(f"expected one of {_TRUE + _FALSE}")
            return value.lower() in _TRUE
        return type(default)(value)
    except ValueError as e:
        raise ValueError(f"config argument {key}={value!r}: not a {type(default).__name__} ({e})") from None


def parse_arg(arg: str | None, **spec) -> ml_collections.ConfigDict:
    """Parses the config argument `"key=value,key=value"` into a ConfigDict of every key in `spec`.

    `spec` gives each option's default, whose type (bool, int, float or str) is the type the
    value is converted to. The first item may be a bare value, which sets the first option:
    with `parse_arg(arg, variant="tiny", steps=0)`, `"smollm2"` and `"smollm2,steps=10"` set
    `variant`. None or "" gives the defaults. An unknown key, a repeated key or a value that does
    not convert raises ValueError naming it.
    """
    for key, default in spec.items():
        if not isinstance(default, (bool, int, float, str)):
            raise TypeError(f"parse_arg: the default of {key!r} must be a bool, int, float or str, "
                            f"not {type(default).__name__}")
    if arg is not None and not isinstance(arg, str):
        raise TypeError(f"config argument must be a string, not {type(arg).__name__}: {arg!r}")
    values = dict(spec)
    given = set()
    for i, item in enumerate(x.strip() for x in (arg or "").split(",")):
        if not item:
            continue
        if "=" in item:
            key, value = (s.strip() for s in item.split("=", 1))
        elif i == 0 and spec:
            key, value = next(iter(spec)), item
        else:
            raise ValueError(f"config argument {item!r} in {arg!r} is not key=value "
                             f"(options: {', '.join(spec) or 'none'})")
        if key not in spec:
            raise ValueError(f"unknown config argument {key!r} in {arg!r} (options: {', '.join(spec) or 'none'})")
        if key in given:
            raise ValueError(f"config argument {key!r} is given twice in {arg!r}")
        given.add(key)
        values[key] = _convert(key, value, spec[key])
    return ml_collections.ConfigDict(values)


def import_config_module(path: str | os.PathLike[str]) -> types.ModuleType:
    """Executes a config file as a fresh module (not added to `sys.modules`).

    A relative `path` is relative to the current directory; a config file that loads another
    builds the path from its own `__file__` (`Path(__file__).resolve().parent / "common.py"`),
    which both this loader and ml_collections' `--config` loader set.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} does not exist")
    name = "rlhf_jax_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
        raise AttributeError(f"config file {path} defines no get_config(arg=None)")
    return module


def load_config(path: str | os.PathLike[str], arg: str | None = None) -> ml_collections.ConfigDict:
    """`get_config(arg)` of the config file at `path`: what `--config PATH[:ARG]` gives the CLI
    (unlocked, so that a composing config can change its fields)."""
    return import_config_module(path).get_config(arg)
