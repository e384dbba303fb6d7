#!/usr/bin/env python3
"""`make images`: the three service images (deploy/<service>.Dockerfile),
built one after another, with docker where an engine answers and buildah
(`--isolation chroot`) otherwise. Standard library only: it runs before
`make install`.

The base (the Dockerfiles' PYTHON_IMAGE): $PYTHON_IMAGE when set; else their
default when this engine has it or can pull it; else a Debian bookworm made
here (base-bookworm.sh) with this machine's pip settings and certificate
bundle copied in, so that the builds reach the package index the way this
machine's pip does. That base is kept between runs, in the engine's store
and as a tarball under the cache directory, keyed by a hash of its recipe;
it is made again only when the recipe (the script, the mirror, the pip
settings, the bundle) changes. See docs/deploy.md.

    deploy/images/build.py [--tag TAG] [--base auto|default|bookworm] [SERVICE ...]
"""

from __future__ import annotations

import argparse
import ast
import configparser
import contextlib
import fcntl
import hashlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DEPLOY = ROOT / "deploy"
SERVICES = ("records", "collab", "bots")
RECIPE = HERE / "base-bookworm.sh"
BASE_REPOSITORY = "localhost/loomio-channels-base"
# Part of the base's recipe besides base-bookworm.sh: bump it when what
# _make_base_tarball puts in the base changes, so kept bases are made again.
BASE_LAYOUT = "1"
# Where the base's pip finds the bundle copied in (Debian's system bundle path).
BASE_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
# How long a pull of the default base may take before the bookworm base is
# used instead (where registries are out of reach, a pull fails or hangs).
PULL_TIMEOUT = 120


def log(message: str) -> None:
    print(f"images: {message}", file=sys.stderr, flush=True)


def image_name(service: str, tag: str) -> str:
    """The name deploy/docker-compose.yml and deploy/k8s run the image under."""
    return f"loomio-channels-{service}:{tag}"


def default_tag() -> str:
    return os.environ.get("CHANNELS_TAG") or "latest"


def default_python_image() -> str:
    """The Dockerfiles' own `ARG PYTHON_IMAGE=` (the same in all three)."""
    defaults = set()
    for service in SERVICES:
        text = (DEPLOY / f"{service}.Dockerfile").read_text()
        defaults.update(re.findall(r"^ARG PYTHON_IMAGE=(\S+)", text, re.MULTILINE))
    (value,) = defaults
    return value


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=False, **kwargs)


def _quiet(cmd: list[str], timeout: float = 60) -> bool:
    try:
        return _run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _check(cmd: list[str], **kwargs) -> str:
    done = _run(cmd, stdout=subprocess.PIPE, text=True, **kwargs)
    if done.returncode != 0:
        raise SystemExit(f"images: failed ({done.returncode}): {shlex.join(cmd)}")
    return done.stdout.strip()


# --- engines --------------------------------------------------------------------


class Docker:
    name = "docker"

    def has_image(self, ref: str) -> bool:
        return _quiet(["docker", "image", "inspect", ref])

    def pull(self, ref: str) -> bool:
        return _quiet(["docker", "pull", "-q", ref], timeout=PULL_TIMEOUT)

    def tags(self, repository: str) -> list[str]:
        out = _run(["docker", "images", "--format", "{{.Repository}}:{{.Tag}}"],
                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, timeout=60).stdout
        return [ref for ref in out.split() if ref.startswith(f"{repository}:")]

    def remove(self, ref: str) -> None:
        _quiet(["docker", "rmi", ref])

    def import_rootfs(self, tarball: Path, ref: str, env: dict[str, str]) -> None:
        changes = [f"--change=ENV {k}={v}" for k, v in env.items()] + ['--change=CMD ["python3"]']
        _check(["docker", "import", *changes, str(tarball), ref])

    def build(self, dockerfile: Path, ref: str, build_args: dict[str, str]) -> int:
        args = [f"--build-arg={k}={v}" for k, v in build_args.items()]
        return _run(["docker", "build", "-f", str(dockerfile), "-t", ref, *args, str(ROOT)]).returncode


