"""``import tidellm`` sets OpenMP's idle spin before torch loads OpenMP, unless the user chose a wait policy."""

from __future__ import annotations

import os
import subprocess
import sys


def _env_after_import(env: dict[str, str]) -> dict[str, str | None]:
    code = "import os, tidellm; print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    spin, policy = out.stdout.split()
    return {
        "GOMP_SPINCOUNT": None if spin == "None" else spin,
        "OMP_WAIT_POLICY": None if policy == "None" else policy,
    }


def test_bounded_spin_by_default_and_user_settings_win() -> None:
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    assert _env_after_import(base) == {"GOMP_SPINCOUNT": "20000", "OMP_WAIT_POLICY": None}
    assert _env_after_import({**base, "GOMP_SPINCOUNT": "5"})["GOMP_SPINCOUNT"] == "5"
    assert _env_after_import({**base, "OMP_WAIT_POLICY": "PASSIVE"}) == {
        "GOMP_SPINCOUNT": None,
        "OMP_WAIT_POLICY": "PASSIVE",
    }
