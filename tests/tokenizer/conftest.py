"""Slow tests here (multi-hundred-MB models) run only with ``-m slow`` or TIDELLM_SLOW_TESTS=1."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _skip_slow_unless_asked(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("slow") is None:
        return
    if "slow" in (request.config.getoption("markexpr") or "") or os.environ.get("TIDELLM_SLOW_TESTS") == "1":
        return
    pytest.skip("slow test: run with -m slow or TIDELLM_SLOW_TESTS=1")
