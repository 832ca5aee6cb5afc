"""gpufleet's host metrics script (templates/gpufleet-host-metrics), run here: the weights' filesystem
from the real ``df``; with stand-ins of ``nvidia-smi`` and ``docker`` that answer as a healthy GPU
host, one whose driver packages changed under the loaded module (NVML's own message), and one whose
service container lost its GPUs. Every output passes ``promtool check metrics`` (the text format the
node exporter's textfile collector reads); a host without the driver says nothing of GPUs."""

import subprocess

import pytest

from operations import TEMPLATES
from tests.unit.test_monitoring import PROMTOOL

MISMATCH = "Failed to initialize NVML: Driver/library version mismatch\nNVML library version: 535.309\n"
HEALTHY = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-5b6b1f2a-0000-0000-0000-000000000000)\n"


def _run(tmp_path, nvidia_smi=None, inside_sees_gpus=True, running=("chat",)):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if nvidia_smi is not None:
        text, status = nvidia_smi
        (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\nprintf '%s' '{text}'\nexit {status}\n")
    docker = (
        "#!/bin/sh\n"
        f'if [ "$1" = inspect ]; then case " {" ".join(running)} " in *" ${{4#gpufleet-}} "*) echo true;; *) echo false;; esac; exit 0; fi\n'
        f"exit {0 if inside_sees_gpus else 9}\n"
    )
    (bin_dir / "docker").write_text(docker)
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    (tmp_path / "nvidiactl").write_text("")
    out = tmp_path / "gpufleet.prom"
    done = subprocess.run(
        ["sh", str(TEMPLATES / "gpufleet-host-metrics"), str(tmp_path), str(out), "chat", "embed"],
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", "GPUFLEET_NVIDIACTL": str(tmp_path / "nvidiactl")},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    checked = subprocess.run([PROMTOOL, "check", "metrics"], input=out.read_text(), capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    samples = {}
    for line in out.read_text().splitlines():
        if not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = value
    return samples


def _weights(samples):
    return {name.split("{")[0] for name in samples if name.startswith("gpufleet_weights_")}


@pytest.mark.parametrize(
    "case, nvidia_smi, inside, expected",
    [
        ("no driver", None, True, {}),
        (
            "a healthy GPU host",
            (HEALTHY, 0),
            True,
            {
                "gpufleet_nvidia_smi_ok": "1",
                "gpufleet_nvidia_driver_library_mismatch": "0",
                'gpufleet_service_gpus_visible{service="chat"}': "1",
            },
        ),
        (
            "packages changed under the loaded module",
            (MISMATCH, 18),
            True,
            {
                "gpufleet_nvidia_smi_ok": "0",
                "gpufleet_nvidia_driver_library_mismatch": "1",
                'gpufleet_service_gpus_visible{service="chat"}': "1",
            },
        ),
        (
            "a container that lost its GPUs",
            (HEALTHY, 0),
            False,
            {
                "gpufleet_nvidia_smi_ok": "1",
                "gpufleet_nvidia_driver_library_mismatch": "0",
                'gpufleet_service_gpus_visible{service="chat"}': "0",
            },
        ),
    ],
)
def test_the_host_metrics_say_what_the_node_exporter_cannot(tmp_path, case, nvidia_smi, inside, expected):
    samples = _run(tmp_path, nvidia_smi, inside)
    gpu = {name: value for name, value in samples.items() if not name.startswith("gpufleet_weights_")}
    assert gpu == expected  # "embed" is not running: nothing said of it
    assert _weights(samples) == {"gpufleet_weights_filesystem_avail_bytes", "gpufleet_weights_filesystem_size_bytes"}
    size = next(int(v) for name, v in samples.items() if name.startswith("gpufleet_weights_filesystem_size_bytes"))
    assert size > 0 and f'path="{tmp_path}"' in next(iter(samples))


def test_a_host_without_a_weights_root_writes_an_empty_valid_file(tmp_path):
    out = tmp_path / "gpufleet.prom"
    done = subprocess.run(
        ["sh", str(TEMPLATES / "gpufleet-host-metrics"), str(tmp_path / "none"), str(out)],
        env={"PATH": "/usr/bin:/bin", "GPUFLEET_NVIDIACTL": str(tmp_path / "absent")},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and out.read_text() == ""
