"""Reading deploy/ the way Docker, docker compose and kustomize read it, for
the deploy tests: Dockerfile instructions, .dockerignore matching, the
kustomize base's resources, and what the services really are (console
scripts from their pyproject files, ports from channels_common.settings)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SERVICES = ("records", "collab", "bots")
# docker compose service name of each service (loomio-deploy's names).
COMPOSE_NAMES = {"records": "channels", "collab": "hocuspocus", "bots": "bots"}


def lock_pins(lock: Path) -> dict[str, list[tuple[str, str, list[str]]]]:
    """A uv/pip-compile hashed lock as {normalized name: [(version, marker,
    hashes)]} (a universal lock may pin a name twice, under two markers)."""
    text = lock.read_text()
    out: dict[str, list[tuple[str, str, list[str]]]] = {}
    entries = re.split(r"\n(?=[A-Za-z0-9])", text)
    for entry in entries:
        line = entry.replace("\\\n", " ")
        match = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*(?:;\s*([^\\]*?))?\s*(--hash|$)", line)
        if not match:
            continue
        name, version, marker = match.group(1), match.group(2), (match.group(3) or "").strip()
        hashes = re.findall(r"--hash=(sha256:[0-9a-f]{64})", line)
        out.setdefault(re.sub(r"[-_.]+", "-", name).lower(), []).append((version, marker, hashes))
    return out


def project_requirements(pyproject: Path, extras: tuple[str, ...] = ()) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = list(project.get("dependencies", []))
    for extra in extras:
        reqs += project.get("optional-dependencies", {})[extra]
    return reqs


def console_scripts(pyproject: Path) -> dict[str, str]:
    return tomllib.loads(pyproject.read_text())["project"].get("scripts", {})


def service_script(service: str) -> str:
    scripts = console_scripts(ROOT / "services" / service / "pyproject.toml")
    (name,) = [n for n, target in scripts.items() if target.startswith(f"channels_{service}.")]
    return name


def production_port(service: str) -> int:
    """The port the service listens on in an image (RAILS_ENV=production,
    PORT unset), as its own settings compute it."""
    from channels_common import settings

    cls = {"records": settings.RecordsSettings, "collab": settings.CollabSettings,
           "bots": settings.BotsSettings}[service]
    # Build from explicit values only, so the test runner's environment
    # (PORT, RAILS_ENV) cannot leak in.
    env_free = {"RAILS_ENV": "production"} if "rails_env" in cls.model_fields else {}
    return cls.model_validate(env_free).port


def setting_names() -> set[str]:
    """Every environment variable any settings class reads."""
    from channels_common import settings
    from pydantic import AliasChoices
    from pydantic_settings import BaseSettings

    names: set[str] = set()
    for obj in vars(settings).values():
        if isinstance(obj, type) and issubclass(obj, BaseSettings):
            for f in obj.model_fields.values():
                alias = f.validation_alias
                if isinstance(alias, str):
                    names.add(alias)
                elif isinstance(alias, AliasChoices):
                    names.update(c for c in alias.choices if isinstance(c, str))
    return names


@dataclass
class Dockerfile:
    path: Path
    instructions: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> Dockerfile:
        text = path.read_text()
        # Join continuation lines, drop comments and parser directives.
        logical, buf = [], ""
        for line in text.splitlines():
            stripped = line.strip()
            if not buf and (not stripped or stripped.startswith("#")):
                continue
            if stripped.endswith("\\"):
                buf += stripped[:-1] + " "
                continue
            logical.append(buf + stripped)
            buf = ""
        out = cls(path)
        for line in logical:
            keyword, _, rest = line.partition(" ")
            out.instructions.append((keyword.upper(), rest.strip()))
        return out

    def all(self, keyword: str) -> list[str]:
        return [rest for k, rest in self.instructions if k == keyword]

    def final_stage(self) -> list[tuple[str, str]]:
        starts = [i for i, (k, _) in enumerate(self.instructions) if k == "FROM"]
        return self.instructions[starts[-1]:]

    def final(self, keyword: str) -> list[str]:
        return [rest for k, rest in self.final_stage() if k == keyword]

    def exec_form(self, keyword: str) -> list[str]:
        (value,) = self.final(keyword)
        return json.loads(value)

    def env(self) -> dict[str, str]:
        out = {}
        for rest in self.final("ENV"):
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                out[key] = value
        return out

    def healthcheck_command(self) -> list[str]:
        (value,) = self.final("HEALTHCHECK")
        _, _, cmd = value.partition("CMD ")
        return json.loads(cmd)

    def pip_installs(self) -> list[list[str]]:
        """The arguments of each `pip install` of the build stage, in order
        (commands chained with && count one by one)."""
        out = []
        for run in self.all("RUN"):
            for command in re.split(r"\s&&\s", run):
                words = shlex.split(command)
                if len(words) > 1 and words[0].endswith("pip") and words[1] == "install":
                    out.append(words[2:])
        return out

    def pip_commands(self) -> list[list[str]]:
        """Every pip command of the build stage, in order, as argument lists
        after `pip` (for example ["install", ...], ["check"])."""
        out = []
        for run in self.all("RUN"):
            for command in re.split(r"\s&&\s", run):
                words = shlex.split(command)
                if words and words[0].endswith("/pip"):
                    out.append(words[1:])
        return out

    def copies(self) -> list[tuple[str, str]]:
        out = []
        for rest in self.all("COPY"):
            words = [w for w in shlex.split(rest) if not w.startswith("--")]
            out.append((words[0], words[1]))
        return out


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def _pattern_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    pattern = pattern.strip("/")
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + r"\Z")


def docker_ignored(relpath: str, patterns: list[str]) -> bool:
    """Docker's rule: a path is out when a pattern matches it or one of its
    parent directories (negations are not used in this repository)."""
    assert not any(p.startswith("!") for p in patterns), "negated patterns are not modelled"
    regexes = [_pattern_regex(p) for p in patterns]
    parts = relpath.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(rx.match(prefix) for rx in regexes for prefix in prefixes)


def stage_build_sources(dockerfile: Dockerfile, dest: Path) -> None:
    """Every COPY of the build stage into /src/, placed under `dest` (dest/src/...)
    as the build context delivers it (.dockerignore applied)."""
    patterns = dockerignore_patterns()
    for src, target in dockerfile.copies():
        if not target.startswith("/src/"):
            continue
        to = dest / target.lstrip("/")
        if (ROOT / src).is_file():
            to.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / src, to)
            continue
        for path in (ROOT / src).rglob("*"):
            rel = str(path.relative_to(ROOT))
            if path.is_file() and not docker_ignored(rel, patterns):
                out = to / path.relative_to(ROOT / src)
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, out)


# docker compose's merge of several -f files (the Compose Specification's
# "Merge and override"): mappings merge key by key, later files winning;
# these are replaced whole, sequences otherwise appended (these as sets).
_REPLACED = {("command",), ("entrypoint",), ("healthcheck", "test")}
_KEYED = {"environment", "labels", "networks", "depends_on", "extra_hosts"}
_UNIQUE = {"ports", "expose", "dns", "dns_search", "tmpfs", "volumes", "env_file", "security_opt"}


def _as_mapping(key: str, value):
    """The list forms of a service's keyed options, as mappings."""
    if not isinstance(value, list):
        return value
    if key == "depends_on":
        return {name: {"condition": "service_started"} for name in value}
    if key == "networks":
        return {name: None for name in value}
    out = {}
    for item in value:
        name, sep, rest = str(item).partition("=" if key != "extra_hosts" else ":")
        out[name] = rest if sep else None
    return out


