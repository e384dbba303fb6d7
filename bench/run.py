"""`make bench`: our services against the Node.js originals, side by side.

Starts a private Redis, the stand-in Rails, and, one at a time, each server
under test as one process; drives it with the Node load generator (its own
process) and measures the server from /proc. Prints one table per scenario
with ours, the reference and the ratio, and writes the raw JSON, a Markdown
summary and a PNG chart under bench/results/.

    python bench/run.py                       # defaults, under 10 minutes
    python bench/run.py --quick               # a smaller, faster run
    python bench/run.py --scenario records --clients 500 --groups 10
    python bench/run.py --scenario trickle    # one 9 MiB frame in 1 KiB segments
    python bench/run.py --profile             # also py-spy our records server
    python bench/run.py --scenario polling    # records over long-polling only
    python bench/run.py --scenario connects --clients 10000 --repeat 3   # connect bursts only
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, Python puts bench/ first on sys.path; import it as a package instead.
if sys.path and Path(sys.path[0]).resolve() == ROOT / "bench":
    sys.path.pop(0)
sys.path.insert(0, str(ROOT))

import httpx
from channels_dev.redis_server import start_local_redis

from bench import profile_summary, report
from bench.collab_bench import CollabConfig, run_collab, run_collab_cluster
from bench.connect_bench import median_run, run_connects
from bench.connect_bench import table as connects_table
from bench.processes import BENCH, VENV_BIN, Server, free_port
from bench.records_bench import POLLING_RATES, RecordsConfig, run_records
from bench.trickle_bench import TrickleConfig, best_trickle_run, run_trickle

TARGETS = ("ours", "reference")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {value}")
    return value


def rate_list(text: str) -> list[int]:
    try:
        rates = [int(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None
    if not rates or min(rates) <= 0:
        raise argparse.ArgumentTypeError("rates must be positive deliveries per second")
    return rates


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", choices=("records", "polling", "collab", "trickle", "cluster", "connects", "all"),
                   default="all",
                   help="cluster: collab on two instances and one Redis, against Hocuspocus + extension-redis; "
                        "connects (not part of all): websocket connect bursts, the median of --repeat rounds")
    p.add_argument("--targets", default="ours,reference", help="comma-separated: ours, reference")
    p.add_argument("--quick", action="store_true", help="fewer clients, documents and steps")
    p.add_argument("--clients", type=positive_int, help="records: websocket clients (default 2000, quick 500)")
    p.add_argument("--groups", type=positive_int, help="records: groups the clients are spread over (default 20)")
    p.add_argument("--polling-clients", type=positive_int,
                   help="polling: long-polling clients in 10 groups (default 500, and never more than --clients)")
    p.add_argument("--rates", type=rate_list, help="records: comma-separated deliveries/s, one step each")
    p.add_argument("--repeat", type=positive_int,
                   help="rounds of ours and reference, first one then the other, the best round of each "
                        "counts (default 2, quick 1): on a shared machine one disturbed round should not decide")
    p.add_argument("--collab-repeat", type=positive_int,
                   help="collab: rounds, as --repeat (default: --repeat if given, else 3; quick 1): its p99 "
                        "sits on the load generator's GC pauses, so one more round per server steadies it")
    p.add_argument("--ws-client", choices=("raw", "ws"), default="raw",
                   help="records: the load generator's websocket client (raw: leanest; ws: the npm package)")
    p.add_argument("--step-seconds", type=float, help="records: seconds per rate step (default 4)")
    p.add_argument("--docs", type=positive_int, help="collab: documents, two providers each (default 500, quick 100)")
    p.add_argument("--edit-rate", type=float,
                   help="collab and cluster: updates/s per editor (default: collab 4, i.e. 2,000 updates/s over "
                        "500 documents, the rate of issue 22's bar; cluster 1)")
    p.add_argument("--edit-seconds", type=float, help="collab: length of the edit phase (default 10)")
    p.add_argument("--big-repeats", type=positive_int, help="collab: new clients timed on the 100 KB document")
    p.add_argument("--trickle-mib", type=positive_float,
                   help="trickle: MiB of the one frame sent in 1 KiB segments 0.4 ms apart (default 9)")
    p.add_argument("--trickle-repeat", type=positive_int,
                   help="trickle: rounds, as --repeat (default: --repeat if given, else 3; quick 1); "
                        "the least CPU per MiB counts")
    p.add_argument("--settle-seconds", type=float, help="quiet time before memory readings (default 2)")
    p.add_argument("--out", default=str(BENCH / "results"), help="directory for JSON, Markdown and PNG")
    p.add_argument("--update-readme", action="store_true",
                   help="replace the results tables in docs/benchmarks.md (between the bench-results markers)")
    p.add_argument("--profile", action="store_true",
                   help="record py-spy profiles of our servers (records: rate steps; collab: the edit phase)")
    return p.parse_args(argv)


def polling_config(args, rec: RecordsConfig) -> RecordsConfig:
    """The records scenario over Engine.IO long-polling: 500 clients in 10
    groups, lower rates (each delivery is an HTTP response)."""
    cfg = RecordsConfig(**{**rec.__dict__, "rates": list(rec.rates if args.rates else POLLING_RATES)})
    cfg.client = "polling"
    cfg.clients = min(args.polling_clients or 500, rec.clients)
    cfg.groups = max(1, min(10, cfg.clients))
    cfg.token_prefix = "bench-poll-"
    return cfg


# Updates/s per editor when --edit-rate is not given.
COLLAB_EDIT_RATE = 4.0
CLUSTER_EDIT_RATE = 1.0


def configs(args) -> tuple[RecordsConfig, CollabConfig, TrickleConfig]:
    rec = RecordsConfig()
    col = CollabConfig(edit_rate=args.edit_rate or COLLAB_EDIT_RATE)
    tri = TrickleConfig()
    if args.trickle_mib is not None:
        tri.mib = args.trickle_mib
    if args.quick:
        rec.clients, col.docs = 500, 100
        rec.rates = [2500, 5000, 10000, 20000, 30000]
        rec.step_seconds = 3.0
        col.edit_seconds, col.big_repeats = 5.0, 2
    if args.clients is not None:
        rec.clients = args.clients
    if args.groups is not None:
        rec.groups = args.groups
    rec.groups = max(1, min(rec.groups, rec.clients))
    if args.rates:
        rec.rates = args.rates
    rec.client = args.ws_client
    if args.collab_repeat is None:
        # An explicit --repeat sets both scenarios; by default collab gets one more round.
        args.collab_repeat = args.repeat if args.repeat is not None else (1 if args.quick else 3)
    if args.trickle_repeat is None:
        args.trickle_repeat = args.repeat if args.repeat is not None else (1 if args.quick else 3)
    if args.repeat is None:
        args.repeat = 1 if args.quick else 2
    args.repeat = max(1, args.repeat)
    if args.step_seconds is not None:
        rec.step_seconds = args.step_seconds
    if args.docs is not None:
        col.docs = args.docs
    if args.edit_seconds is not None:
        col.edit_seconds = args.edit_seconds
    if args.big_repeats is not None:
        col.big_repeats = args.big_repeats
    if args.settle_seconds is not None:
        rec.settle_seconds = col.settle_seconds = tri.settle_seconds = args.settle_seconds
    return rec, col, tri


def report_profile(profiler) -> None:
    if profiler is None or not profiler.path.exists():
        return
    summary = profile_summary.render(
        profile_summary.summarise(profile_summary.parse(profiler.path.read_text().splitlines()), top=15)
    )
    profiler.path.with_suffix(".summary.txt").write_text(summary + "\n")
    log(f"  py-spy profile of ours: {profiler.path}\n{summary}")


def round_order(targets: list[str], round_no: int) -> list[str]:
    """Who goes first alternates by round, so neither server always gets the
    (differently busy) first or second slot of the shared machine."""
    return list(targets) if round_no % 2 == 0 else list(reversed(targets))


def best_collab_run(runs: list[dict]) -> dict:
    """Of repeated collab runs, the one with the lowest p99 propagation that
    lost nothing; all of them stay in the JSON."""
    def p99(run):
        edit = run.get("edit") or {}
        if edit.get("p99") is None or edit.get("lost"):
            return float("inf")
        return edit["p99"]

    best = dict(min(runs, key=p99))
    if len(runs) > 1:
        best["rounds"] = [{k: v for k, v in run.items() if k != "rounds"} for run in runs]
        best["round_p99s"] = [None if p99(run) == float("inf") else p99(run) for run in runs]
    return best


async def run_rounds(scenario, targets, args, out, stamp, log, best, run_one) -> dict:
    """`args.repeat` rounds of one scenario (`args.collab_repeat` for
    collab, `args.trickle_repeat` for trickle), the servers taking turns to
    go first; each server's best round counts. Only our first round is
    profiled."""
    runs: dict[str, list[dict]] = {who: [] for who in targets}
    rounds = {"collab": args.collab_repeat, "trickle": args.trickle_repeat}.get(scenario, args.repeat)
    for round_no in range(rounds):
        if rounds > 1:
            log(f" round {round_no + 1} of {rounds}")
        for who in round_order(targets, round_no):
            profiler = None
            if args.profile and who == "ours" and round_no == 0:
                profiler = Profiler(out / f"profile-{scenario}-{stamp}.txt")
            runs[who].append(await run_one(who, profiler))
            report_profile(profiler)
    return {who: best(done) for who, done in runs.items()}


def best_run(runs: list[dict]) -> dict:
    """Of repeated records runs, the one with the highest headline rate (the
    others were disturbed more); all of them stay in the JSON."""
    def rate(run):
        return (run.get("headline") or {}).get("deliveries_per_s") or 0.0

    best = dict(max(runs, key=rate))
    if len(runs) > 1:
        best["rounds"] = [{k: v for k, v in run.items() if k != "rounds"} for run in runs]
        best["round_headlines"] = [rate(run) for run in runs]
    return best


def records_server(who: str, redis_url: str) -> Server:
    env = {"REDIS_URL": redis_url, "LOG_LEVEL": "WARNING"}
    if who == "ours":
        return Server("ours", [str(VENV_BIN / "channels-records")], free_port(), env)
    return Server("reference", ["node", str(BENCH / "reference" / "records.mjs")], free_port(), env, cwd=BENCH)


def collab_server(who: str, redis_url: str, rails_url: str) -> Server:
    env = {"REDIS_URL": redis_url, "PRIVATE_APP_URL": rails_url, "LOG_LEVEL": "WARNING"}
    if who == "ours":
        return Server("ours", [str(VENV_BIN / "channels-collab")], free_port(), env)
    return Server("reference", ["node", str(BENCH / "reference" / "collab.mjs")], free_port(), env, cwd=BENCH)


def collab_cluster(who: str, redis_url: str, rails_url: str, instances: int = 2) -> list[Server]:
    servers = [collab_server(who, redis_url, rails_url) for _ in range(instances)]
    for server in servers:
        if who == "reference":
            server.env["REFERENCE_CLUSTER"] = "1"
    return servers


def ensure_node_modules() -> None:
    if not (BENCH / "node_modules" / "@hocuspocus" / "extension-redis").exists():
        log("installing bench/ npm packages (npm ci)")
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=BENCH, check=True)


def start_rails_stub() -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, str(BENCH / "rails_stub.py"), str(port)])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=0.5).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("the stand-in Rails did not start")


class Profiler:
    """py-spy on a server process for the length of a `with` block."""

    def __init__(self, path: Path):
        self.path = path
        self.process = None

    def start(self, pid: int) -> None:
        spy = VENV_BIN / "py-spy"
        if not spy.exists():
            log("  --profile: py-spy is not installed in .venv (pip install py-spy); skipping")
            return
        self.process = subprocess.Popen(
            # --nonblocking: sampling must not pause the server it measures.
            [str(spy), "record", "--pid", str(pid), "--rate", "100", "--nonblocking", "--format", "raw",
             "--output", str(self.path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(2)  # SIGINT makes py-spy write its output
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()


async def main_async(args) -> int:
    rec_cfg, col_cfg, tri_cfg = configs(args)
    clu_cfg = dataclasses.replace(col_cfg, edit_rate=args.edit_rate or CLUSTER_EDIT_RATE)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(targets) - set(TARGETS)
    if unknown or not targets:
        log(f"unknown targets {sorted(unknown)}; choose from {TARGETS}")
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    ensure_node_modules()
    redis_server = start_local_redis()
    rails, rails_url = start_rails_stub()
    # Processes that serve the server under test, counted apart from "other load".
    helpers = (redis_server.process.pid, rails.pid)
    results: dict = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(
            ["python bench/run.py", *(shlex.quote(a) for a in sys.argv[1:] if a != "--update-readme")]
        ),
        "machine": {"cpus": __import__("os").cpu_count()},
    }
    started = time.monotonic()
    if args.scenario == "connects":
        try:
            log(f"connects: {rec_cfg.clients} websockets, {args.repeat} rounds")
            results["connects"] = await run_rounds(
                "connects", targets, args, out, stamp, log, median_run,
                lambda who, profiler: run_connects(records_server(who, redis_server.url), rec_cfg,
                                                   redis_server.url, log, profiler),
            )
        finally:
            rails.terminate()
            rails.wait()
            redis_server.cleanup()
        print()
        print(connects_table(results["connects"]))
        report.write_json(results, out / f"connects-{stamp}.json")
        return 1 if any(r.get("error") for r in results["connects"].values()) else 0
    try:
        if args.scenario in ("records", "all"):
            log(f"records: {rec_cfg.clients} clients in {rec_cfg.groups} groups, "
                f"steps {rec_cfg.rates} deliveries/s, {rec_cfg.step_seconds:g} s each")
            results["records"] = await run_rounds(
                "records", targets, args, out, stamp, log, best_run,
                lambda who, profiler: run_records(
                    records_server(who, redis_server.url), rec_cfg, redis_server.url, log, profiler,
                    helper_pids=helpers,
                ),
            )
        if args.scenario in ("polling", "all"):
            poll_cfg = polling_config(args, rec_cfg)
            log(f"polling: {poll_cfg.clients} long-polling clients in {poll_cfg.groups} groups, "
                f"steps {poll_cfg.rates} deliveries/s, {poll_cfg.step_seconds:g} s each")
            results["polling"] = await run_rounds(
                "polling", targets, args, out, stamp, log, best_run,
                lambda who, profiler: run_records(
                    records_server(who, redis_server.url), poll_cfg, redis_server.url, log, profiler,
                    helper_pids=helpers,
                ),
            )
        if args.scenario in ("collab", "all"):
            log(f"collab: {col_cfg.docs} documents, editor at {col_cfg.edit_rate:g} updates/s for "
                f"{col_cfg.edit_seconds:g} s, observer on each")
            results["collab"] = await run_rounds(
                "collab", targets, args, out, stamp, log, best_collab_run,
                lambda who, profiler: run_collab(
                    collab_server(who, redis_server.url, rails_url), col_cfg, log,
                    helper_pids=helpers, profiler=profiler,
                ),
            )
        if args.scenario in ("trickle", "all"):
            log(f"trickle: one {tri_cfg.mib:g} MiB binary frame in {tri_cfg.segment_bytes} B segments "
                f"{tri_cfg.gap_ms:g} ms apart, no token, against collab")
            results["trickle"] = await run_rounds(
                "trickle", targets, args, out, stamp, log, best_trickle_run,
                lambda who, profiler: run_trickle(
                    collab_server(who, redis_server.url, rails_url), tri_cfg, log,
                    helper_pids=helpers, profiler=profiler,
                ),
            )
        if args.scenario in ("cluster", "all"):
            log(f"collab cluster: 2 instances on one Redis, {clu_cfg.docs} documents, editor on one instance "
                f"and observer on the other, {clu_cfg.edit_rate:g} updates/s for {clu_cfg.edit_seconds:g} s")
            results["cluster"] = await run_rounds(
                "cluster", targets, args, out, stamp, log, best_collab_run,
                lambda who, profiler: run_collab_cluster(
                    collab_cluster(who, redis_server.url, rails_url), clu_cfg, log, redis_server.url,
                    redis_server.process.pid, helper_pids=(rails.pid,),
                ),
            )
    finally:
        rails.terminate()
        rails.wait()
        redis_server.cleanup()
    results["elapsed_s"] = time.monotonic() - started

    tables, markdown = [], [f"`{results['command']}` — {results['date']}, {results['machine']['cpus']} CPUs\n"]
    empty: dict = {}
    if "records" in results:
        r = results["records"]
        rows = report.records_rows(r.get("ours", empty), r.get("reference", empty))
        title = f"Records: {rec_cfg.clients} clients, {rec_cfg.groups} groups, ~{rec_cfg.payload_bytes} B payloads"
        tables.append(report.table(title, rows))
        markdown += [f"**{title}**\n", report.markdown_table(rows), ""]
    if "polling" in results:
        r = results["polling"]
        rows = report.records_rows(r.get("ours", empty), r.get("reference", empty), polling=True)
        title = (f"Records over long-polling: {poll_cfg.clients} clients, {poll_cfg.groups} groups, "
                 f"~{poll_cfg.payload_bytes} B payloads")
        tables.append(report.table(title, rows))
        markdown += [f"**{title}**\n", report.markdown_table(rows), ""]
    if "collab" in results:
        c = results["collab"]
        rows = report.collab_rows(c.get("ours", empty), c.get("reference", empty))
        title = (f"Collab: {col_cfg.docs} documents x 2 providers, "
                 f"{col_cfg.edit_rate:g} update/s per editor ({col_cfg.docs * col_cfg.edit_rate:,.0f} updates/s)")
        tables.append(report.table(title, rows))
        markdown += [f"**{title}**\n", report.markdown_table(rows), ""]
    if "trickle" in results:
        t = results["trickle"]
        rows = report.trickle_rows(t.get("ours", empty), t.get("reference", empty))
        title = (f"Trickle (collab): one {tri_cfg.mib:g} MiB frame in {tri_cfg.segment_bytes} B segments "
                 f"{tri_cfg.gap_ms:g} ms apart, best of {args.trickle_repeat}")
        tables.append(report.table(title, rows))
        markdown += [f"**{title}**\n", report.markdown_table(rows), ""]
    if "cluster" in results:
        c = results["cluster"]
        rows = report.cluster_rows(c.get("ours", empty), c.get("reference", empty))
        title = (f"Collab on 2 instances, one Redis: {col_cfg.docs} documents, writer and observer on "
                 "different instances (reference: Hocuspocus 3.4 + extension-redis 3.4.4)")
        tables.append(report.table(title, rows))
        markdown += [f"**{title}**\n", report.markdown_table(rows), ""]
    errors = [
        f"{scenario} {who}: {res['error']}"
        for scenario in ("records", "polling", "collab", "trickle", "cluster")
        for who, res in (results.get(scenario) or {}).items()
        if res.get("error")
    ]
    print()
    print("\n\n".join(tables))
    for line in errors:
        print(f"ERROR {line}")
    json_path = out / f"bench-{stamp}.json"
    report.write_json(results, json_path)
    (out / "latest.md").write_text("\n".join(markdown) + "\n")
    report.write_json(results, out / "latest.json")
    png = out / f"bench-{stamp}.png"
    if report.chart(results, png):
        (out / "latest.png").write_bytes(png.read_bytes())
        print(f"\nwrote {json_path}, {png}, {out / 'latest.md'} ({results['elapsed_s']:.0f} s)")
    else:
        print(f"\nwrote {json_path}, {out / 'latest.md'} (no chart: matplotlib missing)")
    if args.update_readme:
        update_readme("\n".join(markdown[1:]).strip(), results)
    return 1 if errors else 0


README_START, README_END = "<!-- bench-results:start -->", "<!-- bench-results:end -->"


def update_readme(tables: str, results: dict, readme: Path = ROOT / "docs" / "benchmarks.md") -> None:
    """Swap in the new tables and their date line; the rest of the page is others'."""
    text = readme.read_text()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        log(f"{readme.name} has no bench-results markers; not updated")
        return
    command = "make bench" + (f' BENCH_ARGS="{results["command"][len("python bench/run.py "):]}"'
                              if results["command"] != "python bench/run.py" else "")
    when = results["date"].replace("T", " ")[:16] + " UTC"
    body = f"`{command}`, {when}:\n\n{tables}\n"
    readme.write_text(text[: start + len(README_START)] + "\n" + body + text[end:])
    log(f"updated the results in {readme}")


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