class Buildah:
    name = "buildah"

    def has_image(self, ref: str) -> bool:
        return _quiet(["buildah", "inspect", "--type", "image", ref])

    def pull(self, ref: str) -> bool:
        return _quiet(["buildah", "pull", "-q", ref], timeout=PULL_TIMEOUT)

    def tags(self, repository: str) -> list[str]:
        out = _run(["buildah", "images", "--format", "{{.Name}}:{{.Tag}}"],
                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, timeout=60).stdout
        return [ref for ref in out.split() if ref.startswith(f"{repository}:")]

    def remove(self, ref: str) -> None:
        _quiet(["buildah", "rmi", ref])

    def import_rootfs(self, tarball: Path, ref: str, env: dict[str, str]) -> None:
        container = _check(["buildah", "from", "scratch"])
        try:
            mount = _check(["buildah", "mount", container])
            _check(["tar", "-xpf", str(tarball), "--numeric-owner", "-C", mount])
            _check(["buildah", "umount", container])
            config = [f"--env={k}={v}" for k, v in env.items()]
            _check(["buildah", "config", *config, "--cmd", "python3", container])
            _check(["buildah", "commit", "-q", container, ref])
        finally:
            _quiet(["buildah", "rm", container])

    def build(self, dockerfile: Path, ref: str, build_args: dict[str, str]) -> int:
        args = [f"--build-arg={k}={v}" for k, v in build_args.items()]
        # docker format keeps HEALTHCHECK (OCI's has none); --layers reuses
        # each unchanged step, as docker does.
        return _run(["buildah", "bud", "--isolation", "chroot", "--format", "docker", "--layers",
                     "-f", str(dockerfile), "-t", ref, *args, str(ROOT)]).returncode


def pick_engine() -> Docker | Buildah:
    if shutil.which("docker") and _quiet(["docker", "info"], timeout=30):
        return Docker()
    if shutil.which("buildah"):
        return Buildah()
    raise SystemExit("images: no Docker engine answers and buildah is missing "
                     "(apt-get install buildah debootstrap)")


# --- this machine's pip and apt settings ------------------------------------------

# pip options whose values name files or directories (space-separated lists).
_PATH_OPTIONS = {"cert", "client-cert", "constraint", "requirement", "find-links", "index-url",
                 "extra-index-url", "build-constraint"}


def _pip_config_files() -> list[Path]:
    """pip's configuration files, in the order it loads them (later wins)."""
    xdg_dirs = (os.environ.get("XDG_CONFIG_DIRS") or "/etc/xdg").split(":")
    xdg_home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    files = [*(Path(d) / "pip" / "pip.conf" for d in reversed(xdg_dirs)), Path("/etc/pip.conf"),
             Path.home() / ".pip" / "pip.conf", xdg_home / "pip" / "pip.conf", Path(sys.prefix) / "pip.conf"]
    if os.environ.get("PIP_CONFIG_FILE"):
        files.append(Path(os.environ["PIP_CONFIG_FILE"]))
    return files


