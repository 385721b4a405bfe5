"""The malloc tunables the command-line entry points restart with (flan_jax/utils/runtime_env.py)."""
import os
import subprocess
import sys

import pytest

from flan_jax.utils import runtime_env


def test_tuned_environ_adds_the_tunables_and_keeps_the_users_own():
    env = runtime_env.tuned_environ({"PATH": "/bin"})
    assert env["GLIBC_TUNABLES"].split(":") == list(runtime_env.MALLOC_TUNABLES)
    assert env["PATH"] == "/bin"

    mine = runtime_env.tuned_environ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0:glibc.cpu.x86_ibt=off"})
    parts = mine["GLIBC_TUNABLES"].split(":")
    assert parts[:2] == ["glibc.malloc.hugetlb=0", "glibc.cpu.x86_ibt=off"]  # the user's values win
    assert "glibc.malloc.hugetlb=1" not in parts
    assert "glibc.malloc.mmap_max=0" in parts

    assert runtime_env.tuned_environ(mine) == mine  # idempotent: a restarted process does not restart again
    off = {runtime_env.OPT_OUT_VARIABLE: "0"}
    assert runtime_env.tuned_environ(off) == off


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables are Linux-only")
def test_entry_point_restarts_once_with_the_tunables():
    child = ("from flan_jax.utils.runtime_env import reexec_with_tuned_malloc as r; import os, sys; "
             "print('run', os.environ.get('GLIBC_TUNABLES', '-')); "
             "r(['-c', 'import os; print(\"child\", os.environ[\"GLIBC_TUNABLES\"])'])")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", runtime_env.OPT_OUT_VARIABLE)}
    out = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["run -", "child " + ":".join(runtime_env.MALLOC_TUNABLES)]

    env[runtime_env.OPT_OUT_VARIABLE] = "0"
    out = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["run -"]  # opted out: no restart

    env.pop(runtime_env.OPT_OUT_VARIABLE)
    env["JAX_PLATFORMS"] = "cuda,cpu"
    out = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["run -"]  # an accelerator backend: no restart


def test_backend_is_decided_from_jax_platforms_then_installed_plugins():
    no_devices = lambda path: False
    gpu_host = lambda path: path == "/dev/nvidiactl"
    is_cpu = runtime_env.jax_backend_is_cpu
    assert is_cpu({}, plugins=[], path_exists=gpu_host)
    assert is_cpu({"JAX_PLATFORMS": "cpu"}, plugins=["xla_cuda12"], path_exists=gpu_host)  # the user's choice wins
    assert not is_cpu({"JAX_PLATFORMS": "cuda,cpu"}, plugins=[], path_exists=no_devices)
    assert not is_cpu({"JAX_PLATFORM_NAME": "tpu"}, plugins=[], path_exists=no_devices)
    assert not is_cpu({}, plugins=["xla_cuda12"], path_exists=gpu_host)
    assert is_cpu({}, plugins=["xla_cuda12"], path_exists=no_devices)  # CUDA plugin on a host without a GPU
    assert not is_cpu({}, plugins=["libtpu"], path_exists=lambda p: p == "/dev/accel0")
    assert not is_cpu({}, plugins=["some_new_accelerator"], path_exists=no_devices)  # unknown: assume it wins

    wants = runtime_env.wants_malloc_tuning
    assert not wants({runtime_env.OPT_OUT_VARIABLE: "0"}, plugins=[], path_exists=no_devices)
    assert wants({runtime_env.OPT_OUT_VARIABLE: "1", "JAX_PLATFORMS": "cuda"}, plugins=[], path_exists=no_devices)
    assert not wants({"JAX_PLATFORMS": "tpu"}, plugins=[], path_exists=no_devices)
    assert wants({}, plugins=[], path_exists=no_devices)


def test_an_installed_plugin_without_its_device_is_not_started():
    """libtpu of the `tpu` extra on a host without TPU device nodes: the CLI pins JAX to the CPU it would end on
    anyway, so the plugin's start-up warnings never print; with the device (or a JAX_PLATFORMS of the user's) it
    leaves JAX to choose."""
    env = {}
    runtime_env.skip_absent_accelerators(env, plugins=["libtpu"], path_exists=lambda path: False)
    assert env == {"JAX_PLATFORMS": "cpu"}
    env = {}
    runtime_env.skip_absent_accelerators(env, plugins=["libtpu"], path_exists=lambda path: path == "/dev/vfio")
    assert env == {}
    env = {"JAX_PLATFORMS": "tpu"}
    runtime_env.skip_absent_accelerators(env, plugins=["libtpu"], path_exists=lambda path: False)
    assert env == {"JAX_PLATFORMS": "tpu"}
