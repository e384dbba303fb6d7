"""deploy/ validated offline: the compose file against the Compose
Specification's JSON schema (shipped in deploy/schemas), the Kubernetes base
against the API schemas shipped by kubernetes-validate, and every name,
port, probe and command cross-checked against what the services really are."""

from __future__ import annotations

import copy
import importlib.metadata
import json
import platform
import re
import sys

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.markers import Marker, default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.integration.deploy_support import (
    COMPOSE_NAMES,
    DEPLOY,
    K8S,
    ROOT,
    SERVICES,
    Dockerfile,
    by_kind,
    compose_merge,
    console_scripts,
    docker_ignored,
    dockerignore_patterns,
    load_kustomization,
    lock_pins,
    production_port,
    project_requirements,
    service_script,
    setting_names,
)
from tests.integration.image_support import build_module

K8S_VERSION = "1.30.0"
HEALTHCHECK_SCRIPT = "channels-healthcheck"


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def compose_validator() -> jsonschema.Validator:
    schema = json.loads((DEPLOY / "schemas" / "compose-spec.json").read_text())
    return jsonschema.Draft7Validator(schema)


def dockerfile(service: str) -> Dockerfile:
    return Dockerfile.load(DEPLOY / f"{service}.Dockerfile")


# --- images -----------------------------------------------------------------


@pytest.mark.parametrize("service", SERVICES)
def test_dockerfile_builds_one_service_as_non_root(service):
    df = dockerfile(service)
    froms = df.all("FROM")
    assert len(froms) >= 2, "multi-stage: a build stage and a run stage"
    (arg,) = [a for a in df.all("ARG") if a.startswith("PYTHON_IMAGE=")]
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.\d+-slim(-\w+)?", arg), arg
    assert all(f.split()[0] == "${PYTHON_IMAGE}" for f in froms)

    # Only channels-common, this service and its lock go in. Hash-checked
    # installs refuse local directories, hence two steps: exactly the locked
    # set first, then our two packages with no dependencies of their own,
    # and `pip check` proves the lock covered them.
    assert {src for src, _ in df.copies()} - {"/opt/venv"} == {
        "libs/common", f"services/{service}", f"locks/{service}.txt"}
    assert (f"locks/{service}.txt", f"/src/locks/{service}.txt") in df.copies()
    locked, ours = df.pip_installs()
    # Exactly the lock, nothing resolved against the index (issue 20: pip
    # resolves an extra such as python-socks[asyncio] unless told --no-deps).
    assert "--require-hashes" in locked and "--no-deps" in locked
    assert locked[locked.index("-r") + 1] == f"/src/locks/{service}.txt"
    assert [a for a in locked if not a.startswith("-") and a not in (":all:", f"/src/locks/{service}.txt")] == []
    # Ours are built by the lock's setuptools: nothing fetched to build them.
    assert "--no-deps" in ours and "--no-build-isolation" in ours
    assert any(line.startswith("setuptools==") for line in (DEPLOY.parent / f"locks/{service}.txt").read_text().splitlines())
    targets = [a.split("[")[0] for a in ours if not a.startswith("-")]
    assert targets == ["/src/libs/common", f"/src/services/{service}"]
    assert df.pip_commands()[-1] == ["check"]

    user = df.final("USER")
    assert user and user[-1].split(":")[0] not in ("root", "0")
    env = df.env()
    assert env.get("PYTHONUNBUFFERED") == "1"
    assert env.get("RAILS_ENV") == "production", "images never serve the development playground"
    assert df.exec_form("ENTRYPOINT") == [service_script(service)]


# The interpreters the locks serve: development (3.11) and the images (3.12).
LOCK_PYTHONS = ("3.11", "3.12")


def _marker_env(python: str) -> dict[str, str]:
    env = default_environment()
    env.update(python_version=python, python_full_version=f"{python}.0", implementation_name="cpython",
               platform_python_implementation="CPython", sys_platform="linux", platform_system="Linux",
               os_name="posix")
    return env


def _pinned(pins, name: str, env: dict[str, str]) -> str | None:
    """The version a lock installs for `name` under `env` (None: not at all)."""
    chosen = [(v, m, h) for v, m, h in pins.get(canonicalize_name(name), [])
              if not m or Marker(m).evaluate(env)]
    assert len(chosen) <= 1, f"{name} pinned twice for {env['python_version']}: {chosen}"
    if not chosen:
        return None
    version, _, hashes = chosen[0]
    assert hashes, f"{name}=={version} has no hash"
    return version


