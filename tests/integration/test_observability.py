"""The operators' kit (deploy/observability, deploy/k8s/monitoring) against
real tools: promtool checks and unit-tests the alerting rules, and a real
Prometheus on loopback scrapes records, collab and bots started here, so
that every metric the dashboard and the rules name is one the services
really export, every dashboard query parses, and every rule evaluates."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys

import jsonschema
import pytest
import redis as redis_sync
import yaml

from tests.integration.deploy_support import DEPLOY, K8S, by_kind, load_kustomization
from tests.integration.observability_support import (
    ALERTS,
    OBSERVABILITY,
    OPERATIONS_DOC,
    Prometheus,
    alert_rules,
    binary,
    dashboard,
    dashboard_queries,
    family,
    fill_variables,
    metric_names,
    variable_selectors,
)
from tests.integration.records_support import start_records
from tests.support import ServiceProcess, free_port, wait_for

MONITORING = K8S / "monitoring"
SCHEMAS = DEPLOY / "schemas" / "prometheus-operator"
JOBS = {"channels-records", "channels-collab", "channels-bots"}


def run(*args: str, cwd=OBSERVABILITY) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


def github_anchors(markdown: str) -> set[str]:
    """Heading anchors as GitHub renders them."""
    anchors = set()
    for line in markdown.splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            anchors.add(slug)
    return anchors


# --- the rules, with promtool -----------------------------------------------------


def test_promtool_accepts_the_rules():
    done = run(binary("promtool"), "check", "rules", ALERTS.name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in done.stdout


def test_each_alert_fires_on_trouble_and_stays_silent_when_healthy():
    done = run(binary("promtool"), "test", "rules", "alerts.test.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    # Every alert is tested both ways: firing on some series, silent at
    # another time or on the healthy series beside them.
    tests = yaml.safe_load((OBSERVABILITY / "alerts.test.yml").read_text())["tests"]
    fired, silent = set(), set()
    for test in tests:
        for case in test["alert_rule_test"]:
            (fired if case["exp_alerts"] else silent).add(case["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert fired == names
    assert silent == names


def test_promtool_unit_tests_fail_when_a_rule_is_wrong(tmp_path):
    """The unit tests can fail: an alert that would never fire is caught."""
    broken = ALERTS.read_text().replace('up{job=~"channels-(records|collab|bots)"} == 0',
                                        'up{job=~"channels-(records|collab|bots)"} == 2')
    assert broken != ALERTS.read_text()
    (tmp_path / "alerts.yml").write_text(broken)
    (tmp_path / "alerts.test.yml").write_text((OBSERVABILITY / "alerts.test.yml").read_text())
    done = run(binary("promtool"), "test", "rules", "alerts.test.yml", cwd=tmp_path)
    assert done.returncode != 0
    assert "ChannelsServiceDown" in done.stdout + done.stderr


def test_promtool_accepts_the_example_scrape_configuration():
    done = run(binary("promtool"), "check", "config", "prometheus.example.yml")
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_has_a_summary_and_a_runbook_section_in_the_docs():
    anchors = github_anchors(OPERATIONS_DOC.read_text())
    for rule in alert_rules():
        notes = rule["annotations"]
        assert notes["summary"].strip(), rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        page, _, anchor = notes["runbook"].partition("#")
        assert page == "docs/operations.md", rule["alert"]
        assert anchor == rule["alert"].lower() and anchor in anchors, f"{rule['alert']}: no section #{anchor}"


def test_metric_names_are_read_from_promql():
    assert metric_names(
        'sum by (instance) (rate(process_cpu_seconds_total{namespace=~"$namespace", job="x"}[5m])) '
        'and on(instance) records_ready == 0 unless on (instance) (bots_ready offset 5m > bool 1)'
    ) == {"process_cpu_seconds_total", "records_ready", "bots_ready"}
    assert metric_names('histogram_quantile(0.99, sum without (le) (rate(a_bucket[1m])))') == {"a_bucket"}
    assert family("records_deliveries_total") == "records_deliveries"


# --- the dashboard ------------------------------------------------------------------


def test_generated_files_are_up_to_date():
    done = run(sys.executable, "build.py", "--check")
    assert done.returncode == 0, done.stderr


def test_dashboard_has_a_row_per_service_and_namespace_and_instance_variables():
    board = dashboard()
    rows = [p["title"].split()[0] for p in board["panels"] if p["type"] == "row"]
    assert rows == ["records", "collab", "bots"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert {"datasource", "namespace", "instance"} <= set(variables)
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    titles = {p["title"] for p in board["panels"]}
    for needed in ["Connected sockets", "Deliveries per second", "Messages dropped, by reason",
                   "Recoveries, by result", "Redis reconnects", "Slow-client disconnects", "Open sockets",
                   "Loaded documents", "Auth decisions, by result and cause", "Closes, by code", "Drafts",
                   "Messages sent, by kind", "Messages failed, by reason", "Messages retried, by reason",
                   "Pending messages", "CPU", "Memory (resident)"]:
        assert needed in titles, needed
    # Every selector of every query is narrowed by both variables.
    for title, expr in dashboard_queries():
        for selector in re.findall(r"\{[^}]*\}", expr):
            assert 'namespace=~"$namespace"' in selector and 'instance=~"$instance"' in selector, (title, expr)


# --- the Kubernetes component ------------------------------------------------------


def crd_validator(kind: str) -> jsonschema.Validator:
    """The CRD's OpenAPI schema, strict as the API server with field
    validation: unknown fields are refused unless the schema keeps them."""
    schema = json.loads((SCHEMAS / f"monitoring.coreos.com_{kind}.v1.json").read_text())["openAPIV3Schema"]

    def strict(node):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node \
                    and not node.get("x-kubernetes-preserve-unknown-fields"):
                node.setdefault("additionalProperties", False)
            for value in node.values():
                strict(value)
        elif isinstance(node, list):
            for value in node:
                strict(value)

    strict(schema)
    return jsonschema.Draft4Validator(schema)


def component() -> tuple[dict, dict[str, dict]]:
    kustomization = yaml.safe_load((MONITORING / "kustomization.yaml").read_text())
    docs = {}
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((MONITORING / name).read_text()):
            docs[doc["kind"]] = doc
    return kustomization, docs


def test_monitoring_component_is_valid_against_the_operator_crds():
    kustomization, docs = component()
    assert kustomization["kind"] == "Component"
    assert set(docs) == {"ServiceMonitor", "PrometheusRule"}
    for kind, schema in (("ServiceMonitor", "servicemonitors"), ("PrometheusRule", "prometheusrules")):
        doc = docs[kind]
        assert doc["apiVersion"] == "monitoring.coreos.com/v1"
        errors = sorted(crd_validator(schema).iter_errors(doc), key=str)
        assert not errors, "\n".join(f"{kind} {list(e.path)}: {e.message}" for e in errors)


def test_crd_schemas_reject_broken_resources():
    _, docs = component()
    rule = copy.deepcopy(docs["PrometheusRule"])
    rule["spec"]["groups"][0]["rules"][0]["for"] = "two minutes"  # not a duration
    rule["spec"]["groups"][0]["rules"][0]["annotation"] = {}  # no such field
    assert len(list(crd_validator("prometheusrules").iter_errors(rule))) >= 2
    monitor = copy.deepcopy(docs["ServiceMonitor"])
    monitor["spec"]["endpoints"][0]["interval"] = 30  # must be a duration string
    assert list(crd_validator("servicemonitors").iter_errors(monitor))
    assert "Apache License" in (SCHEMAS / "LICENSE").read_text()


def test_prometheus_rule_carries_exactly_the_alerting_rules():
    _, docs = component()
    assert docs["PrometheusRule"]["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]


def test_service_monitor_scrapes_every_service_and_the_base_stays_without_it():
    kustomization, base = load_kustomization()
    assert not any("monitoring" in str(r) for r in kustomization["resources"] + kustomization.get("components", []))
    _, docs = component()
    spec = docs["ServiceMonitor"]["spec"]
    selected = {
        name for name, svc in by_kind(base, "Service").items()
        if spec["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    }
    assert selected == JOBS  # the Service names are the job names the rules expect
    for name in selected:
        ports = {p["name"] for p in by_kind(base, "Service")[name]["spec"]["ports"]}
        assert {e["port"] for e in spec["endpoints"]} <= ports
    assert {e["path"] for e in spec["endpoints"]} == {"/metrics"}


# --- a real Prometheus scraping the real services ----------------------------------


@pytest.fixture(scope="module")
def scraped(redis_url):
    """records, collab and bots as processes, a little traffic (a malformed
    message for records and for bots), and a Prometheus scraping them every
    second with the rules loaded, configured from prometheus.example.yml."""
    services = []
    prometheus = None
    try:
        services.append(start_records(redis_url))
        services.append(ServiceProcess("channels-collab", free_port(), {
            "REDIS_URL": redis_url, "PRIVATE_APP_URL": f"http://127.0.0.1:{free_port()}"}).start(ready=True))
        services.append(ServiceProcess("channels-bots", free_port(), {"REDIS_URL": redis_url}).start(ready=True))
        client = redis_sync.Redis.from_url(redis_url)
        client.publish("/records", b"not json")
        client.publish("chatbot/test", b"not json either")
        client.close()

        config = yaml.safe_load((OBSERVABILITY / "prometheus.example.yml").read_text())
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        config["rule_files"] = [str(ALERTS)]
        ports = dict(zip(["channels-records", "channels-collab", "channels-bots"], [s.port for s in services],
                         strict=True))
        assert {job["job_name"] for job in config["scrape_configs"]} == JOBS
        for job in config["scrape_configs"]:
            job["static_configs"] = [{"targets": [f"127.0.0.1:{ports[job['job_name']]}"]}]
        prometheus = Prometheus(config).start()
        prometheus.wait_scraped(JOBS, rounds=3)
        yield prometheus
    finally:
        if prometheus:
            prometheus.stop()
        for service in services:
            service.stop()


def missing_names(prometheus: Prometheus, names: set[str]) -> set[str]:
    series, families = prometheus.scraped_names()
    # A family is announced as `name` or without its `_total` suffix,
    # depending on how the service declared it.
    return {n for n in names if n not in series and n not in families and family(n) not in families}


def used_names() -> dict[str, set[str]]:
    used: dict[str, set[str]] = {}
    for title, expr in dashboard_queries():
        for name in metric_names(expr):
            used.setdefault(name, set()).add(f"panel {title!r}")
    for rule in alert_rules():
        for name in metric_names(rule["expr"]):
            used.setdefault(name, set()).add(f"alert {rule['alert']}")
    return used


@pytest.mark.slow
def test_every_metric_the_dashboard_and_rules_use_was_scraped(scraped):
    used = used_names()
    assert len(used) > 30
    missing = missing_names(scraped, set(used))
    assert not missing, (
        "not exported by any service (a typo, or a metric renamed or retired: fix the panel in "
        f"deploy/observability/build.py or the rule in alerts.yml): {({n: sorted(used[n]) for n in missing})}"
    )
    # The check is not vacuous: a name typed wrong is reported.
    assert missing_names(scraped, {"records_conected_sockets", "collab_auth_totl"}) == {
        "records_conected_sockets", "collab_auth_totl"}


@pytest.mark.slow
def test_every_dashboard_query_parses_and_the_variables_find_the_services(scraped):
    for title, expr in dashboard_queries():
        answer = scraped.query(fill_variables(expr))
        assert answer.status_code == 200 and answer.json()["status"] == "success", (title, expr, answer.text)
    for name, selector in variable_selectors():
        answer = scraped.api("series", **{"match[]": fill_variables(selector)})
        assert answer.status_code == 200, (name, answer.text)
        instances = {s["instance"] for s in answer.json()["data"]}
        assert len(instances) == 3, (name, instances)


@pytest.mark.slow
def test_process_and_health_panels_show_each_service(scraped):
    for service in ("records", "collab", "bots"):
        memory = f"process_resident_memory_bytes and on(instance) {service}_ready"
        (sample,) = scraped.query(memory).json()["data"]["result"]
        assert float(sample["value"][1]) > 10e6
        (ready,) = scraped.query(f"{service}_ready").json()["data"]["result"]
        assert ready["value"][1] == "1"
    for service in ("records", "bots"):
        (live,) = scraped.query(f"{service}_redis_subscription_live").json()["data"]["result"]
        assert live["value"][1] == "1"
    dropped = scraped.query('records_messages_dropped_total').json()["data"]["result"]
    assert sum(float(s["value"][1]) for s in dropped) == 1


@pytest.mark.slow
def test_rules_evaluate_cleanly_and_stay_silent_on_a_healthy_system(scraped):
    def evaluated():
        groups = scraped.api("rules").json()["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return rules if rules and all(r.get("lastEvaluation", "").startswith("20") for r in rules) else None

    rules = wait_for(evaluated, 15, what="rules evaluated")
    assert {r["name"] for r in rules} == {r["alert"] for r in alert_rules()}
    for rule in rules:
        assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
    alerts = scraped.api("alerts").json()["data"]["alerts"]
    assert alerts == []