def _merge_service(base: dict, override: dict, path: tuple = ()) -> dict:
    out = dict(base)
    for key, value in override.items():
        here = (*path, key)
        if here in _REPLACED or key not in out:
            out[key] = _as_mapping(key, value) if not path and key in _KEYED else value
        elif not path and key in _KEYED:
            out[key] = {**_as_mapping(key, out[key]), **_as_mapping(key, value)}
        elif isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = _merge_service(out[key], value, here)
        elif isinstance(value, list) and isinstance(out[key], list):
            out[key] = out[key] + [v for v in value if not (key in _UNIQUE and v in out[key])]
        else:
            out[key] = value
    return out


def compose_merge(base: dict, override: dict) -> dict:
    """`docker compose -f base -f override config`'s model of the two files."""
    merged = {k: v for k, v in base.items() if k not in ("services", "networks", "volumes")}
    merged.update({k: v for k, v in override.items() if k not in ("services", "networks", "volumes")})
    services = dict(base.get("services", {}))
    for name, service in override.get("services", {}).items():
        services[name] = _merge_service(services.get(name, {}), service)
    merged["services"] = services
    for top in ("networks", "volumes"):
        if top in base or top in override:
            merged[top] = {**(base.get(top) or {}), **(override.get(top) or {})}
    return merged


def load_kustomization() -> tuple[dict, list[tuple[str, dict]]]:
    """The kustomization and its resources (file, document) in order, with
    the `images` overrides applied as kustomize would."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    images = {i["name"]: i for i in kustomization.get("images", [])}
    docs = []
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            if doc is None:
                continue
            for container in _containers(doc):
                override = images.get(container["image"].split(":")[0])
                if override:
                    container["image"] = f"{override.get('newName', override['name'])}:{override['newTag']}"
            docs.append((name, doc))
    return kustomization, docs


def _containers(doc: dict) -> list[dict]:
    if doc.get("kind") != "Deployment":
        return []
    return doc["spec"]["template"]["spec"]["containers"]


def by_kind(docs: list[tuple[str, dict]], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for _, d in docs if d["kind"] == kind}
