"""The soak, in CI's time: the done-criterion's commands in miniature, through the CLI as a
user runs them (README.md has the full ones: 60 s with every fault, 10 million transitions).

Every fault kind at once, each on its own victim, under the protocol that claims safety; then
strict against naive on one seed. Each run must end within its duration plus the timeouts,
judge every fault, show zero violations for strict and some for naive, and leave nothing in
/dev/shm (the leftover check of every test, tests/plugin.py, and here once more by name).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from asirt.scenarios.faults import FAULTS

pytestmark = [pytest.mark.multiprocess, pytest.mark.requires_cpus(2), pytest.mark.timeout(120)]


def _stress(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    argv = [sys.executable, "-m", "asirt", "stress", *args, "--out", str(tmp_path), "--json",
            "--quiet"]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as proc:
        out, err = proc.communicate(timeout=100)
    assert "Traceback" not in err, err
    mine = f"asirt-{proc.pid}-"                  # its region's segment and semaphores
    assert not [n for n in os.listdir("/dev/shm") if mine in n]
    res = subprocess.CompletedProcess(argv, proc.returncode, out, err)
    return res, json.loads(out)["scenarios"] if out else []


def test_soak_every_fault_at_once(tmp_path):
    t0 = time.monotonic()
    res, (entry,) = _stress(tmp_path, "--duration", "3", "--seed", "21",
                            "--faults", ",".join(FAULTS))
    assert time.monotonic() - t0 < 60, "ran past its duration plus the timeouts"
    assert res.returncode == 0, res.stderr
    assert [f["fault"] for f in entry["faults"]] == list(FAULTS)
    assert all(f["injected"] and f["detected"] for f in entry["faults"]), entry["faults"]
    assert len({f["slot"] for f in entry["faults"]}) == len(FAULTS)      # a victim each
    assert entry["counters"]["violations"] == 0 and entry["failures"] == []
    assert entry["problems"] == [] and entry["ok"]


def test_soak_strict_against_naive_on_one_seed(tmp_path):
    res, scenarios = _stress(tmp_path, "--protocol", "strict,naive", "--duration", "2",
                             "--seed", "22")
    assert res.returncode == 0, res.stderr
    by = {s["strategy"]: s for s in scenarios}
    assert by["strict"]["counters"]["violations"] == 0 and by["strict"]["ok"]
    assert by["naive"]["counters"]["violations"] > 0 and by["naive"]["ok"]
    for s in scenarios:
        assert s["counters"]["monitor.samples"] > 0 and s["counters"]["check.checks"] > 0
