"""`make bench` on a tiny configuration, so the harness keeps working: real
Redis, the reference servers, the Node load generators, the publisher and
the /proc sampling. Asserts well-formed results, never timings."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support import ROOT

TINY = [
    "--clients", "20", "--groups", "2", "--rates", "400,800", "--step-seconds", "1", "--repeat", "1",
    "--docs", "5", "--edit-seconds", "2", "--big-repeats", "1", "--settle-seconds", "0.2",
    "--trickle-mib", "0.25",
]


def run_bench(tmp_path, *targets: str) -> tuple[subprocess.CompletedProcess, dict]:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), *TINY, "--targets", ",".join(targets),
         "--out", str(tmp_path)],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done, json.loads((tmp_path / "latest.json").read_text())


def assert_cpu_ticks(cpu_s: float) -> None:
    """A CPU time read from /proc: a whole number of clock ticks, not negative."""
    ticks = cpu_s * os.sysconf("SC_CLK_TCK")
    assert ticks >= 0 and ticks == pytest.approx(round(ticks), abs=1e-6), cpu_s


def assert_cores(cores: float) -> None:
    """A share of the machine in cores: between none and all of them (plus
    one tick of rounding over the one-second windows used here)."""
    assert 0 <= cores <= (os.cpu_count() or 1) + 0.1, cores


def check_records(result: dict) -> None:
    assert "error" not in result, result.get("error")
    assert result["connect"]["count"] == 20 and result["connect"]["failed"] == 0
    assert result["memory"]["connected_rss"] > 0
    steps = result["steps"]
    assert [s["target_per_s"] for s in steps] == [400, 800]
    for s in steps:
        # 400/s over 10 clients a message is 40 messages a second, each to 10 clients.
        assert s["published"] == s["target_per_s"] // 10
        assert s["expected"] == s["published"] * 10
        assert s["received"] == s["expected"] and s["lost"] == 0 and s["misrouted"] == 0
        assert 0 < s["p50_ms"] <= s["p99_ms"] <= s["max_ms"]
        # /proc counts CPU in 10 ms ticks: a tiny step may cost the server none.
        assert_cpu_ticks(s["cpu_s"])
        assert s["cpu_us_per_delivery"] == pytest.approx(s["cpu_s"] / s["received"] * 1e6)
        assert s["deliveries_per_s"] > 0
        assert s["open_clients"] == 20
        assert_cores(s["loadgen_cpu_share"])
        assert_cores(s["other_processes_cores"])
    assert result["headline"] is not None


def check_collab(result: dict) -> None:
    assert "error" not in result, result.get("error")
    assert result["load"]["docs"] == 5 and result["load"]["failed"] == 0
    edit = result["edit"]
    assert edit["sent"] >= 5 and edit["received"] == edit["sent"] and edit["lost"] == 0
    assert 0 < edit["p50"] <= edit["p99"] <= edit["max"]
    assert_cpu_ticks(edit["cpu_s"])
    assert edit["cpu_us_per_update"] == pytest.approx(edit["cpu_s"] / edit["sent"] * 1e6)
    gc = edit["gc"]
    assert type(gc["count"]) is int and gc["totalMs"] >= gc["maxMs"]
    assert (gc["count"] > 0) == (gc["totalMs"] > 0) == (gc["maxMs"] > 0)
    assert result["memory"]["loaded_rss"] > 0
    big = result["bigsync"]
    assert big["failed"] == 0 and len(big["times"]) == 1 and big["median"] > 0


def check_trickle(result: dict) -> None:
    assert "error" not in result, result.get("error")
    t = result["trickle"]
    assert t["bytes"] == t["sent"] == 256 * 1024 and t["segments"] == 256
    assert_cpu_ticks(t["cpu_s"])
    assert t["cpu_ms_per_mib"] == pytest.approx(t["cpu_s"] * 1000 * 4)
    assert t["meanGapMs"] > 0
    assert_cores(t["other_processes_cores"])


def check_cluster(result: dict) -> None:
    assert "error" not in result, result.get("error")
    assert result["instances"] == 2 and result["load"]["docs"] == 5 and result["load"]["failed"] == 0
    edit = result["edit"]
    assert edit["sent"] >= 5 and edit["received"] == edit["sent"] and edit["lost"] == 0
    assert 0 < edit["p50"] <= edit["p99"] <= edit["max"]
    assert edit["cpu_us_per_update"] >= 0 and edit["redis_cpu_us_per_update"] >= 0
    assert result["redis"]["used_memory_after"] > 0


@pytest.mark.slow
def test_tiny_bench_of_ours_and_the_reference_gives_well_formed_results(tmp_path):
    done, results = run_bench(tmp_path, "ours", "reference")
    for who in ("ours", "reference"):
        check_records(results["records"][who])
        check_collab(results["collab"][who])
        check_trickle(results["trickle"][who])
        check_cluster(results["cluster"][who])
    # One table per scenario, with both columns and the ratio.
    assert "Records: 20 clients, 2 groups" in done.stdout and "Collab: 5 documents" in done.stdout
    assert "Trickle (collab): one 0.25 MiB frame" in done.stdout
    assert "Collab on 2 instances, one Redis: 5 documents" in done.stdout
    assert "ours  reference  ratio" in done.stdout
    assert (tmp_path / "latest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| memory per idle connection (KiB) |" in (tmp_path / "latest.md").read_text()


@pytest.mark.slow
def test_the_ws_package_client_cross_checks_the_raw_one(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--scenario", "records", "--targets", "reference",
         "--ws-client", "ws", "--repeat", "1", "--clients", "20", "--groups", "2", "--rates", "400", "--step-seconds", "1",
         "--settle-seconds", "0.2", "--out", str(tmp_path)],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "latest.json").read_text())["records"]["reference"]
    assert result["config"]["client"] == "ws"
    [step] = result["steps"]
    assert step["received"] == step["expected"] == 400 and step["misrouted"] == 0
