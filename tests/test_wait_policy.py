"""Importing graftlm makes torch's OpenMP threads wait passively, unless the user chose a policy."""

import os
import subprocess
import sys

PROBE = "import graftlm, os; print(os.environ['OMP_WAIT_POLICY'], graftlm.WAIT_POLICY_SET_BY_GRAFTLM)"


def _probe(**extra: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | extra
    return subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()


def test_passive_by_default():
    assert _probe() == "PASSIVE True"


def test_the_users_choice_is_kept():
    assert _probe(OMP_WAIT_POLICY="ACTIVE") == "ACTIVE False"
