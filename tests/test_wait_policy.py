"""Importing graftlm makes torch's OpenMP threads spin briefly then sleep, unless the user chose a policy."""

import os
import subprocess
import sys

PROBE = (
    "import graftlm, os; "
    "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'), graftlm.WAIT_POLICY_SET_BY_GRAFTLM)"
)


def _probe(**extra: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")} | extra
    return subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()


def test_bounded_spin_by_default():
    assert _probe() == "PASSIVE 10000 True"


def test_the_users_choice_is_kept():
    assert _probe(OMP_WAIT_POLICY="ACTIVE") == "ACTIVE None False"
    assert _probe(OMP_WAIT_POLICY="PASSIVE") == "PASSIVE None False"  # fully passive: no spin count set
    assert _probe(GOMP_SPINCOUNT="0") == "None 0 False"  # a spin count alone is a choice too


MALLOC_PROBE = """
import ctypes, platform, resource
import graftlm

faults = 0
if platform.libc_ver()[0] == "glibc":
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = 16 << 20
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    libc.free(p)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(graftlm.MALLOC_TUNED_BY_GRAFTLM, faults < 1000)
"""


def _malloc_probe(**extra: str) -> str:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("MALLOC_") and k not in ("GRAFTLM_MALLOC", "GLIBC_TUNABLES")
    } | extra
    return subprocess.run(
        [sys.executable, "-c", MALLOC_PROBE], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()


def test_freed_memory_is_kept_for_the_next_prefill():
    """On glibc, a freed 16 MB block is reused without faulting its 4,096 pages in again (glibc's own
    policy maps and unmaps it each time); GRAFTLM_MALLOC=system or any MALLOC_* variable leaves
    glibc's policy alone."""
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        assert _malloc_probe().startswith("False")
        return
    assert _malloc_probe() == "True True"
    assert _malloc_probe(GRAFTLM_MALLOC="system") == "False False"
    assert _malloc_probe(MALLOC_ARENA_MAX="4").startswith("False")
    assert _malloc_probe(GLIBC_TUNABLES="glibc.malloc.trim_threshold=131072").startswith("False")