def _closure_problems(pins, requirements: list[str], python: str) -> list[str]:
    """Every requirement, and theirs in turn (read from the metadata of the
    development venv, which holds the 3.11 pins), met by a pin of the lock."""
    env = _marker_env(python)
    problems, todo, seen = [], [(Requirement(r), "") for r in requirements], set()
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({**env, "extra": extra}):
            continue
        name = canonicalize_name(req.name)
        if name.startswith("channels-"):
            continue  # ours: installed from source with --no-deps
        version = _pinned(pins, name, env)
        if version is None or not req.specifier.contains(version, prereleases=True):
            problems.append(f"{req} (Python {python}): lock has {version}")
            continue
        for ex in sorted(req.extras) or [""]:
            if (name, ex) in seen:
                continue
            seen.add((name, ex))
            try:
                dist = importlib.metadata.distribution(name)
            except importlib.metadata.PackageNotFoundError:
                continue  # not installed here (another platform or Python): pip check covers the image
            if dist.version == version:
                todo += [(Requirement(r), ex) for r in dist.requires or ()]
    return problems


@pytest.mark.parametrize("service", SERVICES)
def test_image_lock_covers_the_service_with_hashes(service):
    """locks/<service>.txt meets every requirement of channels-common[sentry]
    and the service, transitively, on 3.11 and 3.12, each pin hashed."""
    pins = lock_pins(ROOT / "locks" / f"{service}.txt")
    requirements = (project_requirements(ROOT / "libs/common/pyproject.toml", ("sentry",))
                    + project_requirements(ROOT / "services" / service / "pyproject.toml"))
    for python in LOCK_PYTHONS:
        assert _closure_problems(pins, requirements, python) == [], f"run `make lock` (locks/{service}.txt)"
    assert all(h for entries in pins.values() for _, _, h in entries)
    # Nothing of the development tools rides along into an image.
    assert not {"pytest", "ruff", "uv", "matplotlib"} & set(pins)


def test_dev_lock_covers_development_and_is_what_is_installed():
    pins = lock_pins(ROOT / "locks" / "dev.txt")
    requirements = [ln.split("#")[0].strip() for ln in (ROOT / "requirements-dev.txt").read_text().splitlines()]
    requirements = [r for r in requirements if r]
    requirements += project_requirements(ROOT / "libs/common/pyproject.toml", ("sentry",))
    for service in SERVICES:
        requirements += project_requirements(ROOT / "services" / service / "pyproject.toml")
    for python in LOCK_PYTHONS:
        assert _closure_problems(pins, requirements, python) == [], "run `make lock` (locks/dev.txt)"
    # The venv the tests run in holds the locked versions (`make install`).
    env = _marker_env(f"{sys.version_info.major}.{sys.version_info.minor}")
    drift = {}
    for name in pins:
        version = _pinned(pins, name, {**env, "python_full_version": platform.python_version()})
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if version is not None and installed != version:
            drift[name] = (version, installed)
    assert drift == {}, "the venv differs from locks/dev.txt (locked, installed): run `make install`"
    # ... and nothing else, besides the venv's own installers and our packages.
    installed = {canonicalize_name(d.metadata["Name"]) for d in importlib.metadata.distributions()}
    extra = sorted(n for n in installed - set(pins) - {"pip", "setuptools", "wheel"} if not n.startswith("channels-"))
    assert extra == [], f"installed but not in locks/dev.txt: {extra} (add to requirements-dev.txt, `make lock`)"


@pytest.mark.parametrize("service", SERVICES)
def test_dockerfile_port_and_healthcheck_match_the_service(service):
    df = dockerfile(service)
    port = production_port(service)
    assert df.final("EXPOSE") == [str(port)]
    command = df.healthcheck_command()
    assert command[0] == HEALTHCHECK_SCRIPT
    assert HEALTHCHECK_SCRIPT in console_scripts(ROOT / "libs/common/pyproject.toml")
    assert command[command.index("--port") + 1] == str(port)
    assert command[command.index("--path") + 1] == "/healthz"


