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
