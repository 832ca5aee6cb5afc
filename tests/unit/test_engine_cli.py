"""Engine arguments are checked against what each engine's command line really accepts (its captured
--help or reference, operations/engine_cli/), and flags gpufleet sets itself are refused by name."""

import subprocess

import pytest

from operations import engines
from operations.errors import ConfigError
from tests.lab import llamacpp
from tests.unit.test_inference import SERVICE


def test_help_text_gives_every_alternative_of_each_option():
    text = ("----- common params -----\n"
            "-c,    --ctx-size N                     size of the prompt context (default: 0)\n"
            "-n,    --predict, --n-predict N         number of tokens to predict\n"
            "--spec-draft-threads, -td, --threads-draft N\n"
            "                                        number of threads (default: --threads)\n"
            "-fa,   --flash-attn [on|off|auto]       set Flash Attention use\n")
    assert engines.flags_from_help(text) == {"-c", "--ctx-size", "-n", "--predict", "--n-predict",
                                             "--spec-draft-threads", "-td", "--threads-draft", "-fa", "--flash-attn"}


def test_captured_llama_server_help_is_the_lab_binarys():
    binary = llamacpp.CACHE_DIR / "llamacpp" / llamacpp.key() / "llama-server"
    if not binary.exists():
        pytest.skip(f"{binary}: not built on this machine (python -m tests.lab up builds it)")
    live = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=60)
    assert engines.flags_from_help(live.stdout + live.stderr) == engines.accepted_flags("llamacpp")


@pytest.mark.parametrize("engine, args", [
    ("llamacpp", ["--ctx-size", "256", "--threads", "1", "-fa", "on", "--n-predict", "-1", "--jinja"]),
    ("tgi", ["--max-input-tokens", "1024", "--max-total-tokens", "2048", "--quantize", "awq"]),
    ("vllm", ["--max-model-len", "4096", "--gpu-memory-utilization", "0.9", "--enable-chunked-prefill"]),
])
def test_flags_the_engine_takes_are_accepted(engine, args):
    engines.check_service(0, {**SERVICE, "engine": engine, "args": args})


@pytest.mark.parametrize("engine, arg, message", [
    ("llamacpp", "--mlock", r"llamacpp does not take --mlock"),  # gone from this llama.cpp
    ("llamacpp", "--ctx-sise", r"llamacpp does not take --ctx-sise \(did you mean --ctx-size\?\)"),
    ("llamacpp", "--port", r"--port is set by gpufleet from the service's port"),
    ("llamacpp", "--api-key", r"--api-key is set by gpufleet from the service's api_key_file"),
    ("tgi", "--ngrok", r"--ngrok is set by gpufleet, never from args"),
    ("tgi", "--max-input-lenght", r"tgi does not take --max-input-lenght \(did you mean --max-input-length\?\)"),
    ("ollama", "--verbose", r"ollama does not take --verbose \(it takes: no flags\)"),
    ("vllm", "--served-model-name", r"--served-model-name is set by gpufleet from the service's served_name"),
])
def test_flags_the_engine_does_not_take_or_gpufleet_sets_are_refused(engine, arg, message):
    with pytest.raises(ConfigError, match=rf"inference_services\[0\]\.args: {message}"):
        engines.check_service(0, {**SERVICE, "engine": engine, "args": [arg]})
