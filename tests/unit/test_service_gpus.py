"""The GPU check inside each GPU service (operations/toolkit/service_gpus.py): which services it asks,
and its command run here against stand-ins of ``docker`` and ``systemctl`` that record their calls:
a container whose ``nvidia-smi -L`` fails has its unit restarted and is named; one that lists its GPUs
is left alone. (No GPU here: the real ``nvidia-smi`` inside a container is unverified.)"""

import subprocess

import pytest

from operations.toolkit import service_gpus

STAND_INS = {
    "docker": '#!/bin/sh\necho "docker $*" >> "$CALLS"\n[ "$NVIDIA_SMI_FAILS" = 1 ] && exit 9\necho "GPU 0: NVIDIA H100"\n',
    "systemctl": '#!/bin/sh\necho "systemctl $*" >> "$CALLS"\n',
}


def test_only_services_that_use_gpus_are_asked():
    services = [{"name": "chat"}, {"name": "embed", "gpus": [1]}, {"name": "cpu", "gpus": "none"}]
    assert service_gpus.gpu_services(services) == ["chat", "embed"]


@pytest.mark.parametrize("fails", [False, True])
def test_a_container_that_lost_its_gpus_is_restarted_and_named(tmp_path, fails):
    for name, script in STAND_INS.items():
        (tmp_path / name).write_text(script)
        (tmp_path / name).chmod(0o755)
    calls = tmp_path / "calls"
    done = subprocess.run(
        ["sh", "-c", service_gpus.check_command("chat")],
        env={"PATH": f"{tmp_path}:/usr/bin:/bin", "CALLS": str(calls), "NVIDIA_SMI_FAILS": "1" if fails else "0"},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    expected = ["docker exec gpufleet-chat nvidia-smi -L"] + (
        ["systemctl restart gpufleet-chat.service"] if fails else []
    )
    assert calls.read_text().splitlines() == expected
    assert ("gpufleet-chat lost its GPUs" in done.stderr) == fails
