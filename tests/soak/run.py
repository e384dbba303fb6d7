"""`make soak`: the whole soak, start to verdict. `python -m tests.soak.run
--seconds 600 --seed 7` (or SOAK_SECONDS, SOAK_SEED, SOAK_BOTS_INSTANCES).

Phases: start everything and let the good clients connect; run the load,
the hostile traffic and the seeded faults for `seconds`; stop them, restart
every instance cleanly, let the clients settle; check the invariants and
print each as a figure, the last line a summary. A failure prints the seed
and the fault schedule, which replays it."""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import redis as redis_sync

from tests.integration.collab_helpers import RailsStandIn
from tests.soak.bots_load import BotsFigures, BotsLoad
from tests.soak.collab_load import CollabFigures, CollabLoad
from tests.soak.hostile import Hostile
from tests.soak.proxy import BalancingProxy
from tests.soak.records_load import RecordsFigures, RecordsLoad
from tests.soak.schedule import Fault, make_schedule, summary
from tests.soak.topology import Topology

# The stated bound on any service process's resident memory at any sample.
RSS_BOUND_MIB = {"records": 300, "collab": 300, "bots": 300}


@dataclass
class Config:
    seconds: float = 600.0
    seed: int = 7
    bots: int = 2
    records: int = 2
    collab: int = 3
    records_clients: int = 18
    records_rate: float = 25.0  # messages per second, all rooms
    collab_docs: int = 4
    collab_rate: float = 8.0  # edits per second
    bots_rate: float = 2.0
    hostile_rate: float = 4.0
    recovery_cap: int = 1000  # RECOVERY_MAX_EVENTS_PER_ROOM, the services' default
    synapse: object = None  # a running tests.integration.synapse.Synapse to use (else one is started)


@dataclass
class Result:
    config: Config
    faults: list[Fault] = field(default_factory=list)
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    records: RecordsFigures | None = None
    collab: CollabFigures | None = None
    bots: BotsFigures | None = None
    tracebacks: dict[str, list[str]] = field(default_factory=dict)
    rss: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    hostile: str = ""

    @property
    def ok(self) -> bool:
        return not self.all_problems()

    def all_problems(self) -> list[str]:
        """The few kinds first (harness, resources, bots, collab), the many
        (each records client room) last."""
        out = list(self.problems)
        for figures in (self.bots, self.collab, self.records):
            if figures is not None:
                out += figures.problems
        return out


