"""Engine profiles, unit rendering and staging plans: given these inputs, these results."""

import pytest

from operations import engines, inference, staging
from operations.errors import ConfigError

SERVICE = {"name": "chat", "engine": "llamacpp", "image": "ghcr.io/ggml-org/llama.cpp:server-b4500",
           "model": "tiny/tiny.gguf", "memory": "2g", "args": ["--ctx-size", "256"]}


@pytest.mark.parametrize("change, field, message", [
    ({"engine": "vllm2"}, "engine", "unknown engine 'vllm2'"),
    ({"image": "vllm/vllm-openai:latest"}, "image", "must be pinned by tag or digest, never latest"),
    ({"image": "vllm/vllm-openai"}, "image", "must be pinned"),
    ({"args": ["--max-model-len", "4096"]}, "args", "llamacpp does not take --max-model-len"),
    ({"engine": "ollama", "api_key_file": "/k"}, "api_key_file", "ollama has no API key support"),
    ({"gpus": "two"}, "gpus", "'all', 'none' or a list of GPU indices"),
    ({"network": "macvlan"}, "network", "'host'"),
    ({"modle": "x"}, "modle", "unknown field"),
    ({"model": "/etc/shadow"}, "model", "a path inside the weight volumes root"),
])
def test_bad_service_names_the_field(change, field, message):
    with pytest.raises(ConfigError) as error:
        engines.check_service(3, {**SERVICE, **change}, "gpu-7")
    assert error.value.field == f"inference_services[3].{field}"
    assert message in str(error.value) and "gpu-7" in str(error.value)


def test_cuda_gate_refuses_image_for_newer_driver():
    data = {"inference_services": [{**SERVICE, "cuda": "12.4"}], "nvidia_driver_version": "535.261.03"}
    with pytest.raises(ConfigError) as error:
        inference._check(data, "gpu-1")
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
    assert "--gpus" not in cpu and "--env-file" not in cpu and "9000:9000" in cpu
    assert cpu[cpu.index("--n-gpu-layers") + 1] == "0"


def test_vllm_gets_shared_memory_per_gpu():
    args = engines.docker_args({**SERVICE, "engine": "vllm", "args": [], "gpus": [0, 1, 2, 3]}, "/w", None, True)
    assert args[args.index("--shm-size") + 1] == "4g"
    assert args[args.index("--port") + 1] == "8000"


def test_unit_escapes_percent_and_has_checks():
    unit = inference.unit_text({**SERVICE, "args": ["--chat-template", "100%{x}"]}, "/srv/w", None, False, 300)
    assert "100%%{x}" in unit
    assert "ExecStartPre=/usr/local/lib/gpufleet/gpufleet-verify-weights /srv/w/tiny" in unit
    assert "ExecStartPost=/usr/local/lib/gpufleet/gpufleet-wait-ready 300 http://127.0.0.1:8080/health " \
           "http://127.0.0.1:8080/v1/models" in unit
    assert "Restart=always" in unit and "TimeoutStartSec=330" in unit


def test_staging_plan_skips_intact_resumes_partial_and_checks_moved():
    wanted = {"a": {"size": 10, "sha256": "1" * 64}, "b": {"size": 20, "sha256": "2" * 64},
              "c": {"size": 30, "sha256": "3" * 64}, "d": {"size": 40, "sha256": "4" * 64}}
    on_host = {"files": {"a": [10, 100], "c": [30, 555]}, "parts": {"b": 7},
               "record": {"a": [10, 100, "1" * 64], "c": [30, 300, "3" * 64]}}
    intact, check, send = staging.plan(wanted, on_host)
    assert (intact, check, send) == (["a"], ["c"], {"b": 7, "d": 0})
    assert staging.plan(wanted, on_host, rehash=True)[1] == ["a", "c"]


def test_staged_files_fact_parses_find_output():
    fact = staging.StagedFiles()
    parsed = fact.process(["474656 1795430738.1234 tiny.gguf", "4096 1795430739.0 x/y.tar.gpufleet-part",
                           "--record--", '{"tiny.gguf": [474656, 1795430738, "ab"]}'])
    assert parsed == {"files": {"tiny.gguf": [474656, 1795430738]}, "parts": {"x/y.tar": 4096},
                      "record": {"tiny.gguf": [474656, 1795430738, "ab"]}}
