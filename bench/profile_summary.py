"""Where the time goes: a summary of a py-spy `--format raw` profile
(collapsed stacks, one `frame;frame;... count` per line).

    python bench/profile_summary.py bench/results/profile-records-....txt [--top 25]

Prints the share of samples per package (by the leaf frame), the functions
with the most self time, and the functions with the most inclusive time.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]+)(?::\d+)?\)$")


def parse(lines) -> list[tuple[list[tuple[str, str]], int]]:
    """[(frames root..leaf as (function, file)), count]"""
    stacks = []
    for line in lines:
        line = line.rstrip("\n")
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = []
        for raw in stack.split(";"):
            m = FRAME.match(raw)
            frames.append((m["func"], m["file"]) if m else (raw, ""))
        stacks.append((frames, int(count)))
    return stacks


def package(file: str) -> str:
    """The package a frame's file belongs to: its first path part."""
    if not file:
        return "?"
    head = file.split("/", 1)[0]
    return head.removesuffix(".py")


def summarise(stacks, top: int = 20) -> dict:
    total = sum(count for _, count in stacks) or 1
    by_package: Counter = Counter()
    self_time: Counter = Counter()
    inclusive: Counter = Counter()
    for frames, count in stacks:
        leaf_func, leaf_file = frames[-1]
        by_package[package(leaf_file)] += count
        self_time[f"{leaf_func} ({leaf_file})"] += count
        for name in {f"{func} ({file})" for func, file in frames}:
            inclusive[name] += count

    def share(counter):
        return [(name, count / total) for name, count in counter.most_common(top)]

    # Frames on (nearly) every stack, the event loop's run() and its callers, say nothing.
    roots = {name for name, count in inclusive.items() if count >= 0.97 * total}
    for name in roots:
        del inclusive[name]
    return {
        "samples": total,
        "packages": share(by_package),
        "self": share(self_time),
        "inclusive": share(inclusive),
    }


def render(summary: dict) -> str:
    out = [f"{summary['samples']} samples"]
    for title, key in (("self time by package", "packages"), ("self time by function", "self"),
                       ("inclusive time by function", "inclusive")):
        out.append(f"\n{title}:")
        out.extend(f"  {value:6.1%}  {name}" for name, value in summary[key])
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("profile", type=Path)
    p.add_argument("--top", type=int, default=20)
    args = p.parse_args(argv)
    with args.profile.open() as f:
        print(render(summarise(parse(f), args.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
