"""
The site's monitoring on the lab: lab-ubu-1 in monitoring_hosts (GPUFLEET_LAB_MONITORING), every lab
host running the distribution's node exporter, lab-1 and lab-2 serving llama.cpp's chat behind their
TLS fronts with lab-2 their gateway (GPUFLEET_LAB_GATEWAY), the whole lab deployed. Prometheus on
lab-ubu-1 scrapes every host's exporter, both engines' own metrics through their fronts and the
gateway's HAProxy; a stopped service raises GpufleetServiceNotReady (read through Prometheus' HTTP
API, bounded waits) and clears when it is back; a host that is not a monitoring host is refused at
the exporter's port and needs the key for an engine's metrics. lab-gap-1, on a network no lab host
reaches, is down to Prometheus and raises GpufleetHostDown; the host-by-host checks pass on a watched
host and, on the monitoring host, fail naming it. Measured: .lab/measurements/monitoring.json. The default run
afterwards stops the exporters and removes Prometheus' configuration.
"""

import json
import time
import xml.etree.ElementTree as ElementTree

import pytest

from operations.monitoring import status_page
from tests.lab import hosts as lab_hosts

from .conftest import REPO, measurements, run_checks, run_deploy, until
from .test_security import KEY

WATCHED = {"GPUFLEET_LAB_GATEWAY": "lab-2", "GPUFLEET_LAB_MONITORING": "lab-ubu-1"}
MONITOR = "lab-ubu-1"
PROMETHEUS = "http://127.0.0.1:9090/api/v1"


def sh(name, command, **kwargs):
    return lab_hosts.ssh({"name": name}, command, check=False, **kwargs)


def _api(path):
    """Prometheus' answer to ``path`` of its HTTP API, asked on the monitoring host (bounded: 10 s)."""
    answer = sh(MONITOR, f"curl -sfg -m 10 '{PROMETHEUS}/{path}'")
    return json.loads(answer.stdout)["data"] if answer.returncode == 0 else None


def _targets():
    """``{(job, host, service): health}`` of Prometheus' active targets."""
    data = _api("targets") or {"activeTargets": []}
    return {
        (t["labels"]["job"], t["labels"]["host"], t["labels"].get("service")): t["health"]
        for t in data["activeTargets"]
    }


def _firing(alertname):
    """The labels of each firing ``alertname`` alert."""
    data = _api("alerts") or {"alerts": []}
    return [a["labels"] for a in data["alerts"] if a["labels"]["alertname"] == alertname and a["state"] == "firing"]


@pytest.fixture(scope="module")
def measured():
    yield from measurements("monitoring")


@pytest.fixture(scope="module")
def watched(second_deploy, lab, measured):
    started = time.monotonic()
    first = run_deploy(env=WATCHED)
    measured["first_deploy_s"] = round(time.monotonic() - started, 1)
    assert first.rc == 0, first.output[-4000:]
    yield first
    back = run_deploy()
    assert back.rc == 0, back.output[-3000:]
    assert "Stop and disable prometheus.service (no longer in monitoring_hosts)" in back.output
    assert "Stop and disable prometheus-node-exporter.service (no monitoring host in the inventory)" in back.output
    assert sh("lab-1", "systemctl is-active prometheus-node-exporter").stdout.strip() != "active"
    assert sh("lab-1", "systemctl is-active gpufleet-host-metrics.timer").stdout.strip() != "active"
    assert (
        sh(MONITOR, "ls /etc/prometheus/gpufleet 2>&1; systemctl is-active prometheus").stdout.split()[-1] != "active"
    )


def test_prometheus_scrapes_every_host_both_engines_through_their_fronts_and_the_gateway(watched, lab, measured):
    deployed = [name for name, host in lab.items() if host.get("role", "deploy") == "deploy"]
    # lab-gap-1 is on its own network, which no lab host reaches: its exporter is down to Prometheus
    wanted = {
        **{("node", name, None): "down" if lab[name]["airgapped"] else "up" for name in deployed},
        ("engines", "lab-1", "chat"): "up",
        ("engines", "lab-2", "chat"): "up",
        ("gateways", "lab-2", None): "up",
    }
    measured["all_targets_up_s"] = until(lambda: _targets() == wanted, 90)
    assert measured["all_targets_up_s"] is not None, _targets()
    # the engines' own series, by host and service
    processing = _api("query?query=llamacpp:requests_processing")["result"]
    assert sorted((r["metric"]["host"], r["metric"]["service"]) for r in processing) == [
        ("lab-1", "chat"),
        ("lab-2", "chat"),
    ]
    units = _api("query?query=node_systemd_unit_state{name%3D%22gpufleet-chat.service%22,state%3D%22active%22}")
    active = {r["metric"]["host"]: r["value"][1] for r in units["result"]}  # every host that serves chat
    assert {"lab-1", "lab-2", "lab-net-1"} <= set(active) and set(active.values()) == {"1"}, active
    # gpufleet's host metrics, through the exporter's textfile collector: the weights' filesystem of
    # every host that serves; nothing of GPUs on hosts without one
    weights = _api("query?query=gpufleet_weights_filesystem_size_bytes")["result"]
    assert {"lab-1", "lab-2", "lab-net-1"} <= {r["metric"]["host"] for r in weights}, weights
    assert all(float(r["value"][1]) > 0 for r in weights)
    # only lab-pve-1 has /dev/nvidiactl (its double's device nodes, no GPU behind them): nvidia-smi fails there,
    # and not with a driver/library mismatch
    smi = {r["metric"]["host"]: r["value"][1] for r in _api("query?query=gpufleet_nvidia_smi_ok")["result"]}
    mismatch = {
        r["metric"]["host"]: r["value"][1]
        for r in _api("query?query=gpufleet_nvidia_driver_library_mismatch")["result"]
    }
    assert smi == {"lab-pve-1": "0"} and mismatch == {"lab-pve-1": "0"}, (smi, mismatch)
    assert _firing("GpufleetServiceNotReady") == []
    unreachable = sorted(name for name in deployed if lab[name]["airgapped"])
    measured["host_down_alert_s"] = until(
        lambda: sorted(a["host"] for a in _firing("GpufleetHostDown")) == unreachable, 60
    )
    assert measured["host_down_alert_s"] is not None, _api("alerts")


