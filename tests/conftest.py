"""Test configuration: two forced host devices and float64 for exactness checks.

XLA_FLAGS must be set before jax is imported anywhere, hence here.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
