"""Engine profiles, unit rendering and staging plans: given these inputs, these results."""

import pytest

from operations.core.errors import ConfigError
from operations.offline import staging
from operations.services import auth_proxy, engines, facts, inference, removal
from operations.weights import volumes as weights

SERVICE = {
    "name": "chat",
    "engine": "llamacpp",
    "image": "ghcr.io/ggml-org/llama.cpp:server-b4500",
    "model": "tiny/tiny.gguf",
    "memory": "2g",
    "args": ["--ctx-size", "256"],
}


@pytest.mark.parametrize(
    "change, field, message",
    [
        ({"engine": "vllm2"}, "engine", "unknown engine 'vllm2'"),
        ({"image": "vllm/vllm-openai:latest"}, "image", "must be pinned by tag or digest, never latest"),
        ({"image": "vllm/vllm-openai"}, "image", "must be pinned"),
        ({"args": ["--max-model-len", "4096"]}, "args", "llamacpp does not take --max-model-len"),
        (
            {"engine": "ollama", "api_key_file": "/k"},
            "api_key_file",
            "ollama has no API key of its own: set proxy_port",
        ),
        ({"proxy_port": 8080}, "proxy_port", "a TCP port number other than the service's own"),
        ({"proxy_port": "8090"}, "proxy_port", "a TCP port number"),
        ({"gpus": "two"}, "gpus", "'all', 'none' or a list of GPU indices"),
        ({"network": "macvlan"}, "network", "'host'"),
        ({"modle": "x"}, "modle", "unknown field"),
        ({"model": "/etc/shadow"}, "model", "a path inside the weight volumes root"),
    ],
)
def test_bad_service_names_the_field(change, field, message):
    with pytest.raises(ConfigError) as error:
        engines.check_service(3, {**SERVICE, **change}, "gpu-7")
    assert error.value.field == f"inference_services[3].{field}"
    assert message in str(error.value) and "gpu-7" in str(error.value)


def test_cuda_gate_refuses_image_for_newer_driver():
    data = {"inference_services": [{**SERVICE, "cuda": "12.4"}], "nvidia_driver_version": "535.261.03"}
    with pytest.raises(ConfigError) as error:
        inference.check_services(data, "gpu-1")
    assert error.value.field == "inference_services[0].image"
    assert "needs NVIDIA driver >= 550.54.14" in str(error.value)


def test_docker_args_host_network_gpu_selection_no_secret():
    args = engines.docker_args({**SERVICE, "gpus": [0, 2]}, "/srv/w", "/etc/gpufleet/secrets/chat.env", True)
    assert args[args.index("--network") + 1] == "host"
    assert args[args.index("--gpus") + 1] == '"device=0,2"'
    assert args[args.index("--env-file") + 1] == "/etc/gpufleet/secrets/chat.env"
    assert "/srv/w:/models:ro" in args and "--user" in args and "--memory" in args
    assert args[args.index("--n-gpu-layers") + 1] == "999"
    cpu = engines.docker_args({**SERVICE, "network": "bridge", "port": 9000}, "/srv/w", None, False)
    assert "--gpus" not in cpu and "--env-file" not in cpu and "127.0.0.1:9000:9000" in cpu
    assert cpu[cpu.index("--host") + 1] == "0.0.0.0"  # inside its own network namespace, published on loopback
    assert cpu[cpu.index("--n-gpu-layers") + 1] == "0"


def test_vllm_gets_shared_memory_per_gpu():
    args = engines.docker_args({**SERVICE, "engine": "vllm", "args": [], "gpus": [0, 1, 2, 3]}, "/w", None, True)
    assert args[args.index("--shm-size") + 1] == "4g"
    assert args[args.index("--port") + 1] == "8000"


def test_unit_escapes_percent_and_has_checks():
    unit = inference.unit_text({**SERVICE, "args": ["--chat-template", "100%{x}"]}, "/srv/w", None, False, 300)
    assert "100%%{x}" in unit
    assert "ExecStartPre=/usr/local/lib/gpufleet/gpufleet-verify-weights /srv/w/tiny" in unit
    assert (
        "ExecStartPost=/usr/local/lib/gpufleet/gpufleet-wait-ready 300 http://127.0.0.1:8080/health "
        "http://127.0.0.1:8080/v1/models" in unit
    )
    assert "Restart=always" in unit and "TimeoutStartSec=330" in unit


