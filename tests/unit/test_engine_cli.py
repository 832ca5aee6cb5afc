"""Engine arguments are checked against what each engine's command line really accepts (its captured
--help or reference, operations/services/engine_cli/), and flags gpufleet sets itself are refused by name."""

import pytest

from operations.core.errors import ConfigError
from operations.services import engines
from tests.unit.test_inference import SERVICE


def test_help_text_gives_every_alternative_of_each_option():
    text = (
        "----- common params -----\n"
        "-c,    --ctx-size N                     size of the prompt context (default: 0)\n"
        "-n,    --predict, --n-predict N         number of tokens to predict\n"
        "--spec-draft-threads, -td, --threads-draft N\n"
        "                                        number of threads (default: --threads)\n"
        "-fa,   --flash-attn [on|off|auto]       set Flash Attention use\n"
    )
    assert engines.flags_from_help(text) == {
        "-c",
        "--ctx-size",
        "-n",
        "--predict",
        "--n-predict",
        "--spec-draft-threads",
        "-td",
        "--threads-draft",
        "-fa",
        "--flash-attn",
    }


def test_argparse_help_gives_options_two_spaces_in_and_not_descriptions():
    text = (
        "options:\n"
        "  --api-server-count API_SERVER_COUNT, -asc API_SERVER_COUNT\n"
        "                        How many API server processes to run.\n"
        "  --enable-prefix-caching, --no-enable-prefix-caching\n"
        "                        -- not an option: a description line\n"
        "  -tp TENSOR_PARALLEL_SIZE, --tensor-parallel-size TENSOR_PARALLEL_SIZE\n"
    )
    assert engines.flags_from_help(text) == {
        "--api-server-count",
        "-asc",
        "--enable-prefix-caching",
        "--no-enable-prefix-caching",
        "-tp",
        "--tensor-parallel-size",
    }


def test_vllm_capture_is_a_whole_vllm_serve_help():
    flags = engines.accepted_flags("vllm")
    assert len(flags) > 400 and {"--model", "--port", "--api-key", "--max-model-len", "--config"} <= flags


@pytest.mark.parametrize(
    "engine, args",
    [
        ("llamacpp", ["--ctx-size", "256", "--threads", "1", "-fa", "on", "--n-predict", "-1", "--jinja"]),
        ("tgi", ["--max-input-tokens", "1024", "--max-total-tokens", "2048", "--quantize", "awq"]),
        ("vllm", ["--max-model-len", "4096", "--gpu-memory-utilization", "0.9", "--enable-chunked-prefill"]),
        # vLLM's parser takes snake_case and dotted keys of its JSON options, and short aliases
        ("vllm", ["--max_model_len=4096", "--compilation-config.mode", "3", "-tp", "2", "--no-enable-prefix-caching"]),
    ],
)
def test_flags_the_engine_takes_are_accepted(engine, args):
    engines.check_service(0, {**SERVICE, "engine": engine, "args": args})


@pytest.mark.parametrize(
    "engine, arg, message",
    [
        ("llamacpp", "--mlock", r"llamacpp does not take --mlock"),  # gone from this llama.cpp
        ("llamacpp", "--ctx-sise", r"llamacpp does not take --ctx-sise \(did you mean --ctx-size\?\)"),
        ("llamacpp", "--port", r"--port is set by gpufleet from the service's port"),
        ("llamacpp", "--api-key", r"--api-key is set by gpufleet from the service's api_key_file"),
        ("tgi", "--ngrok", r"--ngrok is set by gpufleet, never from args"),
        ("tgi", "--max-input-lenght", r"tgi does not take --max-input-lenght \(did you mean --max-input-length\?\)"),
        ("ollama", "--verbose", r"ollama does not take --verbose \(it takes: no flags\)"),
        ("vllm", "--served-model-name", r"--served-model-name is set by gpufleet from the service's served_name"),
        ("vllm", "--served_model_name", r"--served-model-name is set by gpufleet from the service's served_name"),
        ("vllm", "--max-modle-len", r"vllm does not take --max-modle-len \(did you mean --max-model-len\?\)"),
        ("vllm", "--worker-use-ray", r"vllm does not take --worker-use-ray"),  # gone since vLLM 0.6
    ],
)
def test_flags_the_engine_does_not_take_or_gpufleet_sets_are_refused(engine, arg, message):
    with pytest.raises(ConfigError, match=rf"inference_services\[0\]\.args: {message}"):
        engines.check_service(0, {**SERVICE, "engine": engine, "args": [arg]})
