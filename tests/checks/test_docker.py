"""Hosts meant to run Docker: engine active, log rotation merged into daemon.json."""

import json


def test_docker_is_enabled_and_running(docker_host):
    service = docker_host.service("docker")
    assert service.is_enabled
    assert service.is_running


def test_daemon_json_rotates_json_file_logs(docker_host):
    daemon = json.loads(docker_host.file("/etc/docker/daemon.json").content_string)
    assert daemon["log-driver"] == "json-file"
    assert set(daemon["log-opts"]) >= {"max-size", "max-file"}


def test_engine_uses_the_configured_log_driver(docker_host):
    assert docker_host.check_output("docker info --format '{{.LoggingDriver}}'") == "json-file"