def test_staging_plan_skips_intact_resumes_partial_and_checks_moved():
    wanted = {
        "a": {"size": 10, "sha256": "1" * 64},
        "b": {"size": 20, "sha256": "2" * 64},
        "c": {"size": 30, "sha256": "3" * 64},
        "d": {"size": 40, "sha256": "4" * 64},
    }
    on_host = {
        "files": {"a": [10, 100], "c": [30, 555]},
        "parts": {"b": 7},
        "record": {"a": [10, 100, "1" * 64], "c": [30, 300, "3" * 64]},
    }
    intact, check, send = staging.plan(wanted, on_host)
    assert (intact, check, send) == (["a"], ["c"], {"b": 7, "d": 0})
    assert staging.plan(wanted, on_host, rehash=True)[1] == ["a", "c"]


def test_staged_files_fact_parses_find_output():
    fact = staging.StagedFiles()
    parsed = fact.process(
        [
            "474656 1795430738.1234 tiny.gguf",
            "4096 1795430739.0 x/y.tar.gpufleet-part",
            "--record--",
            '{"tiny.gguf": [474656, 1795430738, "ab"]}',
        ]
    )
    assert parsed == {
        "files": {"tiny.gguf": [474656, 1795430738]},
        "parts": {"x/y.tar": 4096},
        "record": {"tiny.gguf": [474656, 1795430738, "ab"]},
    }


def test_each_service_gets_its_own_account_id_kept_across_runs_and_user_overrides_it():
    accounts = {
        "users": {"root": 0, "nobody": 65534, "gpufleet-old": 60600},
        "groups": {"root": 0, "gpufleet-old": 60600, "ops": 60601},
    }
    services = [
        {"name": "chat"},
        {"name": "old"},
        {"name": "embed"},
        {"name": "mine", "user": "1000:1001"},
        {"name": "bare", "user": 2000},
    ]
    ids = inference.service_ids(services, accounts)
    assert ids == {
        "chat": "60602:60602",
        "old": "60600:60600",
        "embed": "60603:60603",
        "mine": "1000:1001",
        "bare": "2000:2000",
    }
    created = {
        "users": {**accounts["users"], "gpufleet-chat": 60602, "gpufleet-embed": 60603},
        "groups": {**accounts["groups"], "gpufleet-chat": 60602, "gpufleet-embed": 60603},
    }
    assert inference.service_ids(services, created) == ids  # a second run keeps every id


def test_llamacpp_key_goes_in_its_own_file_mounted_read_only_and_out_of_the_environment(tmp_path):
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    keyed = {**SERVICE, "api_key_file": str(key)}
    where = inference.placement(keyed, "/etc/gpufleet/secrets")
    assert where == {
        "key_file": "/etc/gpufleet/secrets/chat.key",
        "env_file": None,
        "key_source": "/etc/gpufleet/secrets/chat.key",
        "key_var": "",
    }
    args = engines.docker_args(keyed, "/srv/w", None, False, user="60600:60600", key_file=where["key_file"])
    assert args[args.index("--user") + 1] == "60600:60600"
    assert "/etc/gpufleet/secrets/chat.key:/run/secrets/gpufleet-api-key:ro" in args
    assert args[args.index("--api-key-file") + 1] == "/run/secrets/gpufleet-api-key"
    assert "--env-file" not in args and not any("s3cret" in arg for arg in args)
    assert inference.env_content(keyed, engines.ENGINES["llamacpp"], key_in_file=True) is None
    # vLLM and TGI read their key from the environment only: the root-only env file.
    vllm = inference.placement({**keyed, "engine": "vllm"}, "/etc/gpufleet/secrets")
    assert vllm == {
        "key_file": None,
        "env_file": "/etc/gpufleet/secrets/chat.env",
        "key_source": "/etc/gpufleet/secrets/chat.env",
        "key_var": "VLLM_API_KEY",
    }
    unit = inference.unit_text(keyed, "/srv/w", None, False, 300, user="60600:60600", key_file=where["key_file"])
    assert "Environment=GPUFLEET_KEY_FILE=/etc/gpufleet/secrets/chat.key GPUFLEET_KEY_VAR=\n" in unit


def test_service_user_must_be_numeric():
    with pytest.raises(ConfigError, match=r"inference_services\[0\]\.user: a numeric UID"):
        engines.check_service(0, {**SERVICE, "user": "nobody"})
    engines.check_service(0, {**SERVICE, "user": "1000:1000"})


