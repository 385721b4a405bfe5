"""Model FLOPs utilisation: useful FLOPs per second over the device's measured matmul peak."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp


def measure_matmul_peak_tflops(dtype: str = "float32", size: int = 1024, seconds: float = 0.3) -> float:
    """Achieved TFLOP/s of a square matmul on the default device: the practical peak MFU is reported against."""
    n = size * (4 if jax.default_backend() in ("gpu", "tpu") else 1)
    a = jnp.ones((n, n), dtype)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        mm(a).block_until_ready()
        reps += 1
    return 2.0 * n ** 3 * reps / (time.perf_counter() - start) / 1e12
