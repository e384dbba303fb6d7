"""The benchmark's own arithmetic: payloads, group sizes, the headline and
the side-by-side tables (the harness end to end is in test_bench.py)."""

from __future__ import annotations

import json

import pytest

from bench import report
from bench.procstat import cpu_seconds, rss_bytes
from bench.records_bench import group_sizes, headline, payload


def step(n, rate, p99, lost=0, misrouted=0):
    return {"step": n, "target_per_s": rate, "deliveries_per_s": rate, "received": rate, "lost": lost,
            "misrouted": misrouted, "p50_ms": p99 / 2, "p99_ms": p99, "max_ms": p99 * 2,
            "cpu_us_per_delivery": 10.0 + n}


def test_group_sizes_cover_every_client_as_the_load_generator_assigns_them():
    assert group_sizes(10, 3) == [4, 3, 3]
    assert sum(group_sizes(2000, 20)) == 2000
    assert group_sizes(5, 5) == [1] * 5


def test_payload_is_about_the_asked_size_and_carries_its_send_time():
    body = payload(step=3, seq=7, group=1, size=1024)
    assert 1000 <= len(body) <= 1100
    data = json.loads(body)
    assert data["room"] == "group-2"
    step_no, seq, sent_ms, group = data["records"]["bench"]
    assert (step_no, seq, group) == (3, 7, 1)
    assert sent_ms > 1.6e12
    # The load generator finds the stamp by this exact marker, without parsing.
    assert '"bench":[' in body


def test_headline_is_the_fastest_step_under_100ms_p99_without_loss():
    steps = [step(0, 1000, 5), step(1, 2000, 50), step(2, 4000, 99), step(3, 8000, 150)]
    assert headline(steps)["target_per_s"] == 4000
    steps[2]["lost"] = 1
    assert headline(steps)["target_per_s"] == 2000
    steps[1]["misrouted"] = 3
    assert headline(steps)["target_per_s"] == 1000
    assert headline([step(0, 1000, 101)]) is None
    assert headline([]) is None


def test_cpu_is_compared_at_the_highest_load_both_servers_met_the_bar():
    ours = {"steps": [step(0, 1000, 5), step(1, 2000, 5), step(2, 4000, 5)]}
    ref = {"steps": [step(0, 1000, 5), step(1, 2000, 50), step(2, 4000, 300)]}
    assert report.common_step(ours, ref) == 1
    assert report.common_step(ours, {"steps": [step(0, 1000, 300)]}) is None


def test_cpu_at_the_compared_load_is_the_mean_over_every_round_that_ran_it():
    def run(cpus):
        steps = [step(0, 1000, 5), step(1, 2000, 5)]
        for s, cpu in zip(steps, cpus):
            s["cpu_us_per_delivery"] = cpu
        return {"steps": steps}

    ours = dict(run([10.0, 8.0]), rounds=[run([10.0, 8.0]), run([12.0, 6.0])])
    ref = dict(run([30.0, 20.0]), rounds=[run([30.0, 20.0]), run([40.0, 22.0])])
    assert report.cpu_at(ours, 2000) == (7.0, 2)
    assert report.cpu_at(ref, 1000) == (35.0, 2)
    assert report.cpu_at(ours, 4000) == (None, 0)
    assert report.cpu_at(run([10.0, 8.0]), 2000) == (8.0, 1)  # a single round
    row = next(r for r in report.records_rows(ours, ref) if r[0].startswith("CPU per delivery"))
    assert row[0] == "CPU per delivery (µs) at 2000/s offered, mean of 2+2 rounds"
    assert row[1:3] == (7.0, 21.0) and row[4] == ("<=", 0.7)


def test_cpu_is_also_shown_as_the_median_over_every_load_both_sustained():
    ours = {"steps": [step(0, 1000, 5), step(1, 2000, 5), step(2, 4000, 5), step(3, 8000, 5)]}
    ref = {"steps": [step(0, 1000, 5), step(1, 2000, 50), step(2, 4000, 60), step(3, 8000, 300)]}
    for result, cpus in ((ours, [10.0, 9.0, 8.0, 1.0]), (ref, [30.0, 20.0, 10.0, 5.0])):
        for s, cpu in zip(result["steps"], cpus):
            s["cpu_us_per_delivery"] = cpu
    both = report.common_steps(ours, ref)
    assert both == {0, 1, 2}
    assert report.median_cpu(ours, both) == 9.0
    assert report.median_cpu(ref, both) == 20.0
    assert report.median_cpu(ours, {0, 1}) == 9.5
    assert report.median_cpu(ours, set()) is None
    row = next(r for r in report.records_rows(ours, ref) if "median over the 3 loads" in r[0])
    assert row[1:3] == (9.0, 20.0) and row[4] is None  # shown, not a bar


