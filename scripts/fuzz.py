"""`make fuzz`: the property tests (test_properties*.py beside each
package's tests) with random seeds and many examples, for a time budget.

Round after round until the budget is spent, each property file runs in
its own pytest under the "fuzz" hypothesis profile (conftest.py) with a
fresh seed. In the first round every file gets an equal share of the
budget (a file cut off at its share is no failure), so all of them are
fuzzed however short the run; later rounds take what is left. A failure
stops the run and prints the file, the seed and the command that replays
it; hypothesis also keeps the failing example in .hypothesis/ and tries it
first next time.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def property_files() -> list[Path]:
    return sorted([*ROOT.glob("libs/*/tests/test_properties*.py"), *ROOT.glob("services/*/tests/test_properties*.py")])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("FUZZ_SECONDS", "300")))
    parser.add_argument("--seed", type=int, default=None, help="the first round's seed (default: random)")
    parser.add_argument("--examples", type=int, default=None, help="examples per property and round")
    parser.add_argument("files", nargs="*", type=Path, help="property files (default: all of them)")
    args = parser.parse_args(argv)
    files = [f.resolve() for f in args.files] or property_files()
    seeds = random.Random(args.seed)
    env = {**os.environ, "HYPOTHESIS_PROFILE": "fuzz"}
    if args.examples is not None:
        env["FUZZ_EXAMPLES"] = str(args.examples)
    start = time.monotonic()
    deadline = start + args.seconds
    share = args.seconds / len(files)
    runs = completed = 0
    round_no = 0
    while time.monotonic() < deadline:
        round_no += 1
        for path in files:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            seed = seeds.randrange(2**32)
            name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
            command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout=0",
                       f"--hypothesis-seed={seed}", str(name)]
            runs += 1
            try:
                result = subprocess.run(command, check=False, cwd=ROOT, env=env, capture_output=True, text=True,
                                        timeout=min(left, share) if round_no == 1 else left)
            except subprocess.TimeoutExpired:
                continue  # its share of the time is up: nothing found meanwhile
            if result.returncode != 0:
                sys.stdout.write(result.stdout[-20000:])
                sys.stderr.write(result.stderr[-5000:])
                print(f"fuzz: FAILED {name} with seed {seed} after {time.monotonic() - start:.0f} s; replay:\n"
                      f"  HYPOTHESIS_PROFILE=fuzz {' '.join(command[:1])} -m pytest {name} --hypothesis-seed={seed}")
                return 1
            completed += 1
    print(f"fuzz: {time.monotonic() - start:.0f} s, {len(files)} property files, {runs} runs "
          f"({completed} to the end, {round_no} rounds), no failure")
    return 0


if __name__ == "__main__":
    sys.exit(main())