def test_service_accounts_fact_reads_passwd_and_group():
    fact = facts.ServiceAccounts()
    assert fact.process(["root:0", "gpufleet-chat:60600", "--", "root:0", "gpufleet-chat:60600", "docker:998"]) == {
        "users": {"root": 0, "gpufleet-chat": 60600},
        "groups": {"root": 0, "gpufleet-chat": 60600, "docker": 998},
    }


def test_services_listen_on_loopback_unless_told_and_are_probed_where_they_listen():
    args = engines.docker_args(SERVICE, "/srv/w", None, False)
    assert args[args.index("--host") + 1] == "127.0.0.1"
    assert engines.ready_urls(SERVICE) == ["http://127.0.0.1:8080/health", "http://127.0.0.1:8080/v1/models"]
    lan = {**SERVICE, "listen": "10.0.0.5"}
    assert engines.docker_args(lan, "/srv/w", None, False)[
        -len(engines.engine_args(lan, 8080, False, bind="10.0.0.5")) :
    ] == engines.engine_args(lan, 8080, False, bind="10.0.0.5")
    assert engines.ready_urls(lan)[0] == "http://10.0.0.5:8080/health"
    assert engines.ready_urls({**SERVICE, "listen": "0.0.0.0"})[0] == "http://127.0.0.1:8080/health"
    ollama = engines.docker_args(
        {**SERVICE, "engine": "ollama", "listen": "::1", "network": "bridge"}, "/w", None, False
    )
    assert "[::1]:11434:11434" in ollama and "OLLAMA_HOST=0.0.0.0:11434" in ollama


@pytest.mark.parametrize(
    "service, data, field",
    [
        (
            {**SERVICE, "engine": "ollama", "args": [], "model": "tiny"},
            {"inference_listen": "0.0.0.0"},
            "inference_listen",
        ),
        ({**SERVICE, "listen": "10.0.0.5"}, {}, r"inference_services\[0\]\.listen"),
    ],
)
def test_a_service_without_a_key_is_not_exposed_beyond_loopback_unless_asked(service, data, field, tmp_path):
    _ollama_models(tmp_path)
    data = {**data, "inference_services": [service], "inference_weight_volumes": {"tiny": {"from": str(tmp_path)}}}
    with pytest.raises(ConfigError, match=rf"^{field}: .*no (API key|api_key_file).*inference_expose_unauthenticated"):
        inference.check_services(data, None)
    inference.check_services(
        {**data, "inference_expose_unauthenticated": True, "inference_allowed_sources": ["10.0.0.0/8"]}, None
    )
    inference.check_services(
        {
            **data,
            "inference_listen": "127.0.0.1",
            "inference_services": [{key: value for key, value in service.items() if key != "listen"}],
        },
        None,
    )  # loopback: fine


def _ollama_models(directory):
    """``directory`` as a weight volume both engines take: a GGUF, and an Ollama models directory."""
    (directory / "tiny.gguf").write_bytes(b"GGUF")
    for part in ("manifests/registry.ollama.ai/library/tiny/latest", "blobs/sha256-" + "0" * 64):
        (directory / part).parent.mkdir(parents=True, exist_ok=True)
        (directory / part).write_text("{}")


def _exposed(tmp_path, service, **data):
    _ollama_models(tmp_path)
    (tmp_path / "key").write_text("k\n")
    return {
        "inference_listen": "0.0.0.0",
        "inference_allowed_sources": ["10.0.0.0/8"],
        **data,
        "inference_services": [{**service, "api_key_file": str(tmp_path / "key")}],
        "inference_weight_volumes": {"tiny": {"from": str(tmp_path)}},
    }


def test_vllm_with_its_own_key_is_not_exposed_its_key_leaves_invocations_open(tmp_path):
    vllm = {**SERVICE, "engine": "vllm", "args": []}
    with pytest.raises(
        ConfigError,
        match=r"^inference_listen: 0\.0\.0\.0: service chat is keyed, but vllm's key "
        r"leaves some routes open \(vLLM: /invocations",
    ):
        inference.check_services(_exposed(tmp_path, vllm), None)
    inference.check_services(_exposed(tmp_path, {**vllm, "proxy_port": 8443}), None)  # the proxy guards every route


def test_ollama_behind_the_proxy_may_listen_beyond_loopback(tmp_path):
    ollama = {**SERVICE, "engine": "ollama", "args": [], "proxy_port": 11443, "model": "tiny"}
    inference.check_services(_exposed(tmp_path, ollama), None)
    assert engines.guarded(ollama) and engines.exposed_ports(ollama) == [11443]


