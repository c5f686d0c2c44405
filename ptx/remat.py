"""What the backward pass of a transformer layer keeps and what it recomputes (`ModelConfig.remat`).

- none: autodiff keeps every intermediate of every layer.
- full: each layer is recomputed in the backward pass; only its input, the
  residual stream [batch, seq, d_model] per layer, is kept.
- dots: as full, but the outputs of the matmuls without batch dimensions (the
  projections and the MLP) are kept too: less recompute, more memory.
- offload: as full, with the per-layer residual stream moved to pinned host
  memory in the forward pass and back for the backward (GPU, TPU); where the
  host is the device (CPU) it equals full.

A layer marks its input with `checkpoint_name(x, RESIDUAL)`; only offload reads the name.
With any policy but none the model scans its layers, whatever `layer_loop_max`: in a
Python loop XLA schedules every layer's recomputation early, and all of them stay alive
(at 4 layers the loop's remat kept as much as none).
"""
import flax.linen as nn
import jax

POLICIES = ("none", "full", "dots", "offload")
RESIDUAL = "residual"  # the checkpoint name of a layer's input


def policy(name: str):
    """The jax.checkpoint policy of `name` (None: save nothing); ValueError for an unknown one."""
    if name not in POLICIES[1:]:
        raise ValueError(f"remat policy {name!r}; expected one of {POLICIES[1:]}")
    if name == "dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    if name == "offload":
        return jax.checkpoint_policies.save_and_offload_only_these_names(
            names_which_can_be_saved=(), names_which_can_be_offloaded=(RESIDUAL,),
            offload_src="device", offload_dst="pinned_host")
    return None


def wrap(module_cls, name: str):
    """`module_cls` rematerialised by the policy `name` (none: the class itself)."""
    if name == "none":
        return module_cls
    return nn.remat(module_cls, policy=policy(name), prevent_cse=False)
