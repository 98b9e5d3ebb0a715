"""Reward functions: plain Python callables on decoded text, as an alternative or an addition
to reward models.

A reward function is `fn(prompts: list[str], responses: list[str]) -> sequence of floats`
(batched, so a function can call a model or a service once per rollout). Configs name them
as `module.path:function` strings; `load_reward_function` imports them.
"""

from __future__ import annotations

import importlib
from typing import Callable, Sequence

import numpy as np

RewardFn = Callable[[Sequence[str], Sequence[str]], Sequence[float]]


def load_reward_function(spec: str | RewardFn) -> RewardFn:
    """A callable from 'package.module:function' (or the callable itself)."""
    if callable(spec):
        return spec
    module_name, sep, attr = str(spec).partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward function {spec!r} must look like 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward function {spec!r} cannot be imported: {e}") from None
    if not callable(fn):
        raise ValueError(f"reward function {spec!r} is not callable")
    return fn


def evaluate(fns: Sequence[RewardFn], weights: Sequence[float], prompts: Sequence[str],
             responses: Sequence[str]) -> np.ndarray:
    """Weighted sum of the functions' scores [B] (float32)."""
    total = np.zeros(len(responses), np.float32)
    for fn, w in zip(fns, weights):
        scores = np.asarray(fn(list(prompts), list(responses)), np.float32)
        if scores.shape != (len(responses),):
            raise ValueError(f"reward function {getattr(fn, '__name__', fn)!r} returned shape {scores.shape}, "
                             f"expected ({len(responses)},)")
        total += w * scores
    return total


def count_substring(substring: str) -> RewardFn:
    """Reward = how many times `substring` occurs in the response (a simple test reward)."""
    def fn(prompts, responses):
        return [float(r.count(substring)) for r in responses]
    fn.__name__ = f"count_substring({substring!r})"
    return fn
