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