def _listed_by_pip() -> str | None:
    try:
        done = _run([sys.executable, "-m", "pip", "config", "list"], stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _listed_by_hand() -> str:
    """`pip config list`'s lines, for a Python without pip: its files, then PIP_*."""
    lines = []
    for path in _pip_config_files():
        parser = configparser.ConfigParser(interpolation=None)
        with contextlib.suppress(OSError, configparser.Error):
            parser.read(path)
        lines += [f"{section}.{option}={value!r}" for section in parser.sections()
                  for option, value in parser.items(section)]
    skip = {"PIP_CONFIG_FILE"}
    lines += [f":env:.{name[4:].lower().replace('_', '-')}={value!r}" for name, value in os.environ.items()
              if name.startswith("PIP_") and name not in skip]
    return "\n".join(lines)


def machine_pip_config() -> dict[str, dict[str, str]]:
    """This machine's effective pip settings, {section: {option: value}}, as
    `pip config list` reports them (files in pip's order, then PIP_* from the
    environment, which apply to every command and so win in every section);
    read by hand where this Python has no pip."""
    listed = _listed_by_pip()
    if listed is None:
        listed = _listed_by_hand()
    sections: dict[str, dict[str, str]] = {}
    from_env: dict[str, str] = {}
    for line in listed.splitlines():
        key, sep, raw = line.partition("=")
        section, _, option = key.rpartition(".")
        if not sep or not section:
            continue
        value = raw.strip()
        with contextlib.suppress(ValueError, SyntaxError):
            value = str(ast.literal_eval(value))
        if section == ":env:":
            from_env[option] = value
        else:
            sections.setdefault(section, {})[option] = value
    for option, value in from_env.items():
        for options in sections.values():
            options.pop(option, None)
        sections.setdefault("global", {})[option] = value
    return sections


def _local_path(item: str) -> Path | None:
    if item.startswith("file:"):
        return Path(urllib.parse.unquote(urllib.parse.urlparse(item).path))
    return Path(item) if item.startswith("/") else None


def ca_bundle(pip_config: dict[str, dict[str, str]]) -> Path | None:
    """The bundle this machine's pip verifies the index with: its `cert`
    setting, else what requests and OpenSSL are told by the environment, else
    certifi's, else the system's."""
    candidates = [pip_config.get("global", {}).get("cert"), pip_config.get("install", {}).get("cert"),
                  os.environ.get("REQUESTS_CA_BUNDLE"), os.environ.get("CURL_CA_BUNDLE"),
                  os.environ.get("SSL_CERT_FILE")]
    try:
        import certifi

        candidates.append(certifi.where())
    except ImportError:
        pass
    candidates.append(BASE_BUNDLE)
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def base_pip_settings() -> tuple[str, dict[str, bytes], list[str]]:
    """The base's /etc/pip.conf, the files it names (absolute path in the
    base -> content), and notes on what was left out. Local directories and
    missing paths (a wheelhouse, a file:// index on this machine's disk) stay
    out: they are not the index, and the base cannot see them."""
    config = machine_pip_config()
    files: dict[str, bytes] = {}
    notes: list[str] = []
    out = configparser.ConfigParser(interpolation=None)
    for section, options in sorted(config.items()):
        for option, value in sorted(options.items()):
            if option in ("cert", "cache-dir", "log", "log-file"):
                continue  # the bundle below; the others are this machine's own places
            if option in _PATH_OPTIONS:
                kept = []
                for item in value.split():
                    path = _local_path(item)
                    if path is None:
                        kept.append(item)
                    elif path.is_file():
                        files[str(path)] = path.read_bytes()
                        kept.append(item)
                    else:
                        notes.append(f"{section}.{option}: {item} (on this machine's disk)")
                if not kept:
                    continue
                value = " ".join(kept)
            if not out.has_section(section):
                out.add_section(section)
            out.set(section, option, value)
    bundle = ca_bundle(config)
    if bundle is not None:
        files[BASE_BUNDLE] = bundle.read_bytes()
        if not out.has_section("global"):
            out.add_section("global")
        out.set("global", "cert", BASE_BUNDLE)
    else:
        notes.append("no certificate bundle found: the base verifies with pip's own")
    text = io.StringIO()
    text.write("# This machine's pip settings, copied in by deploy/images/build.py.\n")
    out.write(text)
    return text.getvalue(), files, notes


def _deb822_entries(text: str):
    for stanza in re.split(r"\n\s*\n", text):
        fields, last = {}, None
        for line in stanza.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0].isspace() and last:
                fields[last] += " " + line.strip()
                continue
            key, _, value = line.partition(":")
            last = key.strip().lower()
            fields[last] = value.strip()
        if "deb" in fields.get("types", "").split():
            for uri in fields.get("uris", "").split():
                yield uri, fields.get("suites", "").split(), fields.get("signed-by")


def _one_line_entries(text: str):
    for line in text.splitlines():
        line = line.split("#")[0]
        options = {}
        bracket = re.search(r"\[([^\]]*)\]", line)
        if bracket:
            options = dict(o.split("=", 1) for o in bracket.group(1).split() if "=" in o)
            line = line[:bracket.start()] + line[bracket.end():]
        words = line.split()
        if len(words) >= 3 and words[0] == "deb":
            yield words[1], [words[2]], options.get("signed-by")


