"""Writes the operators' kit files that are derived, so that each has one
source: the Grafana dashboard (from the panel lists below) and the
Kubernetes PrometheusRule (from alerts.yml).

    python deploy/observability/build.py          # rewrite both
    python deploy/observability/build.py --check  # exit 1 if either is stale

A new metric is one `Panel(...)` line in its service's list (and, if it
deserves waking someone, one rule in alerts.yml plus its promtool test).
Queries name metrics directly, with the `$namespace`/`$instance` template
variables on every selector; process metrics are unprefixed, so they are
tied to a service by `and on(instance) <service>_ready`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
DASHBOARD = HERE / "grafana-dashboard.json"
ALERTS = HERE / "alerts.yml"
PROMETHEUS_RULE = HERE.parent / "k8s" / "monitoring" / "prometheusrule.yaml"

SELECTOR = 'namespace=~"$namespace", instance=~"$instance"'
RATE = "$__rate_interval"


def sel(metric: str, extra: str = "") -> str:
    """`metric{extra, namespace=~..., instance=~...}`."""
    return f"{metric}{{{extra + ', ' if extra else ''}{SELECTOR}}}"


@dataclass(frozen=True)
class Target:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    title: str
    targets: tuple[Target, ...]
    unit: str = "short"
    description: str = ""
    kind: str = "timeseries"


def panel(title: str, *targets: tuple[str, str], unit: str = "short", description: str = "") -> Panel:
    return Panel(title, tuple(Target(e, legend) for e, legend in targets), unit, description)


def process_panels(service: str) -> list[Panel]:
    """CPU and memory of the service's processes (prometheus_client's process
    collector, Linux only)."""
    own = f"and on(instance) {sel(service + '_ready')}"
    return [
        panel("CPU", (f"rate({sel('process_cpu_seconds_total')}[{RATE}]) {own}", "{{instance}}"),
              unit="percentunit", description="CPU seconds per second of each process (1 = one core)."),
        panel("Memory (resident)", (f"{sel('process_resident_memory_bytes')} {own}", "{{instance}}"),
              unit="bytes"),
    ]


def health_panel(service: str, subscribes: bool) -> Panel:
    targets = [(sel(f"{service}_ready"), "ready {{instance}}")]
    if subscribes:
        targets.append((sel(f"{service}_redis_subscription_live"), "subscription live {{instance}}"))
    return panel("Ready / Redis subscription live" if subscribes else "Ready", *targets,
                 description="1 = yes. Ready is what /readyz answers.")


@dataclass
class Row:
    title: str
    panels: list[Panel] = field(default_factory=list)


ROWS = [
    Row("records (Socket.IO)", [
        panel("Connected sockets", (f"sum by (instance) ({sel('records_connected_sockets')})", "{{instance}}")),
        panel("Deliveries per second",
              (f"sum by (instance) (rate({sel('records_deliveries_total')}[{RATE}]))", "all {{instance}}"),
              (f"sum by (instance) (rate({sel('records_direct_deliveries_total')}[{RATE}]))",
               "straight to websocket {{instance}}"),
              unit="ops", description="Event packets sent to sockets (one per recipient)."),
        panel("Messages relayed per second, by event",
              (f"sum by (event) (rate({sel('records_messages_relayed_total')}[{RATE}]))", "{{event}}"), unit="ops"),
        panel("Messages dropped, by reason",
              (f"sum by (reason) (increase({sel('records_messages_dropped_total')}[{RATE}]))", "{{reason}}"),
              description="Redis messages that were not valid (each is logged with its channel and reason)."),
        panel("Recoveries, by result",
              (f"sum by (result) (increase({sel('records_recoveries_total')}[{RATE}]))", "{{result}}"),
              description="recovered: the client got what it missed; refused: unknown or expired session "
                          "(normal); error: Redis failed."),
        panel("Redis reconnects",
              (f"sum by (instance) (increase({sel('records_redis_reconnects_total')}[{RATE}]))", "{{instance}}")),
        panel("Slow-client disconnects",
              (f"sum by (instance) (increase({sel('records_slow_client_disconnects_total')}[{RATE}]))",
               "{{instance}}"),
              description="Sockets cut off because they did not read (send buffer over MAX_CLIENT_BUFFER_BYTES)."),
        panel("Room lookups deferred",
              (f"sum by (instance) (increase({sel('records_room_lookups_deferred_total')}[{RATE}]))",
               "{{instance}}"),
              description="Connections let in with notices only while Redis did not answer."),
        health_panel("records", subscribes=True),
        *process_panels("records"),
    ]),
    Row("collab (Hocuspocus/Yjs)", [
        panel("Open sockets", (f"sum by (instance) ({sel('collab_open_sockets')})", "{{instance}}")),
        panel("Loaded documents", (f"sum by (instance) ({sel('collab_loaded_documents')})", "{{instance}}")),
        panel("Auth decisions, by result and cause",
              (f"sum by (result, cause) (increase({sel('collab_auth_total')}[{RATE}]))", "{{result}} ({{cause}})"),
              description="allowed; denied by Rails (rails_denied), Rails timeout, Rails unreachable; "
                          "refused_name (never asked Rails)."),
        panel("Closes, by code",
              (f"sum by (code) (increase({sel('collab_closes_total')}[{RATE}]))", "{{code}}"),
              description="4205 reset (reconnect), 4408 timeout, 1009 too big, 1002 protocol error, "
                          "1011 server fault."),
        panel("Drafts",
              (f"sum by (instance) ({sel('collab_stored_drafts')})", "written within the TTL {{instance}}"),
              (f"sum by (instance) (increase({sel('collab_drafts_saved_total')}[{RATE}]))", "saved {{instance}}"),
              description="Documents whose draft this instance wrote to Redis within COLLAB_DRAFT_TTL_SECONDS."),
        panel("Cluster: updates appended to Redis per second",
              (f"sum by (instance) (rate({sel('collab_updates_appended_total')}[{RATE}]))", "{{instance}}"),
              unit="ops", description="Client updates in Redis, each acknowledged (SyncStatus) only then."),
        panel("Cluster: updates not yet in Redis (unacknowledged)",
              (f"sum by (instance) ({sel('collab_unacked_updates')})", "updates {{instance}}"),
              description="Held in memory while Redis is slow or down, up to COLLAB_MAX_UNACKED_BYTES; "
                          "past it the affected sockets stop being read."),
        panel("Cluster: bytes not yet in Redis",
              (f"sum by (instance) ({sel('collab_unacked_bytes')})", "{{instance}}"), unit="bytes"),
        panel("Cluster: receive lag from other instances (p99)",
              (f"histogram_quantile(0.99, sum by (le, instance) "
               f"(rate({sel('collab_receive_lag_seconds_bucket')}[{RATE}])))", "{{instance}}"),
              unit="s", description="From another instance's append to the update being applied here."),
        panel("Cluster: compactions, gap reloads, loads from Redis",
              (f"sum by (result) (increase({sel('collab_compactions_total')}[{RATE}]))", "compaction {{result}}"),
              (f"sum by (instance) (increase({sel('collab_gap_reloads_total')}[{RATE}]))", "gap reload {{instance}}"),
              (f"sum by (instance) (increase({sel('collab_documents_loaded_total')}[{RATE}]))",
               "loaded {{instance}}")),
        panel("Cluster: Redis up",
              (f"min by (instance) ({sel('collab_redis_up')})", "{{instance}}"),
              description="1 while appends and the reader work; 0 during an outage (acknowledgements wait)."),
        panel("Connection attempts throttled (429)",
              (f"sum by (instance) (increase({sel('collab_throttled_total')}[{RATE}]))", "{{instance}}"),
              description="Refused before the upgrade by the opt-in attempt throttle."),
        panel("Frames received per second, by type",
              (f"sum by (type) (rate({sel('collab_frames_total')}[{RATE}]))", "{{type}}"), unit="ops"),
        health_panel("collab", subscribes=False),
        *process_panels("collab"),
    ]),
    Row("bots (Matrix)", [
        panel("Messages sent, by kind",
              (f"sum by (kind) (increase({sel('bots_messages_sent_total')}[{RATE}]))", "{{kind}}")),
        panel("Messages failed, by reason",
              (f"sum by (reason) (increase({sel('bots_messages_failed_total')}[{RATE}]))", "{{reason}}")),
        panel("Messages retried, by reason",
              (f"sum by (reason) (increase({sel('bots_messages_retried_total')}[{RATE}]))", "{{reason}}")),
        panel("Pending messages", (f"sum by (instance) ({sel('bots_pending_messages')})", "{{instance}}"),
              description="Kept until seen done (queued, in flight, or copies for a takeover); beyond "
                          "BOTS_MAX_PENDING_MESSAGES new ones are dropped."),
        panel("Exactly once: claims",
              (f"sum by (instance) (increase({sel('bots_messages_claimed_total')}[{RATE}]))", "claimed {{instance}}"),
              (f"sum by (instance) (increase({sel('bots_messages_taken_over_total')}[{RATE}]))",
               "taken over {{instance}}"),
              (f"sum by (instance) (increase({sel('bots_messages_deduplicated_total')}[{RATE}]))",
               "deduplicated {{instance}}"),
              description="Started under the room's claim; of those, in rooms taken over from an instance "
                          "whose lease lapsed; identical publishes counted once."),
        panel("Messages given up, by reason",
              (f"sum by (reason) (increase({sel('bots_messages_given_up_total')}[{RATE}]))", "{{reason}}"),
              description="Kept messages dropped before done: a keep bound (count, bytes, age), lost (no live "
                          "instance held them), shutdown."),
        panel("Redis reconnects",
              (f"sum by (instance) (increase({sel('bots_redis_reconnects_total')}[{RATE}]))", "{{instance}}")),
        panel("Matrix clients",
              (f"sum by (instance) ({sel('bots_cached_clients')})", "cached {{instance}}"),
              (f"sum by (instance) ({sel('bots_open_clients')})", "open {{instance}}")),
        health_panel("bots", subscribes=True),
        *process_panels("bots"),
    ]),
]

SERVICE_READY = "records_ready|collab_ready|bots_ready"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def _variable(name: str, label: str, query: str) -> dict:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "definition": query,
        # A plain string: every Grafana version since 7 reads it.
        "query": query,
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        # "All" matches series without the label too (a plain Prometheus
        # outside Kubernetes has no namespace label).
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
    }


def dashboard() -> dict:
    panels: list[dict] = []
    next_id = 1
    y = 0
    for row in ROWS:
        panels.append({"id": next_id, "type": "row", "title": row.title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        next_id += 1
        y += 1
        for i, p in enumerate(row.panels):
            panels.append({
                "id": next_id,
                "type": p.kind,
                "title": p.title,
                "description": p.description,
                "datasource": DATASOURCE,
                "gridPos": {"h": 8, "w": 8, "x": (i % 3) * 8, "y": y + (i // 3) * 8},
                "fieldConfig": {"defaults": {"unit": p.unit}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                            "tooltip": {"mode": "multi", "sort": "desc"}},
                "targets": [
                    {"refId": chr(ord("A") + n), "datasource": DATASOURCE, "expr": t.expr,
                     "legendFormat": t.legend, "range": True}
                    for n, t in enumerate(p.targets)
                ],
            })
            next_id += 1
        y += ((len(row.panels) + 2) // 3) * 8
    return {
        "__comment": "Generated by deploy/observability/build.py; edit the panel lists there.",
        "uid": "loomio-channels",
        "title": "Loomio channels",
        "description": "records, collab and bots: one row per service (docs/operations.md).",
        "tags": ["loomio", "channels"],
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "timezone": "",
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0},
            _variable("namespace", "Namespace", f'label_values({{__name__=~"{SERVICE_READY}"}}, namespace)'),
            _variable("instance", "Instance",
                      f'label_values({{__name__=~"{SERVICE_READY}", namespace=~"$namespace"}}, instance)'),
        ]},
        "annotations": {"list": []},
        "panels": panels,
    }


def dashboard_text() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def prometheus_rule_text() -> str:
    """alerts.yml's groups as a prometheus-operator PrometheusRule."""
    lines = ALERTS.read_text().splitlines()
    start = lines.index("groups:")
    body = "\n".join(("  " + line) if line.strip() else "" for line in lines[start:])
    return (
        "# Generated by deploy/observability/build.py from deploy/observability/alerts.yml.\n"
        "apiVersion: monitoring.coreos.com/v1\n"
        "kind: PrometheusRule\n"
        "metadata:\n"
        "  name: loomio-channels\n"
        "  labels:\n"
        "    app.kubernetes.io/part-of: loomio-channels\n"
        "spec:\n"
        + body
        + "\n"
    )


OUTPUTS = {DASHBOARD: dashboard_text, PROMETHEUS_RULE: prometheus_rule_text}


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for path, render in OUTPUTS.items():
        text = render()
        if path.exists() and path.read_text() == text:
            continue
        if check:
            stale.append(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    for path in stale:
        print(f"stale: {path} (run python deploy/observability/build.py)", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
