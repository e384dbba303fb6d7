"""The processes of the soak and how to hurt them: one Redis (appendonly
yes, restarted from its AOF), the services' instances on fixed ports (so a
restarted one takes its place behind the proxy), the Rails stand-in and a
Synapse. Nothing here decides when: schedule.py does, faults.py acts."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from channels_dev.redis_server import LocalRedis, start_local_redis

from tests.integration.records_support import APP_ORIGIN
from tests.support import ServiceProcess, free_port

TRACEBACK = re.compile(r"Traceback \(most recent call last\)")


def service_env(service: str, redis_url: str, rails_url: str) -> dict:
    base = {"REDIS_URL": redis_url, "LOG_LEVEL": "INFO", "SHUTDOWN_GRACE_SECONDS": "2"}
    if service == "records":
        return {**base, "PUBLIC_APP_URL": APP_ORIGIN}
    if service == "collab":
        return {**base, "PRIVATE_APP_URL": rails_url, "COLLAB_TIMEOUT_MS": "30000",
                "COLLAB_DEBOUNCE_MS": "300", "COLLAB_MAX_DEBOUNCE_MS": "1000",
                "COLLAB_AUTH_TIMEOUT_SECONDS": "2"}
    return {**base, "BOTS_RETRY_BASE_SECONDS": "0.1", "BOTS_RETRY_MAX_SECONDS": "2"}


@dataclass
class Instance:
    """One instance of a service; restarted on its own port, appending to
    its own log."""

    service: str
    index: int
    process: ServiceProcess
    down: bool = False
    peak_rss_kib: int = 0
    restarts: int = 0

    @property
    def name(self) -> str:
        return f"{self.service}{self.index}"

    def rss_kib(self) -> int:
        proc = self.process.process
        if proc is None or proc.poll() is not None:
            return 0
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        except OSError:
            return 0
        return 0


@dataclass
class Topology:
    counts: dict[str, int]
    rails_url: str
    redis: LocalRedis | None = None
    instances: list[Instance] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    redis_down: bool = False

    def start_redis(self) -> None:
        self.redis = start_local_redis(extra_args=("--appendonly", "yes", "--appendfsync", "everysec"))

    @property
    def redis_url(self) -> str:
        return self.redis.url

    def start_services(self) -> None:
        """Every instance, started in parallel (each waits for its /healthz)."""
        for service in ("records", "collab", "bots"):
            for i in range(self.counts[service]):
                process = ServiceProcess(f"channels-{service}", free_port(),
                                         service_env(service, self.redis_url, self.rails_url))
                self.instances.append(Instance(service, i, process))
        threads = [threading.Thread(target=inst.process.start, kwargs={"ready": True, "timeout": 60})
                   for inst in self.instances]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for inst in self.instances:
            if inst.process.process is None or inst.process.process.poll() is not None:
                raise RuntimeError(f"{inst.name} did not start:\n{inst.process.logs()[-2000:]}")

    def of(self, service: str) -> list[Instance]:
        return [i for i in self.instances if i.service == service]

    def ports(self, service: str) -> list[int]:
        return [i.process.port for i in self.of(service)]

    def instance(self, name: str) -> Instance:
        return next(i for i in self.instances if i.name == name)

    # -- faults ------------------------------------------------------------------

    def take_down(self, name: str) -> Instance | None:
        """Mark `name` down unless it or another instance of its service is
        already down (one instance at a time: the soak checks what survives
        the death of any one instance). None: skipped."""
        with self.lock:
            inst = self.instance(name)
            if any(i.down for i in self.of(inst.service)):
                return None
            inst.down = True
            return inst

    def hurt(self, inst: Instance, sig: int, pause: float) -> None:
        """Signal the instance, wait for it to exit, restart it after `pause`."""
        proc = inst.process.process
        self.sample_rss()
        try:
            if proc and proc.poll() is None:
                proc.send_signal(sig)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            inst.process._log.close()
            time.sleep(pause)
            inst.process.start(ready=False, timeout=60)
            inst.restarts += 1
        finally:
            with self.lock:
                inst.down = False

    def redis_crash(self, pause: float) -> None:
        with self.lock:
            if self.redis_down:
                return
            self.redis_down = True
        try:
            self.redis.process.send_signal(signal.SIGKILL)
            self.redis.process.wait()
            time.sleep(pause)
            self.redis.start(timeout=60)  # same port, same directory: the AOF is replayed
        finally:
            with self.lock:
                self.redis_down = False

    # -- the end -----------------------------------------------------------------

    def wait_all_up(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                busy = self.redis_down or any(i.down for i in self.instances)
            if not busy:
                return
            time.sleep(0.1)
        raise RuntimeError("some process is still restarting")

    def restart_cleanly(self, service: str) -> None:
        """SIGTERM and restart every instance of `service`, one after another."""
        for inst in self.of(service):
            inst.process.stop(timeout=20)
            inst.process.start(ready=True, timeout=60)
            inst.restarts += 1

    def sample_rss(self) -> None:
        for inst in self.instances:
            inst.peak_rss_kib = max(inst.peak_rss_kib, inst.rss_kib())

    def tracebacks(self) -> dict[str, list[str]]:
        found = {}
        for inst in self.instances:
            lines = [line for line in inst.process.logs().splitlines() if TRACEBACK.search(line)]
            if lines:
                found[inst.name] = lines
        return found

    def dead(self) -> list[str]:
        return [i.name for i in self.instances
                if i.process.process is None or i.process.process.poll() is not None]

    def stop(self) -> None:
        for inst in self.instances:
            try:
                inst.process.stop(timeout=10)
            except Exception:  # noqa: BLE001 - teardown goes on: the process is killed
                if inst.process.process is not None and inst.process.process.poll() is None:
                    inst.process.process.kill()
        if self.redis is not None:
            self.redis.cleanup()

    def log_paths(self) -> list[str]:
        return [str(i.process.log_path) for i in self.instances]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False
