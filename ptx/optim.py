"""The optax chain a config asks for: clip -> AdamW with warm-up and decay."""
import jax
import optax


def schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    """Linear warm-up to `lr`, then cosine / linear decay to `lr * end_lr_ratio`, or constant."""
    lr, warmup = optim_cfg.lr, int(optim_cfg.warmup_steps)
    end = lr * optim_cfg.end_lr_ratio
    decay_steps = max(total_steps - warmup, 1)
    if optim_cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(lr, decay_steps, alpha=optim_cfg.end_lr_ratio)
    elif optim_cfg.schedule == "linear":
        after = optax.linear_schedule(lr, end, decay_steps)
    elif optim_cfg.schedule == "constant":
        after = optax.constant_schedule(lr)
    else:
        raise ValueError(f"optim.schedule={optim_cfg.schedule!r}; expected cosine, linear or constant")
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def _decay_mask(params):
    # Norm scales, biases and the scalar head's bias are not decayed.
    return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)


def make_optimizer(optim_cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    lr = schedule(optim_cfg, total_steps)
    parts = []
    if optim_cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(optim_cfg.grad_clip))
    parts.append(optax.adamw(lr, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                             weight_decay=optim_cfg.weight_decay, mask=_decay_mask))
    return optax.chain(*parts), lr
