"""`ModelDef`: an NNX model split into its static structure and flat dicts of arrays.

Pure jitted steps take every array as an argument; flat dicts keyed by dotted names
(`layers.0.attn.q.kernel`) are checkpointable, shardable, and what a freeze regex matches.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Callable, Hashable, Mapping

import jax
from flax import nnx


def dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


@dataclasses.dataclass(frozen=True, eq=False)
class ModelDef:
    """The static part of a model: its graph definition and its variables' types/metadata."""

    graphdef: nnx.GraphDef
    variables: tuple[tuple[tuple, nnx.Variable], ...]  # (path, abstract Variable) in state order

    @classmethod
    def split(cls, model: nnx.Module, trainable: str | None = ".*") -> tuple["ModelDef", dict, dict]:
        """Returns (definition, trainable params, everything else) as {dotted name: array}.

        `trainable` is a regex matched (re.search) against dotted names of `nnx.Param`s; other
        params (frozen layers) and non-param variables (the reward normalisation) go to the
        second dict, which the optimizer never sees.
        """
        graphdef, state = nnx.split(model)
        flat = list(nnx.to_flat_state(state))
        pattern = re.compile(trainable) if trainable is not None else None
        train, rest = {}, {}
        for path, var in flat:
            name = dotted(path)
            is_param = isinstance(var, nnx.Param)
            target = train if (is_param and pattern is not None and pattern.search(name)) else rest
            target[name] = var.get_value()
        abstract = tuple((p, v.replace(jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype)))
                         for p, v in flat)
        return cls(graphdef, abstract), train, rest

    def merge(self, *parts: Mapping[str, jax.Array]) -> nnx.Module:
        """Rebuilds the model from dicts whose union names every variable."""
        values: dict[str, jax.Array] = {}
        for part in parts:
            values.update(part)
        missing = [dotted(p) for p, _ in self.variables if dotted(p) not in values]
        if missing:
            raise ValueError(f"cannot rebuild the model: no value for {missing[:5]}")
        state = nnx.from_flat_state([(p, v.replace(values[dotted(p)])) for p, v in self.variables])
        return nnx.merge(self.graphdef, state)

    @property
    def names(self) -> list[str]:
        return [dotted(p) for p, _ in self.variables]


def count(params: Mapping[str, jax.Array]) -> int:
    return int(sum(x.size for x in params.values()))


def _structure_key(model_def: ModelDef) -> tuple:
    # What a compiled program depends on besides its inputs: the graph (it holds the
    # ModelConfig) and each variable's type, shape, dtype and metadata (logical axes).
    return model_def.graphdef, tuple(
        (path, type(var).__name__, tuple(var.get_value().shape), str(var.get_value().dtype),
         repr(sorted(var.get_metadata().items()))) for path, var in model_def.variables)


_PROGRAMS: collections.OrderedDict[tuple, Callable] = collections.OrderedDict()
_MAX_PROGRAMS = 8


def cached_program(name: str, model_def: ModelDef, mesh, settings: Hashable,
                   build: Callable[[], Callable]) -> Callable:
    """`build()` (a jitted function of params and inputs), memoised by model structure.

    Every checkpoint load gives a new `ModelDef`; a jit keyed on it would compile again,
    though the program depends only on the architecture. The 8 most recent are kept.
    """
    key = (name, _structure_key(model_def), mesh, settings)
    if key in _PROGRAMS:
        _PROGRAMS.move_to_end(key)
        return _PROGRAMS[key]
    fn = _PROGRAMS[key] = build()
    while len(_PROGRAMS) > _MAX_PROGRAMS:
        _PROGRAMS.popitem(last=False)
    return fn
