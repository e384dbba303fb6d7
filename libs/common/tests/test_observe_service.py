"""observe_service: readiness, subscription and process metrics read at
scrape time from the service's own registry."""

from channels_common.observability import observe_service
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families


def scrape(registry: CollectorRegistry) -> dict[str, float]:
    text = generate_latest(registry).decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_gauges_follow_readiness_and_the_subscription_at_each_scrape():
    state = {"ready": False, "live": False}
    registry = CollectorRegistry()
    observe_service(registry, "records", lambda: (state["ready"], {"why": "x"}), lambda: state["live"])
    first = scrape(registry)
    assert first["records_ready"] == 0 and first["records_redis_subscription_live"] == 0
    state.update(ready=True, live=True)
    second = scrape(registry)
    assert second["records_ready"] == 1 and second["records_redis_subscription_live"] == 1
    # The process's CPU and memory, and the Python version, in the same registry.
    assert second["process_resident_memory_bytes"] > 1e6
    assert "process_cpu_seconds_total" in second
    assert "python_info" in second


def test_a_plain_boolean_readiness_and_no_subscription():
    registry = CollectorRegistry()
    observe_service(registry, "collab", lambda: True)
    metrics = scrape(registry)
    assert metrics["collab_ready"] == 1
    assert not any(name.endswith("_redis_subscription_live") for name in metrics)
