"""Faults as tests: the soak run (benchmarks/soak.py) in its short form, on every CI run.

One stdio server takes calls at its concurrency limit with random client cancellations, then has
its engine stopped and started under it, then is SIGKILLed with calls in flight. The script checks
that every answered call was right, that cancelled and killed calls leave no container (with no
server left to remove them), that the server's memory stayed bounded, that calls failed fast while
the engine was away and the same server served again when it came back, and that the audit log is
valid JSON Lines with an end record for every execution (cancelled ones included). The long form
(1,000 calls) is run by hand; its figures are in docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ACTIVE_SERVERS

pytestmark = [pytest.mark.docker]

SOAK = Path(__file__).resolve().parents[2] / "benchmarks" / "soak.py"


def test_a_short_soak_with_cancellations_an_engine_restart_and_a_server_kill_keeps_every_promise(tmp_path, measure):
    if os.geteuid() != 0:
        pytest.skip("the soak stops and starts the Docker engine, which needs root")
    assert not ACTIVE_SERVERS, "another server would sweep the killed server's sandboxes and hide a leak"
    report = tmp_path / "soak.json"
    completed = subprocess.run(
        [sys.executable, str(SOAK), "--calls", "120", "--json", str(report)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    figures = json.loads(report.read_text())["figures"] if report.exists() else {}
    for name, value in figures.items():
        measure(name, value)
    assert completed.returncode == 0, f"{completed.stdout[-4000:]}\n{completed.stderr[-4000:]}"
    assert figures["load: wrong answers"] == 0
    assert figures["load: cancelled by the client"] > 0