def test_tables_show_both_servers_the_ratio_and_whether_the_bar_is_met():
    rows = [("rate", 30000.0, 20000.0, ".0f", (">=", 1.25)), ("cpu", 20.0, 25.0, ".1f", ("<=", 0.7)),
            ("info", None, 3.0, ".1f", None), ("busy", 0.5, 0.1, ".2f", report.NO_RATIO)]
    text = report.table("Records", rows)
    lines = text.splitlines()
    assert lines[0] == "Records"
    assert "30000" in lines[3] and "20000" in lines[3] and "1.50" in lines[3] and "PASS" in lines[3]
    assert "0.80" in lines[4] and "FAIL" in lines[4]
    assert "n/a" not in lines[5] and lines[5].split()[1] == "-"
    assert lines[6].split() == ["busy", "0.50", "0.10", "-"]
    md = report.markdown_table(rows)
    assert md.splitlines()[2] == "| rate | 30000 | 20000 | 1.50 | >=1.25  PASS |"


def test_procstat_reads_this_process():
    assert cpu_seconds(__import__("os").getpid()) > 0
    assert rss_bytes(__import__("os").getpid()) > 1024 * 1024


def test_profile_summary_splits_self_and_inclusive_time_by_function_and_package():
    from bench.profile_summary import parse, render, summarise

    raw = [
        "<module> (app:1);run (asyncio/runners.py:118);send (websockets/protocol.py:10) 6",
        (
            "<module> (app:1);run (asyncio/runners.py:118);relay (channels_records/relay.py:5);"
            "relay (channels_records/relay.py:9) 3"
        ),
        "<module> (app:1);run (asyncio/runners.py:120) 1",
        "not a stack line",
    ]
    summary = summarise(parse(raw))
    assert summary["samples"] == 10
    assert dict(summary["packages"]) == {"websockets": 0.6, "channels_records": 0.3, "asyncio": 0.1}
    assert summary["self"][0] == ("send (websockets/protocol.py)", 0.6)
    inclusive = dict(summary["inclusive"])
    # A function twice on one stack counts once; frames on every stack are left out.
    assert inclusive == {"send (websockets/protocol.py)": 0.6, "relay (channels_records/relay.py)": 0.3}
    assert "60.0%  send (websockets/protocol.py)" in render(summary)


def test_update_readme_replaces_only_the_results_block(tmp_path):
    from bench.run import update_readme

    readme = tmp_path / "README.md"
    readme.write_text("# Title\nmine\n<!-- bench-results:start -->\nold table\n<!-- bench-results:end -->\ntheirs\n")
    results = {"command": "python bench/run.py --quick", "date": "2026-11-26T15:00:00+00:00"}
    update_readme("| new | table |", results, readme)
    assert readme.read_text() == (
        "# Title\nmine\n<!-- bench-results:start -->\n"
        '`make bench BENCH_ARGS="--quick"`, 2026-11-26 15:00 UTC:\n\n| new | table |\n'
        "<!-- bench-results:end -->\ntheirs\n"
    )
    untouched = tmp_path / "OTHER.md"
    untouched.write_text("no markers\n")
    update_readme("| new |", results, untouched)
    assert untouched.read_text() == "no markers\n"


def test_of_repeated_rounds_the_one_with_the_best_headline_counts_and_all_are_kept():
    from bench.run import best_run

    slow = {"headline": {"deliveries_per_s": 1000.0}, "memory": 1}
    fast = {"headline": {"deliveries_per_s": 3000.0}, "memory": 2}
    broken = {"headline": None, "error": "exited"}
    best = best_run([slow, broken, fast])
    assert best["memory"] == 2 and best["round_headlines"] == [1000.0, 0.0, 3000.0]
    assert len(best["rounds"]) == 3
    assert best_run([slow]) == slow


def test_bad_arguments_are_refused_with_a_clear_message(capsys):
    from bench.run import parse_args

    for argv, message in ((["--rates", "1,x"], "not a comma-separated list"), (["--rates", "0"], "positive"),
                          (["--clients", "-5"], "must be positive"), (["--docs", "many"], "not an integer")):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert message in capsys.readouterr().err
    assert parse_args(["--rates", "100, 200"]).rates == [100, 200]


def test_rounds_alternate_who_goes_first_and_collab_keeps_its_lowest_p99_without_loss():
    from bench.run import best_collab_run, round_order

    assert round_order(["ours", "reference"], 0) == ["ours", "reference"]
    assert round_order(["ours", "reference"], 1) == ["reference", "ours"]
    assert round_order(["ours"], 1) == ["ours"]
    calm = {"edit": {"p99": 12.0, "lost": 0}}
    busy = {"edit": {"p99": 40.0, "lost": 0}}
    lossy = {"edit": {"p99": 5.0, "lost": 3}}
    best = best_collab_run([busy, lossy, calm])
    assert best["edit"]["p99"] == 12.0 and best["round_p99s"] == [40.0, None, 12.0]
    assert best_collab_run([busy]) == busy