def debian_mirror() -> tuple[str | None, str | None]:
    """The mirror and keyring this machine's apt uses for bookworm, if any."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        if path.suffix == ".sources":
            entries = _deb822_entries(text)
        elif path.suffix == ".list" or path.name == "sources.list":
            entries = _one_line_entries(text)
        else:
            continue
        for uri, suites, signed_by in entries:
            if "bookworm" in suites:
                keyring = signed_by if signed_by and Path(signed_by).is_file() else None
                return uri, keyring
    return None, None


# --- the bookworm base --------------------------------------------------------------


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    path = Path(base) / "loomio-channels" / "images"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def cache_lock():
    """One build at a time on this machine (they share the base and 2 cores)."""
    with open(cache_dir() / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def base_recipe() -> tuple[str, dict]:
    """The hash the base is kept under, and what goes into it."""
    pip_conf, files, notes = base_pip_settings()
    mirror, keyring = debian_mirror()
    digest = hashlib.sha256()
    for part in (BASE_LAYOUT.encode(), RECIPE.read_bytes(), (mirror or "").encode(), (keyring or "").encode(),
                 pip_conf.encode()):
        digest.update(len(part).to_bytes(8, "big") + part)
    for path in sorted(files):
        digest.update(path.encode() + b"\0" + hashlib.sha256(files[path]).digest())
    recipe = {"pip_conf": pip_conf, "files": files, "notes": notes, "mirror": mirror, "keyring": keyring}
    return digest.hexdigest()[:16], recipe


def base_ref(key: str) -> str:
    return f"{BASE_REPOSITORY}:bookworm-{key}"


def _make_base_tarball(tarball: Path, recipe: dict) -> None:
    # What a killed run left (the lock is held: no other run is making one).
    for left in [*tarball.parent.glob("base-*"), *tarball.parent.glob("*.partial")]:
        if left.is_dir():
            shutil.rmtree(left, ignore_errors=True)
        else:
            left.unlink()
    work = Path(tempfile.mkdtemp(prefix="base-", dir=tarball.parent))
    rootfs = work / "rootfs"
    try:
        log(f"debootstrap bookworm (mirror: {recipe['mirror'] or 'debootstrap default'}); "
            f"log in {work / 'debootstrap.log'}")
        with open(work / "debootstrap.log", "wb") as out:
            code = _run(["sh", str(RECIPE), str(rootfs), recipe["mirror"] or "", recipe["keyring"] or ""],
                        stdout=out, stderr=subprocess.STDOUT).returncode
        if code != 0:
            tail = (work / "debootstrap.log").read_text(errors="replace")[-3000:]
            raise SystemExit(f"images: the bookworm base failed ({code}):\n{tail}")
        for note in recipe["notes"]:
            log(f"left out of the base's pip settings: {note}")
        (rootfs / "etc" / "pip.conf").write_text(recipe["pip_conf"])
        for path, content in recipe["files"].items():
            target = rootfs / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
            target.chmod(0o644)
        partial = tarball.with_suffix(".partial")
        _check(["tar", "-cf", str(partial), "--numeric-owner", "-C", str(rootfs),
                "--exclude=./dev/*", "--exclude=./proc/*", "--exclude=./sys/*", "."])
        partial.rename(tarball)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def ensure_base(engine) -> str:
    """The bookworm base's image reference, made or imported if missing;
    bases of older recipes are removed."""
    key, recipe = base_recipe()
    ref = base_ref(key)
    tarball = cache_dir() / f"bookworm-{key}.tar"
    if engine.has_image(ref):
        log(f"base {ref} (kept from an earlier run)")
    else:
        if not tarball.exists():
            _make_base_tarball(tarball, recipe)
        engine.import_rootfs(tarball, ref, {"LANG": "C.UTF-8",
                                            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"})
        log(f"base {ref} imported from {tarball}")
    for stale in cache_dir().glob("bookworm-*.tar"):
        if stale != tarball:
            log(f"removing a base of an older recipe: {stale}")
            stale.unlink()
    for stale in engine.tags(BASE_REPOSITORY):
        if stale != ref:
            log(f"removing a base of an older recipe: {stale}")
            engine.remove(stale)
    return ref


def python_image(engine, mode: str) -> str:
    if os.environ.get("PYTHON_IMAGE"):
        return os.environ["PYTHON_IMAGE"]
    default = default_python_image()
    if mode != "bookworm":
        if engine.has_image(default) or engine.pull(default):
            return default
        if mode == "default":
            raise SystemExit(f"images: {default} is neither here nor pullable")
        log(f"{default} is neither here nor pullable: building on a bookworm base of our own")
    return ensure_base(engine)


def build(services, tag: str, mode: str = "auto") -> list[str]:
    engine = pick_engine()
    built = []
    with cache_lock():
        base = python_image(engine, mode)
        for service in services:
            ref = image_name(service, tag)
            log(f"{engine.name}: {ref} from deploy/{service}.Dockerfile on {base}")
            code = engine.build(DEPLOY / f"{service}.Dockerfile", ref, {"PYTHON_IMAGE": base})
            if code != 0:
                raise SystemExit(f"images: building {ref} failed ({code})")
            built.append(ref)
    return built


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("services", nargs="*", metavar="SERVICE", help=f"some of {', '.join(SERVICES)}")
    parser.add_argument("--tag", default=default_tag(), help="image tag (default $CHANNELS_TAG or latest)")
    parser.add_argument("--base", choices=("auto", "default", "bookworm"), default="auto",
                        help="auto: the Dockerfiles' default where it can be had, else a bookworm base")
    args = parser.parse_args(argv)
    unknown = set(args.services) - set(SERVICES)
    if unknown:
        parser.error(f"unknown services: {sorted(unknown)}")
    for ref in build(args.services or SERVICES, args.tag, args.base):
        print(ref)
    return 0


if __name__ == "__main__":
    sys.exit(main())
