"""What a server process costs, read from /proc: CPU seconds and resident memory."""

from __future__ import annotations

import os
import time

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (all its threads) in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    # The command name may contain spaces; fields resume after its ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def settled_rss(pid: int, samples: int = 5, interval: float = 0.2) -> int:
    """Median of a few samples, so one allocation burst does not decide."""
    values = []
    for _ in range(samples):
        values.append(rss_bytes(pid))
        time.sleep(interval)
    values.sort()
    return values[len(values) // 2]


def machine_busy_seconds() -> float:
    """CPU seconds all processes of the machine have used since boot."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


class OtherLoad:
    """How much CPU processes outside the benchmark took during a window, in
    cores: the other engineers' and CI jobs on a shared machine skew figures,
    and the report says so instead of hiding it."""

    def __init__(self, bench_pids: list[int]):
        self.pids = [pid for pid in bench_pids if pid]
        self.start()

    def _ours(self) -> float:
        total = 0.0
        for pid in self.pids:
            try:
                total += cpu_seconds(pid)
            except (FileNotFoundError, ProcessLookupError):
                pass
        return total

    def start(self) -> None:
        self._t, self._machine, self._bench = time.monotonic(), machine_busy_seconds(), self._ours()

    def cores(self) -> float:
        wall = max(1e-6, time.monotonic() - self._t)
        other = (machine_busy_seconds() - self._machine) - (self._ours() - self._bench)
        return max(0.0, other / wall)