def test_trickle_cost_is_server_cpu_per_mib_received():
    from bench.trickle_bench import TrickleConfig, cpu_ms_per_mib

    assert cpu_ms_per_mib(0.36, 9 * 1024 * 1024) == pytest.approx(40.0)
    assert cpu_ms_per_mib(0.01, 512 * 1024) == pytest.approx(20.0)
    assert cpu_ms_per_mib(1.0, 0) is None
    assert TrickleConfig().bytes == 9 * 1024 * 1024 and TrickleConfig(mib=0.5).bytes == 512 * 1024


def test_of_trickle_rounds_the_cheapest_whole_frame_counts_and_all_are_kept():
    from bench.trickle_bench import best_trickle_run

    def run(cost, sent=100, error=None):
        r = {"trickle": {"cpu_ms_per_mib": cost, "sent": sent, "bytes": 100}}
        return {**r, "error": error} if error else r

    cut_short = run(1.0, sent=50)  # cheap only because the server stopped reading
    broken = run(2.0, error="exited")
    busy, calm = run(40.0), run(31.0)
    best = best_trickle_run([busy, cut_short, broken, calm])
    assert best["trickle"]["cpu_ms_per_mib"] == 31.0
    assert best["round_cpu_ms_per_mib"] == [40.0, None, None, 31.0] and len(best["rounds"]) == 4
    assert best_trickle_run([busy]) == busy


def test_trickle_table_compares_cpu_per_mib_against_the_reference():
    ours = {"trickle": {"cpu_ms_per_mib": 31.1, "cpu_s": 0.28, "sent": 9 * 1024 * 1024, "segments": 9216,
                        "meanGapMs": 0.45, "other_processes_cores": 0.3}}
    ref = {"trickle": {"cpu_ms_per_mib": 37.8, "cpu_s": 0.34, "sent": 9 * 1024 * 1024, "segments": 9216,
                       "meanGapMs": 0.41, "other_processes_cores": 0.2}}
    rows = report.trickle_rows(ours, ref)
    assert rows[0][:3] == ("server CPU per MiB received (ms)", 31.1, 37.8) and rows[0][4] == ("<=", 1.0)
    assert "0.82" in report.table("Trickle", rows).splitlines()[3] and "PASS" in report.table("Trickle", rows)
    assert rows[2][1:3] == (9.0, 9.0)
    # A failed server gives dashes, not a crash.
    assert report.markdown_table(report.trickle_rows({}, ref)).splitlines()[2].startswith("| server CPU per MiB")


def test_trickle_is_a_scenario_with_its_own_size_and_rounds():
    from bench.run import configs, parse_args

    args = parse_args(["--scenario", "trickle", "--trickle-mib", "0.5"])
    _, _, tri = configs(args)
    assert tri.bytes == 512 * 1024 and args.trickle_repeat == 3
    args = parse_args(["--repeat", "1"])
    configs(args)
    assert args.trickle_repeat == 1
    args = parse_args(["--quick", "--trickle-repeat", "2"])
    configs(args)
    assert args.trickle_repeat == 2
    for bad in ("0", "-1", "lots"):
        with pytest.raises(SystemExit):
            parse_args(["--trickle-mib", bad])


def test_the_rate_bar_compares_offered_rates_sustained_and_shows_what_was_delivered():
    ours, ref = step(0, 12000, 20), step(0, 12000, 80)
    ours["deliveries_per_s"], ref["deliveries_per_s"] = 11909.0, 11975.0  # window edges, no loss
    rows = report.records_rows({"steps": [ours], "headline": ours}, {"steps": [ref], "headline": ref}, polling=True)
    assert rows[0][1:3] == (12000, 12000) and rows[0][4] == (">=", 1.0)
    assert rows[1][0] == "  delivered in that step (/s)" and rows[1][1:3] == (11909.0, 11975.0)


def test_best_round_is_the_lowest_of_a_servers_rounds():
    from bench.report import best_round

    rounds = [{"edit": {"cpu_us_per_update": v}} for v in (130, 114, 122)]
    assert best_round({"edit": {"cpu_us_per_update": 130}, "rounds": rounds}, "edit", "cpu_us_per_update") == 114
    assert best_round({"edit": {"cpu_us_per_update": 97}}, "edit", "cpu_us_per_update") == 97
    assert best_round({}, "edit", "cpu_us_per_update") is None
    assert best_round({"rounds": [{"edit": {}}, rounds[2]]}, "edit", "cpu_us_per_update") == 122