def test_listening_beyond_loopback_needs_allowed_sources_unless_the_firewall_is_yours(tmp_path):
    data = _exposed(tmp_path, SERVICE, inference_allowed_sources=[])
    with pytest.raises(
        ConfigError,
        match=r"^inference_listen: 0\.0\.0\.0: service chat listens beyond this host, "
        r"but inference_allowed_sources is empty",
    ):
        inference.check_services(data, None)
    inference.check_services({**data, "inference_firewall": False}, None)


def test_a_proxy_port_taken_by_another_service_is_named(tmp_path):
    data = _exposed(tmp_path, {**SERVICE, "proxy_port": 9000})
    data["inference_services"].append(
        {**data["inference_services"][0], "name": "other", "port": 9000, "proxy_port": 9001}
    )
    with pytest.raises(ConfigError, match=r"^inference_services\[1\]\.port: port 9000 is used twice"):
        inference.check_services(data, None)


def test_a_proxied_engine_listens_on_loopback_with_no_key_and_the_proxy_takes_the_key(tmp_path):
    service = {**SERVICE, "listen": "0.0.0.0", "proxy_port": 8443, "api_key_file": "/k"}
    engine = auth_proxy.engine_side(service)
    assert engine["listen"] == "127.0.0.1" and "api_key_file" not in engine and "proxy_port" not in engine
    assert inference.placement(engine, "/etc/gpufleet/secrets")["key_file"] is None
    assert auth_proxy.ready_urls(service) == ["https://127.0.0.1:8443/health", "https://127.0.0.1:8443/v1/models"]
    assert removal.wanted_units([service, {**SERVICE, "name": "plain"}]) == {
        "gpufleet-chat.service",
        "gpufleet-chat-proxy.service",
        "gpufleet-plain.service",
    }


def test_installed_services_are_read_from_the_units_first_lines():
    output = [
        "/etc/systemd/system/gpufleet-chat.service:# Managed by gpufleet: inference service chat (llamacpp, "
        "model tiny/tiny.gguf). Edits are overwritten.",
        "/etc/systemd/system/gpufleet-chat-proxy.service:# Managed by gpufleet: authenticating TLS front of "
        "inference service chat. Edits are overwritten.",
        # an older gpufleet's stdlib proxy, still on a host being upgraded
        "/etc/systemd/system/gpufleet-old-proxy.service:# Managed by gpufleet: authenticating proxy of "
        "inference service old. Edits are overwritten.",
        "/etc/systemd/system/gpufleet-firewall.service:# Managed by gpufleet: loads its nftables table",
    ]
    assert facts.InstalledServices().process(output) == {
        "gpufleet-chat.service": {"service": "chat", "proxy": False},
        "gpufleet-chat-proxy.service": {"service": "chat", "proxy": True},
        "gpufleet-old-proxy.service": {"service": "old", "proxy": True},
    }
    unit = auth_proxy.unit_text({**SERVICE, "proxy_port": 8443}, "1:1", "/k", "/ca", "/c", 300)
    assert facts.InstalledServices().process([f"/x/gpufleet-chat-proxy.service:{unit.splitlines()[0]}"]) == {
        "gpufleet-chat-proxy.service": {"service": "chat", "proxy": True}
    }


VLLM = {"name": "llm", "engine": "vllm", "image": "vllm/vllm-openai:v0.32.0", "model": "m", "args": []}


def test_vllm_caches_go_to_its_own_directory_and_it_knows_its_accounts_name():
    args = engines.docker_args(VLLM, "/w", None, False, user="60601:60601", cache_dir="/var/cache/gpufleet/llm")
    assert args[args.index("/var/cache/gpufleet/llm:/cache") - 1] == "-v"
    env = {args[i + 1] for i, arg in enumerate(args) if arg == "-e"}
    assert {"USER=gpufleet-llm", "LOGNAME=gpufleet-llm", "VLLM_CACHE_ROOT=/cache/vllm"} <= env
    assert {"TORCHINDUCTOR_CACHE_DIR=/cache/torchinductor", "TRITON_CACHE_DIR=/cache/triton"} <= env
    llamacpp = engines.docker_args(SERVICE, "/w", None, False, cache_dir="/var/cache/gpufleet/chat")
    assert "/var/cache/gpufleet/chat:/cache" not in llamacpp  # an engine with no caches gets no mount


