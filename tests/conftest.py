"""Test-session set-up: 8 simulated CPU devices before any JAX op (jax-ecosystem.md pitfall 27)."""

import os

os.environ.setdefault("XLA_FLAGS", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")
