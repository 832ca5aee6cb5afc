"""The rollout's pure parts: what a bundle offers, which failures count against its budget, and how the
probe loop judges who was out of service."""

from types import SimpleNamespace

import pytest
from pyinfra.context import ctx_host

from operations import rollout
from operations.core.errors import ConfigError
from operations.offline import from_bundle as offline
from tests.lab import probe

FILES = {
    "apt/nvidia-kernel-dkms_535.309.01-0+deb12u1_amd64.deb": {},
    "apt/nvidia-smi_535.261.03-1_amd64.deb": {},
    "images/x.tar": {},
}


def test_a_bundle_offers_a_package_at_an_exact_version_or_of_a_branch(monkeypatch):
    monkeypatch.setattr(offline.bundle, "load", lambda path: {"files": FILES})
    assert offline.offers("/b", "nvidia-kernel-dkms", "535.309.01")
    assert not offline.offers("/b", "nvidia-kernel-dkms", "535.261.03")
    assert not offline.offers("/b", "nvidia-kernel-dkms", "535.309.0")  # no prefix match across versions
    assert offline.offers("/b", "nvidia-smi", "535") and not offline.offers("/b", "nvidia-smi", "53")
    assert not offline.offers(None, "nvidia-smi", "535")


ROUNDS = [
    (0.0, {"a": True, "b": True, "c": True}),
    (1.0, {"a": False, "b": True, "c": True}),
    (2.0, {"a": False, "b": True, "c": True}),
    (3.0, {"a": True, "b": False, "c": True}),
    (4.0, {"a": True, "b": True, "c": False}),
]


def test_out_of_service_windows_run_from_the_first_miss_to_the_next_answer():
    assert probe.out_of_service(ROUNDS) == {"a": [(1.0, 3.0)], "b": [(3.0, 4.0)], "c": [(4.0, 4.0)]}
    assert probe.longest_window(ROUNDS) == (2.0, "a")
    assert probe.fewest_answering(ROUNDS) == 2


def test_a_completion_to_a_closed_port_is_a_miss_not_an_error():
    assert probe.completion("http://127.0.0.1:9", "key", timeout=2) is False


def test_prune_reads_images_and_the_ones_containers_use():
    from operations.container import prune

    found = prune.DockerImages().process(
        [
            "gpufleet-lab/llama-server:0.3.36-a9 sha256:aaa",
            "gpufleet-lab/retired:1 sha256:aaa",
            "nvidia/cuda:12.2.2-base-ubuntu22.04 sha256:ccc",
            "<none>:<none> sha256:ddd",
            "--",
            "sha256:aaa",
        ]
    )
    assert found == {
        "images": {
            "gpufleet-lab/llama-server:0.3.36-a9": "sha256:aaa",
            "gpufleet-lab/retired:1": "sha256:aaa",
            "nvidia/cuda:12.2.2-base-ubuntu22.04": "sha256:ccc",
            "sha256:ddd": "sha256:ddd",
        },
        "in_use": ["sha256:aaa"],
    }
    # a tag of the image a container runs stays (removing it would only untag); keep names are kept
    assert prune.unused_images(found, {"nvidia/cuda:12.2.2-base-ubuntu22.04"}) == ["sha256:ddd"]


def test_a_backup_copy_is_damaged_when_a_file_is_missing_short_or_other_bytes(tmp_path):
    import hashlib

    from operations.weights import backup as weights_backup

    (tmp_path / "a.gguf").write_bytes(b"weights")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.json").write_bytes(b"{}")
    wanted = {
        "a.gguf": {"size": 7, "sha256": hashlib.sha256(b"weights").hexdigest()},
        "sub/b.json": {"size": 2, "sha256": hashlib.sha256(b"{}").hexdigest()},
        "c.bin": {"size": 1, "sha256": hashlib.sha256(b"c").hexdigest()},
    }
    assert weights_backup.damaged(tmp_path, wanted) == ["c.bin"]
    (tmp_path / "a.gguf").write_bytes(b"weightz")  # same size, other bytes
    assert weights_backup.damaged(tmp_path, wanted) == ["a.gguf", "c.bin"]


def test_only_the_rollouts_own_hosts_count_against_its_failure_budget():
    failed = [SimpleNamespace(name=name) for name in ("unreachable-elsewhere", "lab-2", "proxmox-1")]
    assert rollout.rollout_failures(failed, [["lab-1"], ["lab-2"], ["lab-gap-1"]]) == ["lab-2"]
    assert rollout.rollout_failures(failed[:1], [["lab-1"], ["lab-2"]]) == []


@pytest.mark.parametrize(
    "gpus, reboot, batches, refused",
    [
        (["gpu"], False, [["gpu-1"]], True),  # the new module would not load: refused, naming the setting
        (["gpu"], True, [["gpu-1"]], False),  # allowed to reboot within its batch
        ([], False, [["gpu-1"]], False),  # no GPU, no module to load
        (["gpu"], False, [["gpu-2"]], False),  # not in the rollout
    ],
)
def test_a_driver_change_a_gpu_host_cannot_load_without_a_reboot_is_refused_before_any_drain(
    monkeypatch, gpus, reboot, batches, refused
):
    monkeypatch.setattr(rollout.nvidia_driver, "upgrade_from", lambda: ("535.261.03", "535.309.01"))
    monkeypatch.setattr(rollout.devices, "gpus", lambda: gpus)
    fake = SimpleNamespace(name="gpu-1", data=SimpleNamespace(nvidia_driver_reboot=reboot))
    with ctx_host.use(fake):
        if refused:
            with pytest.raises(ConfigError, match=r"gpu-1: nvidia_driver_reboot: is False.*535.261.03 -> 535.309.01"):
                rollout.refuse_unloadable_driver(batches)
        else:
            rollout.refuse_unloadable_driver(batches)
