"""Splitting an NNX model into plain dicts of arrays for pure, jitted train steps.

A train step must take everything as arguments (no closed-over arrays), and its state must be
checkpointable and shardable. Flat dicts keyed by dotted parameter names
(`layers.0.attn.q.kernel`) are all of that, and the same names are what a user's freeze
regex matches. `ModelDef` keeps the static rest (graph, variable types and metadata) so the
model can be rebuilt inside the step.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping

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