def test_a_second_run_changes_nothing(watched):
    again = run_deploy(env=WATCHED)
    assert again.rc == 0 and again.total_changed() == 0, again.changed()


def test_a_stopped_service_raises_its_alert_and_it_clears_when_back(watched, measured):
    assert until(lambda: _targets().get(("engines", "lab-1", "chat")) == "up", 60) is not None
    sh("lab-1", "systemctl stop gpufleet-chat.service")
    try:
        measured["alert_fires_after_stop_s"] = until(
            lambda: [(a["host"], a["service"]) for a in _firing("GpufleetServiceNotReady")] == [("lab-1", "chat")], 90
        )
        assert measured["alert_fires_after_stop_s"] is not None, _api("alerts")
    finally:
        sh("lab-1", "systemctl start gpufleet-chat.service")
    measured["alert_clears_after_start_s"] = until(lambda: _firing("GpufleetServiceNotReady") == [], 120)
    assert measured["alert_clears_after_start_s"] is not None, _api("alerts")


def test_only_the_monitoring_host_reaches_the_exporters_and_the_engines_metrics_without_a_key(watched, lab):
    exporter = f"http://{lab['lab-1']['address']}:9100/metrics"
    metrics = f"https://{lab['lab-1']['address']}:8443/metrics"
    ca = "/etc/gpufleet/site-ca.crt"
    code = "curl -s -o /dev/null -m 5 -w '%{http_code}' "
    assert sh(MONITOR, f"{code}{exporter}").stdout == "200"
    assert sh(MONITOR, f"{code}--cacert /etc/prometheus/gpufleet/site-ca.crt {metrics}").stdout == "200"
    # lab-2 may reach lab-1's front (an inference client: the gateway), not its exporter; its metrics need the key
    assert sh("lab-2", f'{code}{exporter}; echo " $?"').stdout.strip() == "000 7"
    assert sh("lab-2", f"{code}--cacert {ca} {metrics}").stdout == "401"
    keyed = f"{code}--cacert {ca} -H 'Authorization: Bearer {KEY.read_text().strip()}' {metrics}"
    assert sh("lab-2", keyed).stdout == "200"
    # a host that is neither: refused at both
    assert sh("lab-net-1", f'{code}{exporter}; echo " $?"').stdout.strip() == "000 7"
    assert sh("lab-net-1", f'{code}-k {metrics}; echo " $?"').stdout.strip() == "000 7"


def test_the_fleets_picture_is_drawn_from_this_prometheus(watched, lab):
    out = REPO / ".lab" / "measurements" / "fleet-status.svg"
    status_page.main(["--ssh", MONITOR, "--ssh-config", str(lab_hosts.SSH_CONFIG), "--minutes", "5", "--out", str(out)])
    svg = ElementTree.parse(out).getroot()
    texts = {text.text for text in svg.iter("{http://www.w3.org/2000/svg}text")}
    deployed = {name for name, host in lab.items() if host.get("role", "deploy") == "deploy"}
    assert deployed <= texts and "GpufleetHostDown (critical) host=lab-gap-1" in texts, sorted(texts)


def test_the_checks_pass_on_a_watched_host_and_name_the_unreachable_one_on_the_monitoring_host(watched, lab):
    checks, outcomes = run_checks(["tests/checks/test_monitoring.py"], [MONITOR, "lab-1"])
    assert {
        ("test_node_exporter_runs_with_gpufleets_arguments_and_answers", MONITOR): "PASSED",
        ("test_node_exporter_runs_with_gpufleets_arguments_and_answers", "lab-1"): "PASSED",
        ("test_prometheus_runs_on_loopback_with_the_targets_the_deploy_wrote", MONITOR): "PASSED",
        ("test_every_target_is_up_and_no_alert_fires", MONITOR): "FAILED",
    }.items() <= outcomes.items(), checks.stdout[-4000:]
    # the one failure is the air-gapped host the monitoring host cannot reach, named
    assert f"node lab-gap-1 http://{lab['lab-gap-1']['address']}:9100/metrics" in checks.stdout, checks.stdout[-4000:]