def test_dockerignore_keeps_tests_caches_and_venv_out_and_sources_in():
    patterns = dockerignore_patterns()
    for out in [".venv/bin/python", "tests/support.py", "services/records/tests/test_x.py",
                "libs/common/tests/test_settings.py", "libs/common/src/channels_common/__pycache__/x.pyc",
                ".pytest_cache/v/cache", "tests/node/node_modules/ws/index.js", ".git/HEAD",
                "libs/common/src/channels_common.egg-info/PKG-INFO", "deploy/.env", "playground/dist/app.js"]:
        assert docker_ignored(out, patterns), out
    # Everything the Dockerfiles copy is still in the build context.
    copied = [p for p in (ROOT / "libs/common").rglob("*") if p.is_file()]
    for service in SERVICES:
        copied += [p for p in (ROOT / "services" / service).rglob("*") if p.is_file()]
    kept = [p for p in copied if not docker_ignored(str(p.relative_to(ROOT)), patterns)]
    kept_names = {str(p.relative_to(ROOT)) for p in kept}
    for needed in ["libs/common/pyproject.toml", "libs/common/src/channels_common/settings.py",
                   *[f"services/{s}/pyproject.toml" for s in SERVICES]]:
        assert needed in kept_names, needed
    assert not any("/tests/" in name or "__pycache__" in name for name in kept_names)
    for service in SERVICES:  # the lock each image installs first
        assert not docker_ignored(f"locks/{service}.txt", patterns)


def test_dockerignore_matcher_follows_docker_rules():
    assert docker_ignored("a/b/tests/c.py", ["**/tests"])
    assert docker_ignored("tests", ["**/tests"])
    assert not docker_ignored("a/testsuite/c.py", ["**/tests"])
    assert docker_ignored("bench/run.py", ["bench"])
    assert not docker_ignored("services/bench.py", ["bench"])


# --- docker compose ------------------------------------------------------------


def test_compose_file_is_valid_against_the_compose_specification():
    errors = sorted(compose_validator().iter_errors(compose()), key=str)
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_compose_schema_rejects_a_broken_file():
    broken = copy.deepcopy(compose())
    broken["services"]["channels"]["healthcheck"]["interval"] = 15  # must be a duration string
    broken["services"]["hocuspocus"]["restart_policy"] = "always"  # no such key
    assert len(list(compose_validator().iter_errors(broken))) >= 2


@pytest.mark.parametrize("service", SERVICES)
def test_compose_service_matches_image_and_service(service):
    svc = compose()["services"][COMPOSE_NAMES[service]]
    port = production_port(service)
    df = dockerfile(service)
    assert svc["build"] == {"context": "..", "dockerfile": f"deploy/{service}.Dockerfile"}
    assert (DEPLOY / ".." / svc["build"]["dockerfile"]).resolve().exists()
    # Exactly the image `make images` builds (deploy/images/build.py), tag
    # from CHANNELS_TAG as there.
    build = build_module()
    assert svc["image"] == build.image_name(service, "${CHANNELS_TAG:-latest}")
    # No command override: the image's entrypoint, the service's console script.
    assert "command" not in svc and "entrypoint" not in svc
    assert svc["restart"] in ("unless-stopped", "always")
    assert svc["environment"]["PORT"] == str(port)
    assert svc["environment"]["RAILS_ENV"] == "production"
    assert svc["healthcheck"]["test"] == ["CMD", *df.healthcheck_command()]
    container_ports = {str(p).split(":")[-1] for p in svc.get("ports", [])} | {
        str(p) for p in svc.get("expose", [])
    }
    assert container_ports == {str(port)}
    assert any(e["path"] == "./.env" for e in svc["env_file"])
    assert "redis" in svc["depends_on"]


def test_compose_publishes_records_and_collab_on_their_own_host_ports():
    services = compose()["services"]
    records = services["channels"]["ports"][0]
    collab = services["hocuspocus"]["ports"][0]
    assert records == "${CHANNELS_HOST_PORT:-5000}:5000"
    assert collab == "${HOCUSPOCUS_HOST_PORT:-4444}:5000"
    assert "ports" not in services["bots"]
    # One bots instance by default, and nothing that stops `--scale bots=N`
    # (a fixed container name or host port would).
    assert services["bots"].get("deploy", {}).get("replicas", 1) == 1
    assert "container_name" not in services["bots"]
    redis = services["redis"]
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert redis["restart"] == "unless-stopped"


def test_make_images_builds_each_service_from_its_dockerfile():
    build = build_module()
    assert build.SERVICES == SERVICES
    assert build.DEPLOY == DEPLOY
    assert {build.image_name(s, "x") for s in SERVICES} == {f"loomio-channels-{s}:x" for s in SERVICES}
    # The bookworm base stands in for the Dockerfiles' own default, which is one.
    assert build.default_python_image() == dockerfile("records").all("ARG")[0].split("=", 1)[1]


