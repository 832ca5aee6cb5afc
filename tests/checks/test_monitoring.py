"""The site's monitoring, on a host whose host.json says it takes part: the node exporter runs on its
port with gpufleet's arguments and answers here; on a monitoring host, Prometheus runs gpufleet's
configuration on loopback only with the targets the deploy wrote, every one of them is up, and no
alert fires."""

import json

import pytest

from tests.checks.meant import only_where


@pytest.fixture
def monitoring(host, intent):
    return (
        only_where(host, intent.get("monitoring"), "not watched (no monitoring host in its inventory)")
        and intent["monitoring"]
    )


@pytest.fixture
def prometheus(host, monitoring):
    return only_where(host, monitoring.get("prometheus"), "not a monitoring host (not in monitoring_hosts)") and (
        monitoring
    )


def test_node_exporter_runs_with_gpufleets_arguments_and_answers(host, monitoring):
    exporter = host.service("prometheus-node-exporter")
    assert exporter.is_running and exporter.is_enabled
    port = monitoring["node_exporter_port"]
    assert "--collector.systemd" in host.run("systemctl show -p ExecStart prometheus-node-exporter").stdout
    metrics = host.run(f"curl -sf -m 10 http://127.0.0.1:{port}/metrics")
    assert metrics.rc == 0 and 'node_systemd_unit_state{name="' in metrics.stdout


def _api(host, address, path):
    return json.loads(host.check_output(f"curl -sf -m 10 http://{address}/api/v1/{path}"))["data"]


def test_prometheus_runs_on_loopback_with_the_targets_the_deploy_wrote(host, prometheus):
    assert host.service("prometheus").is_running and host.service("prometheus").is_enabled
    address = prometheus["prometheus"]
    assert address.startswith("127.0.0.1:") and host.socket(f"tcp://{address}").is_listening
    assert not host.socket(f"tcp://0.0.0.0:{address.split(':')[1]}").is_listening
    active = _api(host, address, "targets")["activeTargets"]
    found = {(t["labels"]["job"], t["scrapeUrl"].split("/")[2]) for t in active}
    assert found == {(job, target) for job, targets in prometheus["targets"].items() for target in targets}


def test_every_target_is_up_and_no_alert_fires(host, prometheus):
    address = prometheus["prometheus"]
    down = [
        f"{t['labels']['job']} {t['labels'].get('host')} {t['scrapeUrl']}: {t['lastError']}"
        for t in _api(host, address, "targets")["activeTargets"]
        if t["health"] != "up"
    ]
    assert down == []
    firing = [a["labels"] for a in _api(host, address, "alerts")["alerts"] if a["state"] == "firing"]
    assert firing == []
