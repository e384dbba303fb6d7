"""Each service is deployable on its own, the way its image builds it: the
Dockerfile's sources (filtered by .dockerignore) in a fresh, empty virtual
environment, its own pip commands (the hashed lock, then our two packages
--no-deps, then `pip check`), then the console script (the
image's entrypoint) starts against real Redis, answers /healthz, satisfies
the image's HEALTHCHECK command, and stops cleanly on SIGTERM.

The three installs run in parallel, once per module, reusing pip's cache."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.integration.deploy_support import (
    DEPLOY,
    ROOT,
    SERVICES,
    Dockerfile,
    stage_build_sources,
)
from tests.support import free_port, wait_for

pytestmark = pytest.mark.slow

INSTALL_TIMEOUT = 150


def _app_exists(service: str) -> bool:
    return (ROOT / "services" / service / "src" / f"channels_{service}" / "app.py").exists()


def _clean_env(**extra: str) -> dict[str, str]:
    """No trace of the development venv or of the repository on sys.path."""
    keep = {k: v for k, v in os.environ.items()
            if k in ("HOME", "LANG", "LC_ALL", "TMPDIR") or k.startswith("PIP_")}
    return {**keep, "PATH": "/usr/local/bin:/usr/bin:/bin", "PIP_DISABLE_PIP_VERSION_CHECK": "1", **extra}


@pytest.fixture(scope="module")
def installs(tmp_path_factory):
    base = tmp_path_factory.mktemp("images")
    started = {}
    for service in SERVICES:
        if not _app_exists(service):
            continue
        root = base / service
        dockerfile = Dockerfile.load(DEPLOY / f"{service}.Dockerfile")
        stage_build_sources(dockerfile, root)
        venv = root / "venv"
        # The development pip drives the fresh venv (`--python`): no pip
        # bootstrap per venv; `--no-compile` only skips writing .pyc files.
        pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin/python")]
        # Every pip command of the image, in order: the hashed lock, our two
        # packages --no-deps, `pip check`.
        steps = [f"{shlex.quote(sys.executable)} -m venv --without-pip {shlex.quote(str(venv))}"]
        for command in dockerfile.pip_commands():
            args = [a.replace("/src/", f"{root}/src/", 1) for a in command]
            if args[0] == "install":
                args[1:1] = ["-q", "--no-compile"]
            steps.append(shlex.join(pip + args))
        script = " && ".join(steps)
        log = open(root / "install.log", "wb")  # noqa: SIM115 -- held until the install ends
        proc = subprocess.Popen(["bash", "-c", script], stdout=log, stderr=subprocess.STDOUT,
                                env=_clean_env(), cwd=root)
        started[service] = (proc, root, log)
    yield started
    for proc, _, log in started.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def _installed(installs, service: str) -> Path:
    if service not in installs:
        pytest.skip(f"services/{service} has no app.py yet: nothing to deploy")
    proc, root, _ = installs[service]
    try:
        code = proc.wait(INSTALL_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"pip install for {service} took over {INSTALL_TIMEOUT}s")
    log = (root / "install.log").read_text(errors="replace")
    assert code == 0, f"pip install failed for {service}:\n{log[-4000:]}"
    return root / "venv" / "bin"


def _healthcheck(bin_dir: Path, port: int, default_port: int) -> int:
    return subprocess.run(
        [str(bin_dir / "channels-healthcheck"), "--port", str(default_port), "--timeout", "2"],
        env=_clean_env(PORT=str(port)), capture_output=True, timeout=20, check=False,
    ).returncode


@pytest.mark.parametrize("service", SERVICES)
def test_service_installs_alone_and_serves_health(service, installs, redis_url, tmp_path):
    bin_dir = _installed(installs, service)

    listed = subprocess.run([sys.executable, "-m", "pip", "--python", str(bin_dir / "python"), "list",
                             "--format", "json"], capture_output=True, text=True, env=_clean_env(),
                            check=True, timeout=60).stdout
    packages = {p["name"].lower() for p in json.loads(listed)}
    ours = {p for p in packages if p.startswith("channels-")}
    assert ours == {"channels-common", f"channels-{service}"}, ours

    port = free_port()
    env = _clean_env(
        REDIS_URL=redis_url, PORT=str(port), HOST="127.0.0.1", RAILS_ENV="production",
        # collab's Rails callback target; nothing asks it in this test.
        PRIVATE_APP_URL="http://127.0.0.1:9", PUBLIC_APP_URL="http://127.0.0.1:9",
    )
    log_path = tmp_path / f"{service}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(bin_dir / f"channels-{service}")], env=env, cwd=tmp_path,
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            def healthy():
                if proc.poll() is not None:
                    raise AssertionError(f"channels-{service} exited {proc.returncode}:\n"
                                         f"{log_path.read_text(errors='replace')[-3000:]}")
                try:
                    return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_for(healthy, 30, 0.1, what=f"channels-{service} /healthz")
            # The image's HEALTHCHECK command, from the same venv; PORT wins over the default.
            assert _healthcheck(bin_dir, port, default_port=1) == 0
            wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200,
                     30, 0.1, what=f"channels-{service} /readyz against real Redis")

            proc.send_signal(signal.SIGTERM)
            code = proc.wait(20)
            logs = log_path.read_text(errors="replace")
            # A graceful stop exits 0 (an orchestrator reads 143 as a crash).
            assert code == 0, f"SIGTERM exit {code}:\n{logs[-3000:]}"
            assert "Application shutdown complete" in logs, logs[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    # Down: the same probe now reports unhealthy.
    assert _healthcheck(bin_dir, port, default_port=1) == 1
    assert "Traceback" not in log_path.read_text(errors="replace")
