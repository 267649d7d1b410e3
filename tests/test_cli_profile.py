"""``asirt profile`` as a user runs it: list, show, import; exit codes and what is printed."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from asirt.kvm.profile import (builtin_names, load, parse_perf_kvm_stat, parse_toml, to_json,
                               to_toml)

pytestmark = pytest.mark.timeout(120)

DATA = os.path.join(os.path.dirname(__file__), "data", "perf_kvm_stat")
SYSBENCH = os.path.join(DATA, "sysbench-cpu-0xba1a-2020.txt")


def asirt(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root}
    return subprocess.run([sys.executable, "-m", "asirt", "profile", *args], capture_output=True,
                          text=True, timeout=60, cwd=cwd, env=env)


def test_list() -> None:
    r = asirt("list")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["NAME", "EXIT", "RATE", "REASONS", "SOURCE"]
    for name in builtin_names():
        row = next(line for line in lines if line.startswith(name + " "))
        assert f"{load(name).exit_rate_hz:g} Hz" in row
        assert str(len(load(name).reasons)) in row.split()


def test_show_a_builtin() -> None:
    r = asirt("show", "cpu-bound")
    assert r.returncode == 0, r.stderr
    prof = load("cpu-bound")
    assert r.stdout.startswith("profile cpu-bound\n")
    assert prof.source.url in r.stdout and "1142.86 Hz" in r.stdout
    table = r.stdout.split("\n\n", 1)[1].splitlines()
    assert table[0].split()[:3] == ["REASON", "SHARE", "KIND"]
    assert [line.split()[0] for line in table[2:]] == [x.name for x in prof.reasons]
    assert "30.57ms" in r.stdout          # HLT's mean handler time


def test_show_a_file_and_json(tmp_path) -> None:
    mine = tmp_path / "mine.toml"
    mine.write_text(to_toml(load("io-heavy")).replace('name = "io-heavy"', 'name = "mine"', 1))
    r = asirt("show", str(mine))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("profile mine\n") and "IO_INSTRUCTION" in r.stdout
    r = asirt("show", "ipi-heavy", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == to_json(load("ipi-heavy"))


def test_show_refuses_an_unknown_profile_and_a_bad_file(tmp_path) -> None:
    r = asirt("show", "no-such")
    assert r.returncode == 2 and r.stdout == ""
    assert "no-such" in r.stderr and all(n in r.stderr for n in builtin_names())
    bad = tmp_path / "bad.toml"
    bad.write_text(to_toml(load("default")).replace("p_sensitive = 1\n", "p_sensitive = 7\n", 1))
    r = asirt("show", str(bad))
    assert r.returncode == 2
    assert f"profile {bad}: exit[0].p_sensitive: is 7, out of range" in r.stderr
    assert "between 0 and 1" in r.stderr


def test_import_to_stdout() -> None:
    r = asirt("import", SYSBENCH)
    assert r.returncode == 0, r.stderr
    with open(SYSBENCH, encoding="utf-8") as f:
        expected = parse_perf_kvm_stat(f.read(), SYSBENCH)
    assert parse_toml(r.stdout, "stdout") == expected
    assert "stated default 10000 Hz" in r.stderr and "--exit-rate-hz" in r.stderr
    assert "# footprint: stated default" in r.stdout


def test_import_with_a_name_and_rate_to_a_new_file(tmp_path) -> None:
    out = tmp_path / "sysbench.toml"
    r = asirt("import", SYSBENCH, "-o", str(out), "--name", "sb", "--exit-rate-hz", "1142.86")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"wrote {out}: profile sb, 9 exit reasons\n"
    assert r.stderr == ""                         # the rate was given: nothing to note
    prof = load(str(out))
    assert prof.name == "sb" and prof.exit_rate_hz == 1142.86
    assert os.listdir(tmp_path) == ["sysbench.toml"]


def test_import_refuses_to_overwrite(tmp_path) -> None:
    out = tmp_path / "taken.toml"
    out.write_text("mine\n")
    r = asirt("import", SYSBENCH, "-o", str(out))
    assert r.returncode == 2 and r.stdout == ""
    assert f"-o {out}: already exists" in r.stderr
    assert out.read_text() == "mine\n"
    assert os.listdir(tmp_path) == ["taken.toml"]          # no temporary file left behind


def test_import_into_a_missing_directory(tmp_path) -> None:
    out = tmp_path / "no" / "such" / "dir.toml"
    r = asirt("import", SYSBENCH, "-o", str(out))
    assert r.returncode == 2 and f"-o {out}: cannot be written" in r.stderr
    assert os.listdir(tmp_path) == []


def test_import_of_a_bad_report_names_the_line(tmp_path) -> None:
    report = os.path.join(DATA, "pte-prefetch-senozhatsky-2021.txt")
    out = tmp_path / "x.toml"
    r = asirt("import", report, "-o", str(out))
    assert r.returncode == 2 and r.stdout == ""
    assert f"{report} line 6: not part of a perf kvm stat table: '[..]'" in r.stderr
    assert not out.exists() and os.listdir(tmp_path) == []


@pytest.mark.parametrize("args,needle", [
    (["import", "/no/such/report.txt"], "report '/no/such/report.txt': no such file"),
    (["import", SYSBENCH, "--exit-rate-hz", "0"], "--exit-rate-hz: is 0.0, out of range"),
    (["import", SYSBENCH, "--exit-rate-hz", "nan"], "--exit-rate-hz: is nan"),
    (["import", SYSBENCH, "--exit-rate-hz", "fast"], "--exit-rate-hz"),
    (["import", SYSBENCH, "--name", "two words"], "--name: 'two words' is not a valid name"),
    (["show"], "NAME|FILE"),
    (["frobnicate"], "frobnicate"),
])
def test_bad_input_exits_2(args, needle) -> None:
    r = asirt(*args)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr
