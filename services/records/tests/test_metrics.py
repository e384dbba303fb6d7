"""The per-message counters are plain integers exposed at scrape time under
the same names prometheus_client counters had."""

from channels_records.metrics import Metrics
from prometheus_client import generate_latest


def test_hot_counters_are_exposed_as_prometheus_counters():
    m = Metrics()
    m.hot.deliveries += 5
    m.hot.direct += 4
    m.hot.relayed_one("records")
    m.hot.relayed_one("records")
    m.hot.relayed_one("notice")
    text = generate_latest(m.registry).decode()
    assert "# TYPE records_deliveries_total counter" in text or "# TYPE records_deliveries counter" in text
    assert "records_deliveries_total 5.0" in text
    assert "records_direct_deliveries_total 4.0" in text
    assert 'records_messages_relayed_total{event="records"} 2.0' in text
    assert 'records_messages_relayed_total{event="notice"} 1.0' in text
