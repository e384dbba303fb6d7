"""Each lock installs on a fresh machine exactly as the project installs it:
a venv made by `python3.11 -m venv` (so with the pip that Python bundles,
never upgraded), then the commands themselves, read from where they live
(the Makefile's recipe for .venv, each Dockerfile's pip commands), run with
that venv's pip. Such a pip resolves an extra like `python-socks[asyncio]`
against the index unless told --no-deps; a newer release upstream then
breaks a hash-checked install (issue 20). So this fails as soon as an install
asks the index what to resolve.

The four installs run in parallel, once per module, with a pip cache kept
between runs (downloads are served from it; the hashes are still checked)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.utils import canonicalize_name

from tests.integration.deploy_support import (
    DEPLOY,
    ROOT,
    SERVICES,
    Dockerfile,
    lock_pins,
    stage_build_sources,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

LOCKS = ("dev", *SERVICES)
INSTALL_TIMEOUT = 600
PYTHON = "python3.11"


def _pip_cache() -> str:
    if os.environ.get("PIP_CACHE_DIR"):
        return os.environ["PIP_CACHE_DIR"]
    return str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pip")


def _env() -> dict[str, str]:
    """This machine's pip settings (PIP_*) and nothing of the development
    venv; caching on, whatever the caller's environment says."""
    keep = {k: v for k, v in os.environ.items()
            if k in ("HOME", "LANG", "LC_ALL", "TMPDIR") or (k.startswith("PIP_") and k != "PIP_NO_CACHE_DIR")}
    # No byte-compiling (most of the time, and nothing that resolves).
    return {**keep, "PATH": "/usr/local/bin:/usr/bin:/bin", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "PIP_CACHE_DIR": _pip_cache(), "PIP_NO_COMPILE": "1"}


def _python311() -> str:
    found = shutil.which(PYTHON)
    assert found, f"{PYTHON} is needed (Debian: apt-get install python3.11-venv)"
    # The interpreter itself, not a version manager's shim.
    return subprocess.run([found, "-c", "import sys; print(sys.executable)"], capture_output=True, text=True,
                          check=True, timeout=60).stdout.strip()


def _makefile_commands(venv: Path) -> list[str]:
    """The recipe `make install` runs for .venv, here for `venv`."""
    done = subprocess.run(["make", "-s", "-n", "-B", f"VENV={venv}", f"PYTHON={PYTHON}", f"{venv}/bin/.installed"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    lines = [ln for ln in done.stdout.splitlines() if ln.strip()]
    assert any("--require-hashes" in ln and "locks/dev.txt" in ln for ln in lines), lines
    return lines


def _dockerfile_commands(service: str, root: Path, venv: Path) -> list[str]:
    """The Dockerfile's pip commands in order, /opt/venv and /src/ mapped here."""
    dockerfile = Dockerfile.load(DEPLOY / f"{service}.Dockerfile")
    stage_build_sources(dockerfile, root)
    commands = []
    for args in dockerfile.pip_commands():
        args = [a.replace("/src/", f"{root}/src/", 1) if a.startswith("/src/") else a for a in args]
        commands.append(shlex.join([str(venv / "bin" / "pip"), *args]))
    assert any("--require-hashes" in c and f"locks/{service}.txt" in c for c in commands), commands
    return commands


@pytest.fixture(scope="module")
def installs(tmp_path_factory):
    python = _python311()
    bundled = subprocess.run([python, "-c", "import ensurepip; print(ensurepip.version())"],
                             capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    base = tmp_path_factory.mktemp("locks")
    started = {}
    for lock in LOCKS:
        root = base / lock
        root.mkdir()
        venv = root / "venv"
        if lock == "dev":
            commands, cwd = _makefile_commands(venv), ROOT
        else:
            commands, cwd = _dockerfile_commands(lock, root, venv), root
        script = " && ".join([shlex.join([python, "-m", "venv", str(venv)]), *commands])
        log = open(root / "install.log", "wb")  # noqa: SIM115 -- held until the install ends
        proc = subprocess.Popen(["bash", "-c", script], stdout=log, stderr=subprocess.STDOUT,
                                env=_env(), cwd=cwd)
        started[lock] = (proc, root, log, script)
    yield bundled, started
    for proc, _, log, _ in started.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


# PEP 508's marker environment, computed by the venv's own interpreter.
_MARKER_ENV = """
import json, os, platform, sys
v = sys.implementation.version
iv = f"{v.major}.{v.minor}.{v.micro}" + ("" if v.releaselevel == "final" else v.releaselevel[0] + str(v.serial))
print(json.dumps({
    "implementation_name": sys.implementation.name, "implementation_version": iv, "os_name": os.name,
    "platform_machine": platform.machine(), "platform_release": platform.release(),
    "platform_system": platform.system(), "platform_version": platform.version(),
    "python_full_version": platform.python_version(),
    "platform_python_implementation": platform.python_implementation(),
    "python_version": ".".join(platform.python_version_tuple()[:2]), "sys_platform": sys.platform}))
"""


def _pinned_for(lock: str, venv: Path) -> dict[str, str]:
    """{name: version} the lock pins for the venv's interpreter."""
    env = json.loads(subprocess.run([str(venv / "bin/python"), "-c", _MARKER_ENV], capture_output=True,
                                    text=True, timeout=60, check=True).stdout)
    pins = {}
    for name, entries in lock_pins(ROOT / "locks" / f"{lock}.txt").items():
        for version, marker, _ in entries:
            if not marker or Marker(marker).evaluate(env):
                pins[name] = version
    return pins


@pytest.mark.parametrize("lock", LOCKS)
def test_lock_installs_with_the_pip_python_bundles(lock, installs):
    bundled, started = installs
    proc, root, _, script = started[lock]
    try:
        code = proc.wait(INSTALL_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"installing locks/{lock}.txt took over {INSTALL_TIMEOUT}s")
    output = (root / "install.log").read_text(errors="replace")
    assert code == 0, f"locks/{lock}.txt does not install as the project installs it:\n{script}\n{output[-4000:]}"
    venv = root / "venv"

    listed = subprocess.run([str(venv / "bin/pip"), "list", "--format", "json"], capture_output=True,
                            text=True, env=_env(), check=True, timeout=60).stdout
    installed = {canonicalize_name(p["name"]): p["version"] for p in json.loads(listed)}
    # The installer that ran the lock is the one Python 3.11 bundles (unless
    # the lock itself pins pip).
    pins = _pinned_for(lock, venv)
    assert installed["pip"] == pins.get("pip", bundled)
    # Exactly the lock: every distribution is pinned there at that version,
    # besides the venv's own installers and our packages.
    ours = {n for n in installed if n.startswith("channels-")}
    expected_ours = ({"channels-common", "channels-dev", *(f"channels-{s}" for s in SERVICES)} if lock == "dev"
                     else {"channels-common", f"channels-{lock}"})
    assert ours == expected_ours
    unlocked = {n: v for n, v in installed.items()
                if n not in ours and n not in ("pip", "setuptools", "wheel") and pins.get(n) != v}
    assert unlocked == {}, f"installed but not as locks/{lock}.txt pins them: {unlocked}"
    # ... and the whole lock is there (pip check ran in the script, too).
    missing = {n for n in pins if n not in installed and n not in ("pip", "setuptools", "wheel")}
    assert missing == set(), missing
