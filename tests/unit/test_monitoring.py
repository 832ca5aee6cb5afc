"""The site's monitoring, read from an inventory: what Prometheus scrapes, its configuration checked
by the distribution's ``promtool``, gpufleet's alert rules evaluated by ``promtool test rules`` over
series that change as a failing fleet's do, the drop-ins' command lines, and the firewall's
admission of the monitoring hosts (``nft -c``)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from operations import TEMPLATES
from operations.core import settings
from operations.core.errors import ConfigError
from operations.monitoring import exporters, gpus, inventory, prometheus, targets
from operations.services import firewall
from tests.unit.test_firewall import NFT

# Prometheus' own checker: scripts/bootstrap.sh puts Debian's beside the venv's python
PROMTOOL = str(Path(sys.executable).parent / "promtool")
DEFAULTS = settings.DEFAULTS
CHAT = {"name": "chat", "engine": "llamacpp", "image": "x:1", "model": "m/m.gguf", "proxy_port": 8443}


def _inventory():
    return [
        ("gpu-1", {"gpufleet_site_address": "10.0.0.11", "inference_services": [CHAT]}, {"gpu_hosts"}),
        (
            "gpu-2",
            {
                "gpufleet_site_address": "10.0.0.12",
                "inference_services": [
                    {**CHAT, "name": "vllm", "engine": "vllm", "proxy_port": 9443},
                    {**CHAT, "name": "plain", "proxy_port": None},  # on loopback: nothing reaches its metrics
                    {**CHAT, "name": "ollama", "engine": "ollama", "proxy_port": 7443},  # no metrics of its own
                ],
            },
            {"gpu_hosts"},
        ),
        ("gw", {"ssh_hostname": "10.0.0.2", "monitoring_gateway_metrics_port": 9405}, {"gateway_hosts"}),
        ("mon", {"gpufleet_site_address": "10.0.0.3"}, {"monitoring_hosts"}),
    ]


def test_every_host_is_scraped_and_each_fronted_engine_with_metrics_through_its_front():
    found = targets.scrape_targets(_inventory(), DEFAULTS)
    assert found["node"] == [
        {"targets": [f"{address}:9100"], "labels": {"host": name}}
        for name, address in (("gpu-1", "10.0.0.11"), ("gpu-2", "10.0.0.12"), ("gw", "10.0.0.2"), ("mon", "10.0.0.3"))
    ]
    assert found["engines"] == [
        {
            "targets": ["10.0.0.11:8443"],
            "labels": {"host": "gpu-1", "service": "chat", "engine": "llamacpp", "__metrics_path__": "/metrics"},
        },
        {
            "targets": ["10.0.0.12:9443"],
            "labels": {"host": "gpu-2", "service": "vllm", "engine": "vllm", "__metrics_path__": "/metrics"},
        },
    ]
    assert found["gateways"] == [{"targets": ["10.0.0.2:9405"], "labels": {"host": "gw"}}]
    assert targets.monitoring_addresses(_inventory()) == ["10.0.0.3"]
    assert targets.monitoring_addresses(_inventory()[:3]) == []


def test_a_monitoring_host_needs_an_ip_address_the_exporters_firewall_can_admit():
    named = [("mon", {"ssh_hostname": "mon.example"}, {"monitoring_hosts"})]
    with pytest.raises(ConfigError) as refused:
        targets.monitoring_addresses(named)
    assert "gpufleet_site_address" in str(refused.value) and "mon" in str(refused.value)


def _write_config(tmp_path, found, gpu_labels=()):
    """gpufleet's Prometheus files as the deploy writes them, under ``tmp_path`` instead of /etc."""
    directory = tmp_path / "gpufleet"
    (directory / "targets").mkdir(parents=True)
    for job, entries in found.items():
        (directory / "targets" / f"{job}.json").write_text(prometheus.targets_text(entries))
    (directory / "alerts.yml").write_text(prometheus.rules_text(after=120, free_percent=10))
    (directory / "site-ca.crt").write_text("")
    config = prometheus.config_text(15, gpu_labels).replace(prometheus.CONFIG_DIR, str(directory))
    (directory / "prometheus.yml").write_text(config)
    return directory