# --- Loomio 3.1: collab in place of Loomio's hocuspocus service -----------------------

LOOMIO_31 = ROOT / "tests" / "integration" / "loomio-3.1-stack.yml"
OVERRIDE_31 = DEPLOY / "loomio-3.1" / "compose.collab.yml"


def loomio_31_merged() -> tuple[dict, dict]:
    stack = yaml.safe_load(LOOMIO_31.read_text())
    return stack, compose_merge(stack, yaml.safe_load(OVERRIDE_31.read_text()))


def _command(service: dict) -> list[str]:
    command = service.get("command", [])
    return command if isinstance(command, list) else command.split()


def test_loomio_31_override_merged_into_the_stack_is_valid():
    _, merged = loomio_31_merged()
    errors = sorted(compose_validator().iter_errors(merged), key=str)
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)
    # Every reference resolves: services depended on, networks, named volumes.
    services = merged["services"]
    for name, svc in services.items():
        assert set(svc.get("depends_on", {})) <= set(services), name
        nets = svc.get("networks", {})
        assert set(nets) <= set(merged.get("networks", {})) | {"default"}, name
        for volume in svc.get("volumes", []):
            source = str(volume).split(":")[0]
            if not source.startswith(("/", ".")):
                assert source in merged.get("volumes", {}), (name, volume)


def test_loomio_31_override_broken_is_refused():
    _, merged = loomio_31_merged()
    merged["services"]["collab-redis"]["command"] = 5
    merged["services"]["hocuspocus"]["restart_policy"] = "always"
    assert len(list(compose_validator().iter_errors(merged))) >= 2


def test_loomio_31_hocuspocus_runs_collab_with_a_redis_of_its_own():
    stack, merged = loomio_31_merged()
    services = merged["services"]
    # Only hocuspocus changes, and one Redis joins; records and bots have no
    # client in Loomio 3.1 and are not there.
    assert set(services) == set(stack["services"]) | {"collab-redis"}
    for name, svc in stack["services"].items():
        if name != "hocuspocus":
            assert services[name] == svc, name

    collab = services["hocuspocus"]
    port = production_port("collab")
    assert collab["image"] == build_module().image_name("collab", "${CHANNELS_TAG:-latest}")
    # The image's own entrypoint; nothing of Loomio's task dispatch is a command here.
    assert "command" not in collab and "entrypoint" not in collab
    env = collab["environment"]
    assert env["PORT"] == env["VIRTUAL_PORT"] == str(port)
    assert env["RAILS_ENV"] == "production"
    assert env["PRIVATE_APP_URL"] == "http://app:3000"
    assert env["REDIS_URL"] == "redis://collab-redis:6379/0"
    # Loomio's nginx-proxy host and env file carry over.
    assert env["VIRTUAL_HOST"] == "hocuspocus.${CANONICAL_HOST}"
    assert collab["env_file"] == stack["services"]["hocuspocus"]["env_file"]
    assert collab["healthcheck"]["test"] == ["CMD", *dockerfile("collab").healthcheck_command()]
    assert "ports" not in collab and "expose" not in collab
    # On Loomio's network (nginx-proxy reaches it) and on one with its Redis.
    redis_nets = set(services["collab-redis"]["networks"])
    assert set(stack["services"]["hocuspocus"]["networks"]) <= set(collab["networks"])
    assert redis_nets & set(collab["networks"])
    assert not any(redis_nets & set(services[n].get("networks", {"default": None}))
                   for n in services if n not in ("hocuspocus", "collab-redis"))
    assert collab["depends_on"]["collab-redis"]["condition"] == "service_healthy"

    # Drafts are persisted and never evicted; Loomio's Redis evicts and persists nothing.
    own = _command(services["collab-redis"])
    assert own[own.index("--appendonly") + 1] == "yes"
    assert own[own.index("--maxmemory-policy") + 1] == "noeviction"
    assert "/data" in {str(v).split(":")[1] for v in services["collab-redis"]["volumes"]}
    shared = _command(services["redis"])
    assert shared[shared.index("--maxmemory-policy") + 1] == "allkeys-lru"
    assert shared[shared.index("--appendonly") + 1] == "no"


