"""The RAG stack's parts, from an inventory: the check of the rag_ settings (each fault named), Open
WebUI's settings (the inventory's, gpufleet's own winning), its container's arguments (loopback, no
secret in them), the units' order (Open WebUI after the vector database and the two model services),
and what Open WebUI 0.12.4 really answers on /api/config (captured: tests/data/open-webui)."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from operations.core import settings
from operations.core.errors import ConfigError
from operations.rag import front, parts
from operations.rag.stack import WebUIConfig, admin_request

DATA = Path(__file__).resolve().parents[1] / "data" / "open-webui"
CHAT = {"name": "chat", "engine": "llamacpp", "image": "x:1", "model": "m/m.gguf", "port": 8082}
EMBED = {**CHAT, "name": "embed", "port": 8083, "served_name": "nomic"}


@pytest.fixture
def data(tmp_path):
    password = tmp_path / "admin-password"
    password.write_text("a-long-enough-password\n")
    return {
        **settings.DEFAULTS,
        "inference_services": [CHAT, EMBED],
        "rag_chat_service": "chat",
        "rag_embedding_service": "embed",
        "rag_admin_email": "admin@site.example",
        "rag_admin_password_file": str(password),
    }


def test_a_whole_stack_passes_its_check(data):
    parts.check_stack(data, "gpu-1")


@pytest.mark.parametrize(
    "change, field",
    [
        ({"rag_chat_service": None}, "rag_chat_service"),
        ({"rag_embedding_service": "nomic"}, "rag_embedding_service"),  # a served name, not a service
        ({"rag_admin_email": "admin"}, "rag_admin_email"),
        ({"rag_admin_password_file": "/nonexistent/password"}, "rag_admin_password_file"),
        ({"rag_port": 8082}, "rag_port"),  # the chat service's
        ({"rag_vector_db_port": 3000}, "rag_vector_db_port"),  # Open WebUI's
        ({"rag_webui_settings": {"PORT": "9000"}}, "rag_webui_settings['PORT']"),
        ({"rag_webui_settings": {"OPENAI_API_KEY": "sk-x"}}, "rag_webui_settings['OPENAI_API_KEY']"),
        ({"rag_webui_settings": {"S3_SECRET_ACCESS_KEY": "x"}}, "rag_webui_settings['S3_SECRET_ACCESS_KEY']"),
        ({"rag_webui_settings": {"RAG_TEMPLATE": "a\nb"}}, "rag_webui_settings['RAG_TEMPLATE']"),
        ({"rag_webui_settings": {"rag_top_k": "3"}}, "rag_webui_settings['rag_top_k']"),
        ({"inference_services": [CHAT, EMBED, {**CHAT, "name": "rag-webui", "port": 9}]}, "inference_services[2].name"),
        ({"gpufleet_offline": True, "gpufleet_bundle": None}, "rag_webui_image"),
    ],
)
def test_each_bad_setting_is_named(data, change, field):
    with pytest.raises(ConfigError) as raised:
        parts.check_stack({**data, **change}, "gpu-1")
    assert raised.value.field == field


def test_a_stack_needs_a_gpu_host_running_docker(data):
    with pytest.raises(ConfigError) as raised:
        parts.check_stack(data, "gpu-1", groups=("rag_hosts",))
    assert raised.value.field == "rag_hosts"
    with pytest.raises(ConfigError) as raised:
        parts.check_stack({**data, "nvidia_toolkit_engine": "podman"}, "gpu-1")
    assert raised.value.field == "nvidia_toolkit_engine"


def test_a_short_admin_password_is_refused(data, tmp_path):
    short = tmp_path / "short"
    short.write_text("hunter2\n")
    with pytest.raises(ConfigError, match="at least 12"):
        parts.check_stack({**data, "rag_admin_password_file": str(short)}, "gpu-1")


def test_settings_are_the_inventorys_with_gpufleets_own_winning(data):
    settings_ = parts.webui_settings(
        {**data, "rag_webui_settings": {"RAG_TOP_K": 5, "ENABLE_SIGNUP": True, "ENABLE_TITLE_GENERATION": False}},
        CHAT,
        EMBED,
    )
    parts.check_stack({**data, "rag_webui_settings": {"ENABLE_API_KEY": True, "RAG_TOP_K": 5}})  # not secrets
    assert settings_["RAG_TOP_K"] == "5"
    assert settings_["ENABLE_SIGNUP"] == "true"  # the site may open sign-up; off unless it says so
    assert settings_["ENABLE_TITLE_GENERATION"] == "false"
    assert settings_["ENABLE_PERSISTENT_CONFIG"] == "false"
    assert settings_["OPENAI_API_BASE_URL"] == "http://127.0.0.1:8082/v1"
    assert settings_["RAG_OPENAI_API_BASE_URL"] == "http://127.0.0.1:8083/v1"
    assert settings_["RAG_EMBEDDING_MODEL"] == "nomic"
    assert settings_["VECTOR_DB"] == "qdrant" and settings_["QDRANT_URI"] == "http://127.0.0.1:6333"
    assert parts.webui_settings(data, CHAT, EMBED)["ENABLE_SIGNUP"] == "false"
    assert not any(word in name for name in settings_ for word in ("KEY", "PASSWORD", "TOKEN"))


def test_a_service_behind_its_tls_front_is_reached_on_its_engines_side_without_a_key(data):
    fronted = {**CHAT, "proxy_port": 8443, "api_key_file": "/keys", "listen": "0.0.0.0"}
    url, _ = parts.model_url(fronted)
    assert url.startswith("http://127.0.0.1:") and not parts.key_needed(fronted)
    assert parts.key_needed({**CHAT, "api_key_file": "/keys"})


def test_open_webui_runs_on_loopback_with_no_secret_in_its_arguments(data):
    keyed = {**CHAT, "api_key_file": "/keys"}
    keys = parts.key_files("/etc/gpufleet/secrets", keyed, EMBED)
    args = parts.webui_args(data, "60601:60601", "/var/lib/gpufleet/rag/webui", "/s/rag-webui.env", "/s/key", keys)
    assert args[args.index("--user") + 1] == "60601:60601"
    assert "--read-only" in args and args[args.index("--network") + 1] == "host"
    assert "HOST=127.0.0.1" in args and "PORT=3000" in args
    assert "/s/key:/app/backend/.webui_secret_key:ro" in args
    assert "/etc/gpufleet/secrets/rag-webui-chat.key:/run/secrets/gpufleet-chat-key:ro" in args
    assert args[-3:-1] == ["bash", "-c"] and args[-1].endswith("exec bash start.sh")
    assert 'OPENAI_API_KEY="$(head -n1 /run/secrets/gpufleet-chat-key)"' in args[-1]
    # without a key to read, the image's own command runs
    plain = parts.webui_args(data, "1:1", "/d", "/e", "/k", {})
    assert plain[-1] == data["rag_webui_image"]


def test_open_webui_starts_after_the_vector_database_and_both_model_services(data):
    ids = {"rag-vectordb": "60600:60600", "rag-webui": "60601:60601"}
    units = parts.units({**data, "rag_vector_db": "chroma", "rag_vector_db_image": "c:1"}, ids, "/s", CHAT, EMBED)
    webui = units["gpufleet-rag-webui.service"]
    assert "Requires=gpufleet-rag-vectordb.service\n" in webui
    after = "gpufleet-rag-vectordb.service gpufleet-chat.service gpufleet-embed.service"
    assert f"After=docker.service network-online.target {after}\n" in webui
    assert "gpufleet-wait-ready 300 http://127.0.0.1:3000/health" in webui
    vector_db = units["gpufleet-rag-vectordb.service"]
    assert "Requires=" not in vector_db
    assert "c:1 run --path /data --host 127.0.0.1 --port 6333" in vector_db
    assert "http://127.0.0.1:6333/api/v2/heartbeat" in vector_db
    assert vector_db.startswith("# Managed by gpufleet: RAG stack part rag-vectordb")


def test_what_open_webui_says_before_and_after_its_first_account():
    before = WebUIConfig().process((DATA / "api-config-0.12.4-no-account.json").read_text().splitlines())
    after = WebUIConfig().process((DATA / "api-config-0.12.4-with-accounts.json").read_text().splitlines())
    assert before == {"version": "0.12.4", "signup": False, "onboarding": True}
    assert after == {"version": "0.12.4", "signup": False, "onboarding": False}
    assert WebUIConfig().process([]) is None  # not answering


def test_the_sign_up_request_carries_the_password_file(tmp_path):
    password = tmp_path / "p"
    password.write_text("correct horse battery\n")
    assert json.loads(admin_request("a@b.c", str(password))) == {
        "name": "Admin",
        "email": "a@b.c",
        "password": "correct horse battery",
    }


@pytest.mark.parametrize(
    "change, field",
    [
        ({}, "rag_gateway_port"),  # no gateway host in the inventory
        ({"gateways": ["gw"], "rag_front_port": 8083}, "rag_front_port"),  # the embedding service's
        ({"gateways": ["gw"], "rag_front_port": 3000}, "rag_front_port"),  # Open WebUI's own
        ({"gateways": ["gw"], "rag_gateway_port": 443}, "rag_gateway_port"),  # the gateway's services' port
        ({"gateways": ["gw"], "inference_listen": "127.0.0.1"}, "inference_listen"),  # another host's gateway
    ],
)
def test_a_stack_served_by_the_gateway_needs_one_and_ports_of_its_own(data, change, field):
    gateways = change.pop("gateways", [])
    exposed = {**data, "rag_gateway_port": 8444, **change}
    with pytest.raises(ConfigError) as raised:
        parts.check_stack(exposed, "gpu-1", gateways=gateways)
    assert raised.value.field == field
    parts.check_stack({**data, "rag_gateway_port": 8444, "inference_listen": "0.0.0.0"}, "gpu-1", gateways=["gw"])
    parts.check_stack({**data, "rag_gateway_port": 8444}, "gpu-1", gateways=["gpu-1"])  # its own gateway


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed here")
def test_the_front_unit_verifies_and_waits_for_open_webui_through_it(tmp_path):
    unit = tmp_path / "gpufleet-rag-front.service"
    unit.write_text(
        front.unit_text("0.0.0.0", 3443, 3000, "/etc/gpufleet/proxy/rag-front.cfg", "/etc/gpufleet/ca.crt", "1:1", 300)
    )
    checked = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    complaints = [
        line
        for line in checked.stderr.splitlines()
        if "gpufleet-rag-front.service" in line and "gpufleet-wait-ready is not executable" not in line
    ]
    assert complaints == [], checked.stderr
    text = unit.read_text()
    assert "ExecStartPost=/usr/local/lib/gpufleet/gpufleet-wait-ready 300 https://127.0.0.1:3443/health\n" in text
    assert "PartOf=gpufleet-rag-webui.service\n" in text and "After=gpufleet-rag-webui.service" in text
    config = front.config_text("0.0.0.0", 3443, 3000, "/etc/gpufleet/secrets/site.pem", "1:2", 600)
    assert "bind 0.0.0.0:3443 ssl crt /etc/gpufleet/secrets/site.pem" in config
    assert "server webui 127.0.0.1:3000 check" in config and "uid 1\n    gid 2\n" in config
