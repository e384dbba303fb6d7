"""Reading the operators' kit (deploy/observability) the way Prometheus and
Grafana read it, for the tests: the metric names a PromQL expression uses,
the dashboard's queries with their template variables filled in, and a real
Prometheus server on loopback."""

from __future__ import annotations

import calendar
import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support import ROOT, free_port, wait_for

OBSERVABILITY = ROOT / "deploy" / "observability"
ALERTS = OBSERVABILITY / "alerts.yml"
DASHBOARD = OBSERVABILITY / "grafana-dashboard.json"
OPERATIONS_DOC = ROOT / "docs" / "operations.md"

# What Grafana puts in place of its built-in interval variables.
GRAFANA_INTERVALS = {"$__rate_interval": "1m", "$__interval": "30s", "$__range": "1h"}

_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
             "group_left", "group_right", "inf", "nan"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"' + r"|'(?:[^'\\]|\\.)*'")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
# Numbers and durations (5m, 1e3, 0.5) first, so their letters are not names.
_TOKEN = re.compile(r"[0-9][0-9A-Za-z_.]*|[A-Za-z_:][A-Za-z0-9_:]*")


def binary(name: str) -> str:
    """A Prometheus tool, or a failed test saying how to get it (never a skip)."""
    found = shutil.which(name)
    if not found:
        pytest.fail(f"`{name}` is not installed: install Debian's `prometheus` package "
                    "(apt-get install prometheus; .ci/run does)", pytrace=False)
    return found


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects: identifiers that are not a
    function, keyword, label, grouping list or duration."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", "{}", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "[]", text)  # range and subquery durations
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _TOKEN.finditer(text):
        word = match.group()
        rest = text[match.end():].lstrip()
        if word[0].isdigit() or rest.startswith("(") or word.lower() in _KEYWORDS:
            continue
        names.add(word)
    return names


def fill_variables(expr: str) -> str:
    """A dashboard query as Grafana sends it with every option selected:
    label variables become `.*`, interval variables a duration."""
    for name, value in GRAFANA_INTERVALS.items():
        expr = expr.replace(name, value)
    return re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", ".*", expr)


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel target, in dashboard order."""
    out = []
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def variable_selectors() -> list[tuple[str, str]]:
    """(variable, series selector) of every `label_values(selector, label)` variable."""
    out = []
    for var in dashboard()["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query)
        assert match, f"variable {var['name']}: {query}"
        out.append((var["name"], match.group(1)))
    return out


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def family(name: str) -> str:
    """The metric family a sample name belongs to (text format: counters are
    typed without `_total`)."""
    for suffix in ("_total", "_created", "_bucket", "_count", "_sum"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


class Prometheus:
    """A real Prometheus on loopback with its own config and storage."""

    def __init__(self, config: dict):
        self.directory = Path(tempfile.mkdtemp(prefix="prometheus-"))
        self.port = free_port()
        self.config_path = self.directory / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = self.directory / "prometheus.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Prometheus:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed by stop()
        self.process = subprocess.Popen(
            [binary("prometheus"), f"--config.file={self.config_path}",
             f"--storage.tsdb.path={self.directory / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT,
        )

        def ready():
            if self.process.poll() is not None:
                raise AssertionError(f"prometheus exited {self.process.returncode}: {self.logs()[-2000:]}")
            try:
                return httpx.get(self.url + "/-/ready", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 30, what="prometheus ready")
        return self

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def api(self, path: str, **params) -> httpx.Response:
        return httpx.get(self.url + "/api/v1/" + path, params=params, timeout=10)

    def query(self, expr: str) -> httpx.Response:
        return self.api("query", query=expr)

    def targets(self) -> list[dict]:
        return self.api("targets").json()["data"]["activeTargets"]

    def scraped_names(self) -> tuple[set[str], set[str]]:
        """(series names stored, metric families announced by a scrape's
        HELP/TYPE lines, including label-only families with no sample yet)."""
        series = set(self.api("label/__name__/values").json()["data"])
        metadata = set(self.api("metadata").json()["data"])
        return series, metadata

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process:
            self._log.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def wait_scraped(self, jobs: set[str], rounds: int = 2, timeout: float = 30) -> None:
        """Every job's targets up and scraped at least `rounds` times after now."""
        since = time.time()

        def done():
            targets = [t for t in self.targets() if t["labels"]["job"] in jobs]
            if {t["labels"]["job"] for t in targets} != jobs:
                return False
            for t in targets:
                if t["health"] != "up":
                    return False
                last = t["lastScrape"]
                # RFC 3339 with nanoseconds; seconds are enough here.
                stamp = calendar.timegm(time.strptime(last[:19], "%Y-%m-%dT%H:%M:%S"))
                if stamp < since + rounds - 1:
                    return False
            return True

        wait_for(done, timeout, interval=0.2, what=f"prometheus scraping {sorted(jobs)}")