def test_compose_merge_follows_the_specification():
    base = {"services": {"s": {"image": "a", "command": ["x", "y"], "environment": ["A=1", "B=2"],
                               "ports": ["1:1"], "networks": ["main"], "depends_on": ["db"],
                               "healthcheck": {"test": ["CMD", "a"], "retries": 3}}}}
    override = {"services": {"s": {"command": ["z"], "environment": {"B": "3", "C": "4"}, "ports": ["1:1", "2:2"],
                                   "networks": ["other"], "depends_on": {"cache": {"condition": "service_healthy"}},
                                   "healthcheck": {"test": ["CMD", "b"]}}}}
    s = compose_merge(base, override)["services"]["s"]
    assert s["image"] == "a" and s["command"] == ["z"]
    assert s["environment"] == {"A": "1", "B": "3", "C": "4"}
    assert s["ports"] == ["1:1", "2:2"]
    assert set(s["networks"]) == {"main", "other"}
    assert s["depends_on"] == {"db": {"condition": "service_started"}, "cache": {"condition": "service_healthy"}}
    assert s["healthcheck"] == {"test": ["CMD", "b"], "retries": 3}


def test_env_example_documents_known_settings_only():
    names = set()
    for line in (DEPLOY / ".env.example").read_text().splitlines():
        m = re.match(r"#?\s*([A-Z][A-Z0-9_]+)=", line)
        if m:
            names.add(m.group(1))
    interpolated = set(re.findall(r"\$\{([A-Z0-9_]+)", (DEPLOY / "docker-compose.yml").read_text()))
    unknown = names - setting_names() - interpolated
    assert not unknown, f"not read by any service nor by the compose file: {unknown}"
    # The contract's names of the original deployment are all there.
    for required in ["REDIS_URL", "PUBLIC_APP_URL", "PRIVATE_APP_URL", "CANONICAL_HOST", "RAILS_ENV",
                     "SENTRY_DSN", "RECOVERY_WINDOW_SECONDS", "COLLAB_TIMEOUT_MS", "COLLAB_DEBOUNCE_MS",
                     "COLLAB_MAX_DEBOUNCE_MS"]:
        assert required in names, required
    assert interpolated - names - {"CANONICAL_HOST"} <= {"CHANNELS_TAG", "CHANNELS_HOST_PORT",
                                                         "HOCUSPOCUS_HOST_PORT"}


# --- Kubernetes ----------------------------------------------------------------