class Loop:
    """The soak's own event loop on a thread: proxies and hostile traffic."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float | None = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def spawn(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, fn, *args):
        async def go():
            return fn(*args)
        return self.run(go())

    def stop(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


STARTED = time.monotonic()


def say(result: Result, line: str) -> None:
    line = line if line.startswith(("soak: seed", "  ")) else f"[{time.monotonic() - STARTED:5.0f}s] {line}"
    result.lines.append(line)
    print(line, flush=True)


def run(config: Config) -> Result:
    result = Result(config)
    counts = {"records": config.records, "collab": config.collab, "bots": config.bots}
    say(result, f"soak: seed {config.seed}, {config.seconds:.0f} s, instances {counts}")
    rails = RailsStandIn(slow_seconds=3.0).start()
    topo = Topology(counts, rails.url)
    loop = Loop()
    synapse_box: dict = {}
    records = collab = bots = hostile = None
    threads: list[threading.Thread] = []
    try:
        if config.bots and config.synapse is not None:
            synapse_box["given"] = config.synapse
        elif config.bots:
            def start_synapse():
                from tests.integration.synapse import start_homeserver
                try:
                    synapse_box["hs"] = start_homeserver()
                except Exception as exc:  # noqa: BLE001 - reported below
                    synapse_box["error"] = exc
            synapse_thread = threading.Thread(target=start_synapse, daemon=True)
            synapse_thread.start()
        topo.start_redis()
        topo.start_services()
        proxies = {name: BalancingProxy(name, topo.ports(name)) for name in ("records", "collab")}
        for proxy in proxies.values():
            loop.run(proxy.start())

        records = RecordsLoad(topo.redis_url, proxies["records"].port, config.records_clients,
                              config.records_rate, config.seed, config.recovery_cap)
        r = redis_sync.Redis.from_url(topo.redis_url)
        records.write_tokens(r)
        r.close()
        records.start_clients()
        collab = CollabLoad(proxies["collab"].port, config.collab_docs, config.collab_rate, config.seed)
        collab.start()
        junk = None
        if config.bots:
            if "given" not in synapse_box:
                synapse_thread.join(600)
                if "hs" not in synapse_box:
                    raise RuntimeError(f"Synapse could not start: {synapse_box.get('error')}")
            homeserver = synapse_box.get("given") or synapse_box["hs"]
            bots = BotsLoad(homeserver, topo.redis_url, config.bots_rate, config.seed)
            bots.setup()
            junk = bots.payload(bots.junk_alias, "@HTML@")
        pending = collab.settle(30)
        if pending:
            raise RuntimeError(f"collab editors never synced: {pending[:5]}")
        say(result, "soak: every process up, every client connected")

        faults = make_schedule(config.seed, config.seconds, counts, [b.name for b in records.clients])
        result.faults = faults
        say(result, f"soak: {summary(faults)} scheduled; load running")

        hostile = Hostile(proxies["records"].port, proxies["collab"].port, topo.redis_url, config.seed, junk,
                          config.hostile_rate)
        hostile_stop = asyncio.Event()
        hostile_future = loop.spawn(hostile.run(hostile_stop))
        t0 = time.monotonic()
        records.t0 = t0
        if bots:
            bots.t0 = t0
        loads = [threading.Thread(target=records.publish_loop, daemon=True),
                 threading.Thread(target=collab.edit_loop, daemon=True)]
        if bots:
            loads.append(threading.Thread(target=bots.publish_loop, daemon=True))
        for t in loads:
            t.start()

        cut_rng = random.Random(config.seed ^ 0xC07)
        for fault in faults:
            wait = t0 + fault.at - time.monotonic()
            while wait > 0:
                time.sleep(min(wait, 1.0))
                topo.sample_rss()
                wait = t0 + fault.at - time.monotonic()
            threads += act(fault, topo, proxies, records, collab, loop, cut_rng, result)
        while time.monotonic() < t0 + config.seconds:
            time.sleep(min(1.0, t0 + config.seconds - time.monotonic()))
            topo.sample_rss()

        # -- the end: stop the load, let every fault finish ---------------------
        records.stop_event.set()
        collab.stop_event.set()
        if bots:
            bots.stop_event.set()
        loop.loop.call_soon_threadsafe(hostile_stop.set)
        for t in loads + threads:
            t.join(90)
        hostile_future.result(60)
        result.hostile = hostile.figure()
        topo.wait_all_up()
        say(result, f"soak: load stopped at +{time.monotonic() - t0:.0f}s; {result.hostile}; settling")

        records.flush()
        # Short: a client still behind here has the clean restart to catch up.
        behind = records.wait_delivered(10)
        if behind:
            say(result, f"soak: {len(behind)} client rooms behind before the restart: {behind[:6]}")
        say(result, "soak: records settled")
        pending = collab.settle(30)
        say(result, f"soak: collab settled{'' if not pending else f' but for {pending[:4]}'}")
        if bots:
            bots.wait_posted(90)
        before = collab.contents()
        say(result, "soak: settled; restarting every instance cleanly")

        # -- every instance restarted cleanly ----------------------------------
        topo.sample_rss()
        restarts = [threading.Thread(target=restart, args=(inst,)) for inst in topo.instances]
        for t in restarts:
            t.start()
        for t in restarts:
            t.join(120)
        dead = topo.dead()
        if dead:
            result.problems.append(f"did not restart cleanly: {dead}")
        say(result, "soak: every instance restarted")

        records.flush()
        behind = records.wait_delivered(45)
        if behind:
            result.problems.append(f"records: {len(behind)} client rooms never caught up after the restart: {behind[:6]}")
        result.records = records.check()
        say(result, "soak: records checked")

        pending = collab.settle(45)
        if pending:
            result.problems.append(f"collab: providers never settled after the restart: {pending[:5]}")
        after = collab.contents()
        fresh = {doc: {"fresh": text} for doc, text in collab.fresh_contents().items()}
        result.collab = CollabFigures()
        collab.check([before, after, fresh], result.collab)
        say(result, "soak: collab checked; awareness of the dead editor next")
        collab.check_awareness(result.collab)
        for e in collab.editors:
            if e.errors:
                result.problems.append(f"collab editor {e.name}: {e.errors[:3]}")

        if bots:
            bots.wait_posted(30)
            result.bots = bots.check()

        topo.sample_rss()
        result.tracebacks = topo.tracebacks()
        for name, lines in result.tracebacks.items():
            result.problems.append(f"{name}: {len(lines)} traceback lines, first: {lines[0][:300]}")
        for inst in topo.instances:
            result.rss[inst.name] = inst.peak_rss_kib
            if inst.peak_rss_kib > RSS_BOUND_MIB[inst.service] * 1024:
                result.problems.append(f"{inst.name}: RSS {inst.peak_rss_kib // 1024} MiB above "
                                       f"{RSS_BOUND_MIB[inst.service]} MiB")
        if hostile.errors:
            result.problems.append(f"hostile traffic harness errors: {dict(hostile.errors)}")
        say(result, hostile.greedy_figure(rails))
        result.problems += hostile.check(rails)
    except Exception as exc:  # noqa: BLE001 - any failure of the run is reported as one
        import traceback

        result.problems.append(f"soak aborted: {type(exc).__name__}: {exc}")
        traceback.print_exc()
    finally:
        if records is not None and not result.ok:
            import json
            import tempfile
            path = tempfile.mkstemp(prefix=f"soak-{config.seed}-records-", suffix=".json")[1]
            with open(path, "w") as out:
                json.dump({**records.dump(), "_problems": result.all_problems()}, out)
            result.problems.append(f"records timelines: {path}")
        for thing in (records, collab):
            if thing is not None:
                try:
                    thing.close()
                except Exception as exc:  # noqa: BLE001 - teardown goes on
                    print(f"soak: closing {type(thing).__name__} failed: {exc}", file=sys.stderr)
        topo.stop()
        if "hs" in synapse_box:
            synapse_box["hs"].stop()
        rails.stop()
        loop.stop()
    report(result, topo)
    return result


def restart(inst) -> None:
    inst.process.stop(timeout=20)
    inst.process.start(ready=True, timeout=60)
    inst.restarts += 1


def act(fault: Fault, topo: Topology, proxies, records: RecordsLoad, collab: CollabLoad, loop: Loop,
        rng: random.Random, result: Result) -> list[threading.Thread]:
    started: list[threading.Thread] = []
    if fault.kind in ("kill", "term"):
        inst = topo.take_down(fault.target)
        if inst is None:
            result.skipped.append(str(fault))
            return started
        sig = signal.SIGKILL if fault.kind == "kill" else signal.SIGTERM
        started.append(threading.Thread(target=topo.hurt, args=(inst, sig, fault.seconds), daemon=True))
    elif fault.kind == "redis":
        started.append(threading.Thread(target=topo.redis_crash, args=(fault.seconds,), daemon=True))
    elif fault.kind == "cut":
        loop.call(proxies[fault.target].cut, fault.seconds, rng)
    elif fault.kind == "stall":
        loop.spawn(proxies[fault.target].stall(fault.seconds))
    elif fault.kind == "away":
        name, _, how = fault.target.partition("/")
        if how == "net":
            loop.call(proxies["records"].block, records.by_name[name].address, fault.seconds)
        else:
            records.away(name, fault.seconds)
    elif fault.kind == "ghost":
        collab.kill_ghost()
    for t in started:
        t.start()
    result.done.append(str(fault))
    return started


def _n(x: int) -> str:
    return f"{x:,}"


def report(result: Result, topo: Topology) -> None:
    c = result.config
    rec, col, bot = result.records, result.collab, result.bots
    done = [f for f in result.faults if str(f) in set(result.done)]
    if rec:
        say(result, f"records: {_n(rec.once)}/{_n(rec.expected)} delivered once, {rec.missing} missing, "
                    f"{rec.doubled} doubled, {rec.disordered} out of order; {rec.reconnects} reconnects "
                    f"({rec.recovered} recovered, {rec.not_recovered} not, {rec.not_recovered_allowed} "
                    f"of those past the cap); {rec.foreign} foreign events")
    if col:
        say(result, f"collab: {_n(col.kept)}/{_n(col.acked_edits)} acked edits kept ({_n(col.edits)} made), "
                    f"{col.lost} lost; {'converged' if col.converged else 'NOT converged'} over {col.readers} "
                    f"readers; {col.ghost_entries} stale awareness entries")
    if bot:
        say(result, f"bots: {_n(bot.once)}/{_n(bot.expected)} posted once, {bot.missing} missing, "
                    f"{bot.doubled} doubled, {bot.disordered} out of order ({c.bots} instances)")
    if result.rss:
        worst = max(result.rss.items(), key=lambda kv: kv[1])
        say(result, f"resources: peak RSS {worst[1] // 1024} MiB ({worst[0]}), bound "
                    f"{max(RSS_BOUND_MIB.values())} MiB; every instance: "
                    + ", ".join(f"{k} {v // 1024}" for k, v in sorted(result.rss.items())))
    tracebacks = sum(len(v) for v in result.tracebacks.values())
    problems = result.all_problems()
    if problems:
        say(result, f"SOAK FAILED (seed {c.seed}, {c.seconds:.0f} s): {len(problems)} problems")
        for p in problems[:40]:
            say(result, f"  - {p}")
        say(result, f"fault schedule (replay: make soak SOAK_SEED={c.seed} SOAK_SECONDS={c.seconds:.0f} "
                    f"SOAK_BOTS_INSTANCES={c.bots}):")
        for f in result.faults:
            mark = " (skipped: its service had an instance down)" if str(f) in set(result.skipped) else ""
            say(result, f"  {f}{mark}")
        say(result, "service logs: " + " ".join(topo.log_paths()))
    parts = [f"soak: seed {c.seed}, {c.seconds:.0f} s, {summary(done)}"]
    if rec:
        parts.append(f"records {_n(rec.once)}/{_n(rec.expected)} delivered once")
    if col:
        parts.append(f"collab {_n(col.kept)} acked edits kept" + ("" if not col.lost else f" ({col.lost} lost)"))
    if bot:
        parts.append(f"bots {_n(bot.once)}/{_n(bot.expected)} once")
    parts.append(f"{tracebacks} tracebacks")
    say(result, ", ".join(parts) + ("" if not problems else " - FAILED"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=float(os.environ.get("SOAK_SECONDS") or 600))
    p.add_argument("--seed", type=int, default=int(os.environ.get("SOAK_SEED") or 7))
    p.add_argument("--bots", type=int, default=int(os.environ.get("SOAK_BOTS_INSTANCES") or 2),
                   help="bots instances (0: no bots, no Synapse)")
    args = p.parse_args(argv)
    result = run(Config(seconds=args.seconds, seed=args.seed, bots=args.bots))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
