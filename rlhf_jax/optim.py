"""Optimizers from config: AdamW, warmup then linear or cosine decay, gradient clipping."""

from __future__ import annotations

import optax


def learning_rate_schedule(lr: float, total_steps: int, warmup_steps: int = 0, decay: str = "linear",
                           final_lr_fraction: float = 0.0) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then `decay` ('linear', 'cosine' or 'constant') to
    `final_lr_fraction * lr` at `total_steps`."""
    if decay not in ("linear", "cosine", "constant"):
        raise ValueError(f"optimizer.decay={decay!r} is not one of 'linear', 'cosine', 'constant'")
    if warmup_steps < 0 or warmup_steps > total_steps:
        raise ValueError(f"optimizer.warmup_steps={warmup_steps} must be in [0, total_steps={total_steps}]")
    end = lr * final_lr_fraction
    decay_steps = max(total_steps - warmup_steps, 1)
    if decay == "linear":
        after = optax.linear_schedule(lr, end, decay_steps)
    elif decay == "cosine":
        after = optax.cosine_decay_schedule(lr, decay_steps, alpha=final_lr_fraction)
    else:
        after = optax.constant_schedule(lr)
    if warmup_steps == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), after], [warmup_steps])


def _check(cfg) -> None:
    """Every field in range, or a ValueError naming it (a negative lr trains to garbage)."""
    checks = [("lr", cfg.lr >= 0, ">= 0"), ("b1", 0 <= cfg.b1 < 1, "in [0, 1)"), ("b2", 0 <= cfg.b2 < 1, "in [0, 1)"),
              ("eps", cfg.eps > 0, "> 0"), ("weight_decay", cfg.weight_decay >= 0, ">= 0"),
              ("max_grad_norm", (cfg.max_grad_norm or 0) >= 0, ">= 0 (0 = no clipping)"),
              ("final_lr_fraction", 0 <= cfg.get("final_lr_fraction", 0.0) <= 1, "in [0, 1]")]
    for field, ok, want in checks:
        if not ok:
            raise ValueError(f"optimizer.{field}={cfg[field]!r} must be {want}")


def make_optimizer(cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (+ global-norm clipping) from a config with fields lr, warmup_steps, decay,
    final_lr_fraction, b1, b2, eps, weight_decay, max_grad_norm (0 disables clipping)."""
    _check(cfg)
    schedule = learning_rate_schedule(cfg.lr, total_steps, cfg.warmup_steps, cfg.decay,
                                      cfg.get("final_lr_fraction", 0.0))
    parts = []
    if cfg.max_grad_norm and cfg.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay))
    return optax.chain(*parts), schedule