def test_every_kubernetes_manifest_is_valid():
    _, docs = load_kustomization()
    for name, doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name} {doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")


def test_kubernetes_validation_rejects_a_broken_manifest():
    _, docs = load_kustomization()
    deployment = copy.deepcopy(by_kind(docs, "Deployment")["channels-records"])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/readyz"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest_once():
    kustomization, docs = load_kustomization()
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(on_disk)
    keys = [(d["kind"], d["metadata"]["name"]) for _, d in docs]
    assert len(keys) == len(set(keys)), "duplicate resources"
    assert {"ConfigMap", "Secret", "Deployment", "Service", "PodDisruptionBudget",
            "HorizontalPodAutoscaler", "Ingress"} <= {k for k, _ in keys}


@pytest.mark.parametrize("service", SERVICES)
def test_deployment_matches_the_service(service):
    _, docs = load_kustomization()
    name = f"channels-{service}"
    deployment = by_kind(docs, "Deployment")[name]
    spec = deployment["spec"]
    pod = spec["template"]
    labels = pod["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert labels["app.kubernetes.io/name"] == name

    (container,) = pod["spec"]["containers"]
    port = production_port(service)
    assert container["image"] == build_module().image_name(service, "latest")
    assert "command" not in container and "args" not in container
    (http,) = container["ports"]
    assert (http["name"], http["containerPort"]) == ("http", port)
    assert {"name": "PORT", "value": str(port)} in container["env"]
    assert str(port) == pod["metadata"]["annotations"]["prometheus.io/port"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= container["resources"][kind].keys()

    pod_security = pod["spec"]["securityContext"]
    (user,) = dockerfile(service).final("USER")
    assert pod_security["runAsNonRoot"] is True
    assert str(pod_security["runAsUser"]) == user.split(":")[0]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]

    refs = {next(iter(e.values()))["name"] for e in container["envFrom"]}
    assert refs == {"channels-config", "channels-secrets"}
    assert set(by_kind(docs, "ConfigMap")) | set(by_kind(docs, "Secret")) >= refs

    # The pod gets long enough to drain and to finish SIGTERM's graceful shutdown.
    grace = float(by_kind(docs, "ConfigMap")["channels-config"]["data"]["SHUTDOWN_GRACE_SECONDS"])
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", ["sleep", "0"])
    assert pre_stop[0] == "sleep"
    assert pod["spec"]["terminationGracePeriodSeconds"] >= float(pre_stop[1]) + grace + 5


@pytest.mark.parametrize("service", SERVICES)
def test_service_and_disruption_budget_select_the_pods(service):
    _, docs = load_kustomization()
    name = f"channels-{service}"
    pod = by_kind(docs, "Deployment")[name]["spec"]["template"]
    labels = pod["metadata"]["labels"]
    port_names = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}

    svc = by_kind(docs, "Service")[name]["spec"]
    assert svc["selector"].items() <= labels.items()
    (port,) = svc["ports"]
    assert port["targetPort"] in port_names
    assert port["port"] == port_names[port["targetPort"]]

    pdb = by_kind(docs, "PodDisruptionBudget")[name]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()


def test_scaling_follows_what_each_service_can_do():
    _, docs = load_kustomization()
    deployments = by_kind(docs, "Deployment")
    hpas = by_kind(docs, "HorizontalPodAutoscaler")
    assert set(hpas) == {"channels-records", "channels-collab"}
    for name, hpa in hpas.items():
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", name)
        assert name in deployments
    # records is stateless per pod: it scales out, and always has a spare.
    assert hpas["channels-records"]["spec"]["minReplicas"] >= 2
    assert hpas["channels-records"]["spec"]["maxReplicas"] > hpas["channels-records"]["spec"]["minReplicas"]
    assert by_kind(docs, "PodDisruptionBudget")["channels-records"]["spec"]["minAvailable"] >= 1
    assert by_kind(docs, "Service")["channels-records"]["spec"]["sessionAffinity"] == "ClientIP"
    # collab instances share documents through Redis: several, rolled one at a time.
    assert hpas["channels-collab"]["spec"]["minReplicas"] >= 2
    assert hpas["channels-collab"]["spec"]["maxReplicas"] > hpas["channels-collab"]["spec"]["minReplicas"]
    assert deployments["channels-collab"]["spec"]["replicas"] >= 2
    assert deployments["channels-collab"]["spec"]["strategy"]["type"] == "RollingUpdate"
    assert by_kind(docs, "PodDisruptionBudget")["channels-collab"]["spec"]["minAvailable"] >= 1
    assert "sessionAffinity" not in by_kind(docs, "Service")["channels-collab"]["spec"]
    # bots: claims make several instances post each message once; two keep
    # one subscribed through a crash, and a rollout never has none.
    bots = deployments["channels-bots"]["spec"]
    assert bots["replicas"] >= 2
    assert bots["strategy"]["type"] == "RollingUpdate"
    assert bots["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert bots["strategy"]["rollingUpdate"].get("maxSurge", 1) not in (0, "0%")
    assert by_kind(docs, "PodDisruptionBudget")["channels-bots"]["spec"]["minAvailable"] >= 1
    assert "channels-bots" not in hpas


def test_ingress_routes_to_services_with_websockets_and_affinity():
    _, docs = load_kustomization()
    (ingress,) = by_kind(docs, "Ingress").values()
    services = by_kind(docs, "Service")
    backends = {}
    for rule in ingress["spec"]["rules"]:
        (path,) = rule["http"]["paths"]
        backend = path["backend"]["service"]
        svc = services[backend["name"]]
        assert backend["port"]["name"] in {p["name"] for p in svc["spec"]["ports"]}
        backends[rule["host"].split(".")[0]] = backend["name"]
    assert backends == {"channels": "channels-records", "hocuspocus": "channels-collab"}
    notes = ingress["metadata"]["annotations"]
    assert notes["nginx.ingress.kubernetes.io/affinity"] == "cookie"
    assert int(notes["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 600


def test_configmap_and_secret_hold_known_settings_only():
    _, docs = load_kustomization()
    known = setting_names()
    config = by_kind(docs, "ConfigMap")["channels-config"]["data"]
    secret = by_kind(docs, "Secret")["channels-secrets"]["stringData"]
    assert set(config) <= known, set(config) - known
    assert set(secret) <= known, set(secret) - known
    assert config["RAILS_ENV"] == "production"
    assert "REDIS_URL" in secret and "REDIS_URL" not in config