def test_the_configuration_and_rules_pass_promtool(tmp_path):
    directory = _write_config(tmp_path, targets.scrape_targets(_inventory(), DEFAULTS))
    checked = subprocess.run(
        [PROMTOOL, "check", "config", str(directory / "prometheus.yml")], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 1 rule files found" in checked.stdout + checked.stderr
    assert set(yaml.safe_load((directory / "prometheus.yml").read_text())["global"].values()) == {"15s", "10s"}


def _series(series, values):
    return {"series": series, "values": values}


# Each case: the series over time (one sample a minute), and the alerts firing at 1 and at 5 minutes
# (name, the labels that pick the series it comes from, its summary).
RULE_CASES = {
    "a service that stops answering through its front": (
        [_series('up{job="engines", instance="10.0.0.11:8443", host="gpu-1", service="chat"}', "1 0 0 0 0 0 0")],
        {
            "1m": [],
            "5m": [
                (
                    "GpufleetServiceNotReady",
                    {"job": "engines", "host": "gpu-1", "service": "chat"},
                    "chat on gpu-1: its engine does not answer through its front",
                )
            ],
        },
    ),
    "a service back within the rule's wait": (
        [_series('up{job="engines", instance="10.0.0.11:8443", host="gpu-1", service="chat"}', "1 0 1 1 1 1 1")],
        {"1m": [], "5m": []},
    ),
    "a host whose exporter is gone": (
        [_series('up{job="node", instance="10.0.0.12:9100", host="gpu-2"}', "0 0 0 0 0 0 0")],
        {
            "1m": [],
            "5m": [
                (
                    "GpufleetHostDown",
                    {"job": "node", "host": "gpu-2"},
                    "gpu-2: its node exporter does not answer (host down, frozen or cut off)",
                )
            ],
        },
    ),
    "a failed gpufleet unit (others failing are not ours)": (
        [
            _series(
                'node_systemd_unit_state{job="node", instance="10.0.0.11:9100", host="gpu-1", '
                'name="gpufleet-chat.service", state="failed", type="simple"}',
                "0 1 1 1 1 1 1",
            ),
            _series(
                'node_systemd_unit_state{job="node", instance="10.0.0.11:9100", host="gpu-1", '
                'name="cron.service", state="failed", type="simple"}',
                "1 1 1 1 1 1 1",
            ),
        ],
        {
            "1m": [],
            "5m": [
                (
                    "GpufleetUnitFailed",
                    {"name": "gpufleet-chat.service", "host": "gpu-1"},
                    "gpu-1: unit gpufleet-chat.service failed",
                )
            ],
        },
    ),
    "a gateway member down (a drained one is not)": (
        [
            _series(
                'haproxy_server_status{job="gateways", host="gw", proxy="chat", server="gpu-1", state="DOWN"}', "1x6"
            ),
            _series(
                'haproxy_server_status{job="gateways", host="gw", proxy="chat", server="gpu-2", state="DOWN"}', "0x6"
            ),
            _series(
                'haproxy_server_status{job="gateways", host="gw", proxy="chat", server="gpu-2", state="DRAIN"}', "1x6"
            ),
        ],
        {
            "1m": [],
            "5m": [
                (
                    "GpufleetGatewayMemberDown",
                    {"server": "gpu-1", "proxy": "chat"},
                    "gateway gw: gpu-1 of pool chat fails its health check",
                )
            ],
        },
    ),
    "a filesystem under its free share": (
        [
            _series('node_filesystem_avail_bytes{job="node", host="gpu-1", mountpoint="/srv", fstype="ext4"}', "95x6"),
            _series('node_filesystem_size_bytes{job="node", host="gpu-1", mountpoint="/srv", fstype="ext4"}', "1000x6"),
            _series('node_filesystem_avail_bytes{job="node", host="gpu-1", mountpoint="/run", fstype="tmpfs"}', "1x6"),
            _series(
                'node_filesystem_size_bytes{job="node", host="gpu-1", mountpoint="/run", fstype="tmpfs"}', "1000x6"
            ),
        ],
        {
            "1m": [],
            "5m": [
                (
                    "GpufleetFilesystemNearlyFull",
                    {"mountpoint": "/srv", "host": "gpu-1"},
                    "gpu-1: /srv has under 10% free (images, logs)",
                )
            ],
        },
    ),
    "the weights' filesystem under its free share (named once: not again as a plain filesystem)": (
        [
            _series(
                'gpufleet_weights_filesystem_avail_bytes{job="node", host="gpu-1", path="/srv/gpufleet/weights", mountpoint="/srv"}',
                "95x6",
            ),
            _series(
                'gpufleet_weights_filesystem_size_bytes{job="node", host="gpu-1", path="/srv/gpufleet/weights", mountpoint="/srv"}',
                "1000x6",
            ),
            _series('node_filesystem_avail_bytes{job="node", host="gpu-1", mountpoint="/srv", fstype="ext4"}', "95x6"),
            _series('node_filesystem_size_bytes{job="node", host="gpu-1", mountpoint="/srv", fstype="ext4"}', "1000x6"),
        ],
        {
            "1m": [],
            "5m": [
                (
                    "GpufleetWeightsFilesystemNearlyFull",
                    {"mountpoint": "/srv", "host": "gpu-1", "path": "/srv/gpufleet/weights"},
                    "gpu-1: the weights' filesystem (/srv, holding /srv/gpufleet/weights) has under 10% free",
                )
            ],
        },
    ),
    "a GPU service whose container lost its GPUs": (
        [_series('gpufleet_service_gpus_visible{job="node", host="gpu-1", service="chat"}', "1 1 0 0 0 0 0")],
        {
            "1m": [],
            "5m": [
                (
                    "GpufleetGpuMissingInService",
                    {"service": "chat", "host": "gpu-1"},
                    "chat on gpu-1: its container no longer lists its GPUs (restart it; gpufleet's next run does)",
                )
            ],
        },
    ),
    "a driver whose packages changed under its loaded module": (
        [_series('gpufleet_nvidia_driver_library_mismatch{job="node", host="gpu-2"}', "0 0 1 1 1 1 1")],
        {
            "1m": [],
            "5m": [
                (
                    "GpufleetDriverLibraryMismatch",
                    {"host": "gpu-2"},
                    "gpu-2: NVML says Driver/library version mismatch (the driver's packages changed, the loaded "
                    "module did not: reboot the host)",
                )
            ],
        },
    ),
}


@pytest.mark.parametrize("case", RULE_CASES)
def test_the_alert_rules_fire_for_what_they_name_and_only_once_it_has_held(tmp_path, case):
    series, expected = RULE_CASES[case]
    (tmp_path / "alerts.yml").write_text(prometheus.rules_text(after=120, free_percent=10))
    all_alerts = {name for alerts in expected.values() for name, _, _ in alerts} or {"GpufleetServiceNotReady"}
    alert_tests = []
    for at, alerts in expected.items():
        for name in all_alerts:
            firing = [
                {"exp_labels": _labels_of(series, labels, name), "exp_annotations": {"summary": summary}}
                for alert, labels, summary in alerts
                if alert == name
            ]
            alert_tests.append({"eval_time": at, "alertname": name, "exp_alerts": firing})
    _promtool_test(tmp_path, series, alert_tests)


def _promtool_test(tmp_path, series, alert_tests):
    """Run ``promtool test rules`` on the rules in tmp_path/alerts.yml: ``series`` sampled once a
    minute, ``alert_tests`` what must fire when."""
    tests = {
        "rule_files": [str(tmp_path / "alerts.yml")],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series, "alert_rule_test": alert_tests}],
    }
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(tests))
    done = subprocess.run([PROMTOOL, "test", "rules", str(tmp_path / "tests.yml")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def _severity(alertname):
    """The severity gpufleet's rules give ``alertname`` (a firing alert carries it as a label)."""
    rules = yaml.safe_load(prometheus.rules_text(120, 10, 87))["groups"][0]["rules"]
    return next(rule["labels"]["severity"] for rule in rules if rule["alert"] == alertname)


def _labels_of(series, wanted, alertname):
    """The full label set of the alert raised from the one series matching ``wanted``: the series' own
    (promtool compares every label) and the rule's severity."""
    for entry in series:
        labels = dict(
            pair.split("=", 1) for pair in entry["series"].split("{", 1)[1].rstrip("}").replace('"', "").split(", ")
        )
        if all(labels.get(key) == value for key, value in wanted.items()):
            return {**labels, "severity": _severity(alertname)}
    raise AssertionError(f"no series has {wanted}")


def test_the_drop_ins_start_the_distributions_daemons_with_gpufleets_arguments():
    exporter = exporters.drop_in_text(9100)
    assert "ExecStart=\nExecStart=/usr/bin/prometheus-node-exporter --web.listen-address=:9100 " in exporter
    assert "--collector.systemd.unit-include=(gpufleet-.+|docker|containerd|nvidia-persistenced)[.]service" in exporter
    assert exporter.rstrip().endswith("--collector.textfile.directory=/var/lib/prometheus/node-exporter")
    server = prometheus.drop_in_text(9090, "30d", "/data/prometheus")
    assert "--web.listen-address=127.0.0.1:9090" in server  # never beyond the host: reached through SSH
    assert "--storage.tsdb.path=/data/prometheus --storage.tsdb.retention.time=30d" in server
    assert "ExecStartPre=+/usr/bin/install -d -o prometheus -g prometheus -m 750 /data/prometheus" in server


def test_the_monitoring_hosts_alone_are_admitted_to_the_exporter_and_the_fronts_metrics(tmp_path):
    monitoring = {"name": "monitoring", "comment": "metrics", "ports": [9100, 8443], "sources": ["10.0.0.3"]}
    text, _ = firewall.rules([8443], ["10.0.0.0/24"], [monitoring])
    (tmp_path / "firewall.nft").write_text(text)
    checked = subprocess.run([NFT, "-c", "-f", str(tmp_path / "firewall.nft")], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    input_chain = text.split("chain input {", 1)[1].split("}", 1)[0]
    rules = [line.strip() for line in input_chain.splitlines() if "dport" in line]
    assert rules == [
        "tcp dport @inference_ports ip saddr @allowed_ipv4 accept",
        "tcp dport @monitoring_ports ip saddr @monitoring_ipv4 accept",
        "tcp dport @inference_ports reject with tcp reset",
        "tcp dport @monitoring_ports reject with tcp reset",
    ]  # every admission before any refusal: a front's port admits both its clients and the monitoring hosts
    assert "elements = { 8443, 9100 }" in text and "elements = { 10.0.0.3/32 }" in text


# --- GPU metrics (dcgm-exporter; no GPU here: its output as captured by others, tests/data/dcgm) ---

CAPTURE = Path(__file__).resolve().parents[1] / "data" / "dcgm" / "tesla-t4-metrics.txt"


def _captured():
    """``{metric: labels}`` of the captured dcgm-exporter output (its real label set per series)."""
    found = {}
    for line in CAPTURE.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, rest = line.split("{", 1)
        labels = dict(re.findall(r'(\w+)="([^"]*)"', rest.rsplit("}", 1)[0]))
        found[name] = labels
    return found


def _gpu_series(metric, values, name=None):
    """A series of ``metric`` as Prometheus stores it from the gpus job: the capture's labels, then the
    job's (host, instance) and the service label gpufleet's relabelling adds (named ``name``, when
    given, for a field the capture lacks)."""
    extra = {"job": "gpus", "instance": "10.0.0.11:9400", "host": "gpu-1", "service": "chat"}
    text = ", ".join(f'{key}="{value}"' for key, value in {**_captured()[metric], **extra}.items())
    return {"series": f"{name or metric}{{{text}}}", "values": values}


GPU_RULE_CASES = {
    "an XID error": (
        [_gpu_series("DCGM_FI_DEV_XID_ERRORS", "0 0 79 79 79 79 79")],
        [("GpufleetGpuXidError", "gpu-1 GPU 0 (chat): XID error 79")],
    ),
    "uncorrectable ECC errors (the field gpufleet adds to the collectors, labelled as the others)": (
        [_gpu_series("DCGM_FI_DEV_XID_ERRORS", "0 0 2 2 2 2 2", name="DCGM_FI_DEV_ECC_DBE_VOL_TOTAL")],
        [
            (
                "GpufleetGpuEccUncorrectable",
                "gpu-1 GPU 0 (chat): 2 uncorrectable (double-bit) ECC errors since the driver loaded",
            )
        ],
    ),
    "a hot GPU": (
        [_gpu_series("DCGM_FI_DEV_GPU_TEMP", "70 88 90 91 92 92 92")],
        [("GpufleetGpuHot", "gpu-1 GPU 0 (chat): 92 C, over 87 C")],
    ),
    "a GPU slowed by heat (HW thermal 0x40 with the power cap 0x4)": (
        [_gpu_series("DCGM_FI_DEV_CLOCK_THROTTLE_REASONS", "1 68 68 68 68 68 68")],
        [
            (
                "GpufleetGpuThrottled",
                "gpu-1 GPU 0 (chat): clocks slowed by heat or power (DCGM_FI_DEV_CLOCK_THROTTLE_REASONS says which)",
            )
        ],
    ),
    "a GPU only idle, capped or boosting (0x1, 0x4, 0x10)": (
        [_gpu_series("DCGM_FI_DEV_CLOCK_THROTTLE_REASONS", "1 4 16 21 21 21 21")],
        [],
    ),
    "an exporter that stops answering (a driver/library mismatch)": (
        [{"series": 'up{job="gpus", instance="10.0.0.11:9400", host="gpu-1"}', "values": "1 0 0 0 0 0 0"}],
        [
            (
                "GpufleetGpuMetricsMissing",
                "gpu-1: dcgm-exporter does not answer (the driver cannot be read: a driver/library version "
                "mismatch after a driver change without reboot, a GPU off the bus; or the exporter is down)",
            )
        ],
    ),
}


@pytest.mark.parametrize("case", GPU_RULE_CASES)
def test_the_gpu_alert_rules_read_dcgm_exporters_series_as_it_labels_them(tmp_path, case):
    series, firing = GPU_RULE_CASES[case]
    (tmp_path / "alerts.yml").write_text(prometheus.rules_text(after=120, free_percent=10, gpu_temperature_limit=87))
    names = [name for name, _ in firing] or ["GpufleetGpuXidError", "GpufleetGpuHot", "GpufleetGpuThrottled"]
    labels = dict(
        pair.split("=", 1) for pair in series[0]["series"].split("{", 1)[1].rstrip("}").replace('"', "").split(", ")
    )
    alert_tests = []
    for name in names:
        expected = [
            {
                "exp_labels": {**labels, "severity": _severity(name)},
                "exp_annotations": {"summary": summary},
            }
            for alert, summary in firing
            if alert == name
        ]
        alert_tests.append({"eval_time": "5m", "alertname": name, "exp_alerts": expected})
    _promtool_test(tmp_path, series, alert_tests)


def test_the_collectors_file_names_real_fields_and_every_one_the_rules_read():
    counters = (TEMPLATES / "gpufleet-dcgm-counters.csv").read_text().splitlines()
    fields = [line.split(",")[0].strip() for line in counters if line.strip() and not line.startswith("#")]
    assert set(_captured()) <= set(fields)  # each field dcgm-exporter answered with in the capture
    read = set(re.findall(r"DCGM_FI_[A-Z_]+", prometheus.rules_text(120, 10, 87)))
    assert read and read <= set(fields), read - set(fields)


def test_gpu_hosts_are_scraped_and_each_gpus_series_names_the_services_using_it():
    hosts = [
        (
            "gpu-1",
            {
                "gpufleet_site_address": "10.0.0.11",
                "inference_services": [
                    {**CHAT, "gpus": "all"},
                    {**CHAT, "name": "embed", "gpus": [1]},
                    {**CHAT, "name": "cpu", "gpus": "none"},
                ],
            },
            {"gpu_hosts"},
        ),
        (
            "gpu-2.lan",
            {"gpufleet_site_address": "10.0.0.12", "inference_services": [{**CHAT, "gpus": [0, 1]}]},
            {"gpu_hosts"},
        ),
        ("cpu-1", {"gpufleet_site_address": "10.0.0.13", "monitoring_gpu_metrics": False}, {"gpu_hosts"}),
        ("mon", {"gpufleet_site_address": "10.0.0.3"}, {"monitoring_hosts"}),
    ]
    assert targets.scrape_targets(hosts, DEFAULTS)["gpus"] == [
        {"targets": ["10.0.0.11:9400"], "labels": {"host": "gpu-1"}},
        {"targets": ["10.0.0.12:9400"], "labels": {"host": "gpu-2.lan"}},
    ]
    assert targets.gpu_service_labels(hosts) == [
        {"source_labels": ["host"], "regex": "gpu\\-1", "replacement": "chat"},
        {"source_labels": ["host", "gpu"], "regex": "gpu\\-1;1", "replacement": "chat,embed"},
        {"source_labels": ["host", "gpu"], "regex": "gpu\\-2\\.lan;0", "replacement": "chat"},
        {"source_labels": ["host", "gpu"], "regex": "gpu\\-2\\.lan;1", "replacement": "chat"},
    ]


def test_the_configuration_with_gpu_labels_passes_promtool_and_labels_as_planned(tmp_path):
    labels = [{"source_labels": ["host", "gpu"], "regex": "gpu\\-2\\.lan;1", "replacement": "chat,embed"}]
    directory = _write_config(tmp_path, targets.scrape_targets(_inventory(), DEFAULTS), gpu_labels=labels)
    checked = subprocess.run(
        [PROMTOOL, "check", "config", str(directory / "prometheus.yml")], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    job = {j["job_name"]: j for j in yaml.safe_load((directory / "prometheus.yml").read_text())["scrape_configs"]}[
        "gpus"
    ]
    assert job["metric_relabel_configs"] == [
        {
            "source_labels": ["host", "gpu"],
            "regex": "gpu\\-2\\.lan;1",
            "target_label": "service",
            "replacement": "chat,embed",
        }
    ]


def test_the_gpu_exporters_unit_never_pulls_and_serves_on_the_host_network():
    unit = gpus.unit_text(
        "nvcr.io/nvidia/k8s/dcgm-exporter:4.2.3-4.1.3-ubuntu22.04", 9400, "/etc/gpufleet/dcgm-counters.csv"
    )
    command = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert "--pull never --network host --gpus all --cap-add SYS_ADMIN" in command
    assert command.endswith(
        "nvcr.io/nvidia/k8s/dcgm-exporter:4.2.3-4.1.3-ubuntu22.04 -a :9400 -f /etc/dcgm-exporter/gpufleet-counters.csv"
    )
    assert "-v /etc/gpufleet/dcgm-counters.csv:/etc/dcgm-exporter/gpufleet-counters.csv:ro" in command


def test_what_monitoring_leaves_on_a_host_is_looked_for_in_one_command(tmp_path):
    (tmp_path / "b").mkdir()
    fact = inventory.PresentPaths()
    paths = (str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c"))
    done = subprocess.run(["sh", "-c", fact.command(paths)], capture_output=True, text=True)
    assert done.returncode == 0 and fact.process(done.stdout.splitlines()) == [str(tmp_path / "b")]
    assert set(inventory.LEFTOVERS) == {
        prometheus.CONFIG_DIR,
        f"/etc/systemd/system/{exporters.HOST_METRICS}.timer",
        f"/etc/systemd/system/{gpus.UNIT}",
    }
