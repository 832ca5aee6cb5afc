"""The built-in lab (inventories/lab.py). NVIDIA's toolkit repository cannot be reached here, so
the toolkit comes from the lab's offline bundle, which carries test doubles of its packages
(tests/fixtures/nvidia_toolkit_double) beside Debian's real Docker and driver packages, the
llama.cpp server image built here and a tiny GGUF. ``python -m tests.lab up`` builds it."""

from pathlib import Path

from tests.lab.llamacpp import image_tag

_LAB = Path(__file__).resolve().parent.parent / ".lab"

gpufleet_bundle = str(_LAB / "bundle")
nvidia_toolkit_source = "bundle"

inference_services = [
    {
        "name": "chat",
        "engine": "llamacpp",
        "image": image_tag(),  # pinned: llama-cpp-python release + recipe hash
        "model": "tiny/tiny.gguf",
        "port": 8080,
        "memory": "1g",
        "args": ["--ctx-size", "256", "--threads", "1"],
        "api_key_file": str(_LAB / "secrets" / "chat-api-key"),
    },
]
# No lab host has a GPU: no GPU metrics for the site's monitoring to wait for.
monitoring_gpu_metrics = False
