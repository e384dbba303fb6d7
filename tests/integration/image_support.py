"""The built images for the image tests: deploy/images/build.py (what `make
images` runs) as a module and as a command, each image's own configuration
(entrypoint, user, environment, ports, HEALTHCHECK), and a process started
from it on the host network: `buildah run --isolation chroot` where buildah
built it, `docker run` where a Docker engine did."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.integration.deploy_support import DEPLOY

BUILD_SCRIPT = DEPLOY / "images" / "build.py"


def build_module():
    """deploy/images/build.py imported (it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location("channels_images_build", BUILD_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return sys.modules[spec.name]


@dataclass
class ImageConfig:
    ref: str
    entrypoint: list[str]
    user: str
    env: dict[str, str]
    exposed: set[str]
    healthcheck: list[str]

    @classmethod
    def inspect(cls, engine: str, ref: str) -> ImageConfig:
        if engine == "docker":
            (raw,) = json.loads(subprocess.run(["docker", "image", "inspect", ref], capture_output=True,
                                               text=True, check=True, timeout=60).stdout)
            config = raw["Config"]
        else:
            raw = json.loads(subprocess.run(["buildah", "inspect", "--type", "image", ref], capture_output=True,
                                            text=True, check=True, timeout=60).stdout)
            config = raw["Docker"]["config"]
        env = dict(item.split("=", 1) for item in config.get("Env") or [])
        return cls(ref, list(config.get("Entrypoint") or []), config.get("User", ""), env,
                   set((config.get("ExposedPorts") or {}).keys()), list((config.get("Healthcheck") or {}).get("Test", [])))


class Running:
    """One image's entrypoint running as the image's USER on the host
    network, with `env` on top of the image's own environment."""

    def __init__(self, engine: str, config: ImageConfig, env: dict[str, str], name: str):
        self.engine, self.config, self.env, self.name = engine, config, env, name
        self.log_path = Path(tempfile.mkstemp(prefix=f"{name}-", suffix=".log")[1])
        self._log = open(self.log_path, "wb")  # noqa: SIM115 -- closed by stop()
        env_args = [f"--env={k}={v}" for k, v in env.items()]
        if engine == "docker":
            self.container = name
            subprocess.run(["docker", "run", "-d", "--name", name, "--network", "host", "--user", config.user,
                            *env_args, config.ref], check=True, capture_output=True, timeout=120)
            self.process = subprocess.Popen(["docker", "logs", "-f", name], stdout=self._log,
                                            stderr=subprocess.STDOUT)
        else:
            self.container = subprocess.run(["buildah", "from", "--name", name, config.ref], capture_output=True,
                                            text=True, check=True, timeout=120).stdout.strip()
            # Its own process group: stop() signals the service, not only buildah.
            self.process = subprocess.Popen(
                ["buildah", "run", "--isolation", "chroot", "--user", config.user, *env_args, self.container,
                 "--", *config.entrypoint],
                stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def exited(self) -> int | None:
        return self.process.poll() if self.engine != "docker" else self._docker_exit()

    def _docker_exit(self) -> int | None:
        state = subprocess.run(["docker", "inspect", "-f", "{{.State.Running}} {{.State.ExitCode}}", self.name],
                               capture_output=True, text=True, timeout=30, check=False).stdout.split()
        return None if not state or state[0] == "true" else int(state[1])

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def exec(self, command: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
        """`command` inside the image, as its USER, with the same environment
        (a HEALTHCHECK runs so)."""
        env_args = [f"--env={k}={v}" for k, v in self.env.items()]
        if self.engine == "docker":
            cmd = ["docker", "exec", "--user", self.config.user, *env_args, self.name, *command]
        else:
            cmd = ["buildah", "run", "--isolation", "chroot", "--user", self.config.user, *env_args,
                   self.container, "--", *command]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)

    def healthcheck(self) -> subprocess.CompletedProcess:
        kind, *command = self.config.healthcheck
        assert kind == "CMD", self.config.healthcheck
        return self.exec(command)

    def stop(self, timeout: float = 20) -> int | None:
        """SIGTERM to the service, as an orchestrator stops it; its exit code."""
        code = None
        if self.engine == "docker":
            subprocess.run(["docker", "stop", "-t", str(int(timeout)), self.name], capture_output=True,
                           timeout=60, check=False)
            code = self._docker_exit()
            self.process.wait(10)
        elif self.process.poll() is None:
            # To the entrypoint's process only, as `docker stop` does: buildah
            # itself, signalled, kills its child.
            os.kill(self._entrypoint_pid(), signal.SIGTERM)
            try:
                code = self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        else:
            code = self.process.returncode
        self._log.close()
        return code

    def _entrypoint_pid(self) -> int:
        """The innermost of buildah run's chain of processes (buildah,
        buildah-chroot-runtime, buildah-chroot-exec, the entrypoint)."""
        pid = self.process.pid
        while True:
            children = []
            # Any thread may have forked it (buildah is a Go program).
            for task in Path(f"/proc/{pid}/task").glob("*/children"):
                try:
                    children += task.read_text().split()
                except OSError:
                    pass
            if not children:
                return pid
            pid = int(children[0])

    def remove(self) -> None:
        if self.process.poll() is None:
            if self.engine == "docker":
                self.process.kill()
            else:
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        tool = "docker" if self.engine == "docker" else "buildah"
        subprocess.run([tool, "rm", "-f", self.container] if tool == "docker" else [tool, "rm", self.container],
                       capture_output=True, timeout=60, check=False)
        if not self._log.closed:
            self._log.close()


def remove_left_over_containers(engine: str, prefix: str) -> None:
    """Containers named {prefix}{pid}-... whose test process is gone (a run
    killed before its clean-up); those of live runs stay."""
    tool = "docker" if engine == "docker" else "buildah"
    listing = ["docker", "ps", "-a", "--format", "{{.Names}}"] if tool == "docker" else [
        "buildah", "containers", "--format", "{{.ContainerName}}"]
    names = subprocess.run(listing, capture_output=True, text=True, timeout=60, check=False).stdout.split()
    for name in names:
        pid = name.removeprefix(prefix).split("-")[0]
        if not name.startswith(prefix) or not pid.isdigit() or Path(f"/proc/{pid}").exists():
            continue
        subprocess.run([tool, "rm", "-f", name] if tool == "docker" else [tool, "rm", name],
                       capture_output=True, timeout=60, check=False)
