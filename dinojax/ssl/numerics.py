"""Float helpers shared by the SSL losses: promotion and IEEE division."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def to_float(x: Array) -> Array:
    """float32 for bf16/f16/f32 inputs, float64 for float64 (the parity tests' reference mode)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def true_divide(x: Array, y) -> Array:
    """x / y, correctly rounded like torch's division.

    XLA's algebraic simplifier rewrites `x / broadcast(y)` into `x * broadcast(1 / y)`, which is up
    to 1 ulp off; before an exp at teacher temperature 0.04 that ulp of a logit/temperature of
    magnitude ~25 becomes a ~1.5e-6 relative error of the probabilities. Hiding the broadcast
    behind an optimization barrier keeps a true division; XLA still fuses broadcast and divide
    (checked on CPU), so nothing extra is materialised there.
    """
    y = jnp.asarray(y, dtype=x.dtype)
    return x / jax.lax.optimization_barrier(jnp.broadcast_to(y, x.shape))