def test_shared_memory_follows_the_gpus_a_service_gets_or_the_hosts_ipc():
    every = engines.docker_args(VLLM, "/w", None, True, host_gpus=8)
    assert every[every.index("--shm-size") + 1] == "8g"  # gpus: all on an 8-GPU host
    cpu = engines.docker_args({**VLLM, "gpus": "none"}, "/w", None, False, host_gpus=8)
    assert cpu[cpu.index("--shm-size") + 1] == "1g"
    shared = engines.docker_args({**VLLM, "ipc": "host"}, "/w", None, True, host_gpus=8)
    assert shared[shared.index("--ipc") + 1] == "host" and "--shm-size" not in shared


@pytest.mark.parametrize(
    "service, field, message",
    [
        ({**VLLM, "gpus": [0, 1], "args": ["--tensor-parallel-size", "4"]}, "args", "need 4 GPUs .* gives it 2"),
        ({**VLLM, "gpus": [0, 1, 2], "args": ["--tensor_parallel_size=2", "-pp", "2"]}, "args", "need 4 GPUs"),
        ({**VLLM, "gpus": "none", "args": ["-tp", "2"]}, "args", "need 2 GPUs .* gives it 0"),
        ({**VLLM, "engine": "tgi", "gpus": [0], "args": ["--num-shard", "2"]}, "args", "need 2 GPUs"),
        ({**VLLM, "ipc": "private"}, "ipc", "'host'"),
        ({**VLLM, "ipc": "host", "shm_size": "8g"}, "shm_size", "not with ipc: host"),
    ],
)
def test_parallel_sizes_and_ipc_are_checked_against_the_gpus_given(service, field, message):
    with pytest.raises(ConfigError, match=message) as error:
        engines.check_service(0, service)
    assert error.value.field == f"inference_services[0].{field}"


def test_parallel_sizes_that_fit_are_taken():
    engines.check_service(0, {**VLLM, "gpus": [0, 1, 2, 3], "args": ["--tensor-parallel-size", "2", "-pp", "2"]})
    assert engines.gpus_needed({**VLLM, "args": ["--tensor-parallel-size=2", "--pipeline-parallel-size", "2"]}) == 4
    assert engines.gpus_needed(VLLM) == 1


def test_tgi_and_vllm_keys_leave_routes_open_so_beyond_loopback_they_need_the_proxy():
    for engine in ("tgi", "vllm"):
        keyed = {**VLLM, "engine": engine, "api_key_file": "/k"}
        assert not engines.guarded(keyed)
        assert engines.guarded({**keyed, "proxy_port": 8443})


def test_ollama_is_refused_a_lone_gguf_and_given_its_models_directory_unpruned(tmp_path):
    (tmp_path / "tiny.gguf").write_bytes(b"GGUF")
    ollama = {**SERVICE, "engine": "ollama", "args": [], "model": "tiny/tiny.gguf"}
    data = {"inference_services": [ollama], "inference_weight_volumes": {"tiny": {"from": str(tmp_path)}}}
    with pytest.raises(ConfigError, match=r"no manifests/, blobs/\. A lone GGUF file needs `ollama create`") as error:
        inference.check_services(data, None)
    assert error.value.field == "inference_services[0].model"
    models = tmp_path / "models"
    models.mkdir()
    _ollama_models(models)
    volumes = {"tiny": {"from": str(models)}}
    inference.check_services(
        {"inference_services": [{**ollama, "model": "tiny"}], "inference_weight_volumes": volumes}, None
    )
    args = engines.docker_args({**ollama, "model": "tiny"}, "/w", None, False)
    assert "OLLAMA_NOPRUNE=1" in args and "OLLAMA_MODELS=/models/tiny" in args and "/w:/models:ro" in args


def test_a_large_models_start_timeout_fits_its_size(tmp_path):
    assert engines.fitting_start_timeout(300, None) == 300  # a hub volume: the setting
    assert engines.fitting_start_timeout(300, 10 << 20) == 300  # a small model: the setting
    assert engines.fitting_start_timeout(300, 140 * 10**9) == 120 + 1400  # 140 GB at 100 MB/s, plus 2 minutes
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "a.safetensors").write_bytes(b"x" * 3000)
    (tmp_path / "big" / "b.safetensors").write_bytes(b"x" * 2000)
    (tmp_path / "other.gguf").write_bytes(b"x" * 7000)
    data = {"inference_weight_volumes": {"vol": {"from": str(tmp_path)}, "hub": {"hf": "org/m", "revision": "0" * 40}}}
    assert weights.model_bytes("vol/big", data) == 5000
    assert weights.model_bytes("vol/other.gguf", data) == 7000
    assert weights.model_bytes("vol", data) == 12000
    assert weights.model_bytes("hub/x", data) is None
