"""The RAG stack, on a host whose host.json says it runs one: both units run and are enabled, Open WebUI
and the vector database listen on loopback only and answer, Open WebUI has its accounts with sign-up
off, and its secret key is its own account's alone; where the site's gateway serves it, its TLS front
answers Open WebUI's health over TLS checked against the site's CA."""

import json

import pytest

from tests.checks.meant import only_where


@pytest.fixture
def rag(host, intent):
    return only_where(host, intent.get("rag"), "runs no RAG stack (not in rag_hosts)") and intent["rag"]


def test_both_units_run_and_start_at_boot(host, rag):
    for unit in rag["units"]:
        service = host.service(unit.removesuffix(".service"))
        assert service.is_running and service.is_enabled, unit


def test_open_webui_and_its_vector_database_listen_on_loopback_only(host, rag):
    for port in (rag["port"], rag["vector_db_port"]):
        assert host.socket(f"tcp://127.0.0.1:{port}").is_listening
        assert not host.socket(f"tcp://0.0.0.0:{port}").is_listening


def test_open_webui_has_its_accounts_and_sign_up_is_off(host, rag):
    config = json.loads(host.check_output(f"curl -sf -m 10 http://127.0.0.1:{rag['port']}/api/config"))
    assert config["features"]["enable_signup"] is False
    assert "onboarding" not in config  # the first admin exists


def test_the_secret_key_is_open_webuis_account_alone(host, rag):
    key = host.file("/etc/gpufleet/secrets/rag-webui-secret-key")
    assert key.exists and key.mode == 0o400 and key.user == "gpufleet-rag-webui"


def test_where_the_gateway_serves_it_its_tls_front_answers_for_open_webui(host, rag):
    only_where(host, rag.get("front_port"), "not served by the site's gateway (rag_gateway_port unset)")
    assert host.service("gpufleet-rag-front").is_running and host.service("gpufleet-rag-front").is_enabled
    # checked against the site's CA (beside host.json), at the address the host itself reaches it
    answer = host.run(f"curl -sf -m 10 --cacert /etc/gpufleet/site-ca.crt https://127.0.0.1:{rag['front_port']}/health")
    assert answer.rc == 0 and '"status":true' in answer.stdout.replace(" ", ""), answer.stderr
