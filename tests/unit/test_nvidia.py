"""Driver and toolkit: packages per source and distro, commands yielded for given facts."""

import hashlib
from pathlib import Path

import pytest

from operations.container import containerd
from operations.core import apt_pin, checks
from operations.core.errors import ConfigError
from operations.core.json_files import JsonFile
from operations.driver import install as nvidia_driver
from operations.driver.devices import DevCharLinks, linked_by_nvidia_ctk, missing_dev_char_links
from operations.toolkit import install as nvidia_toolkit

from .test_inference import SERVICE

DATA = Path(__file__).resolve().parents[1] / "data" / "nvidia"

DEBIAN_535 = ["nvidia-kernel-dkms", "nvidia-smi", "libcuda1"]


def test_debian_nonfree_sources():
    assert nvidia_driver.debian_nonfree_lines("http://m/debian", "http://m/debian-security", "bookworm") == [
        "deb http://m/debian bookworm contrib non-free non-free-firmware",
        "deb http://m/debian bookworm-updates contrib non-free non-free-firmware",
        "deb http://m/debian-security bookworm-security contrib non-free non-free-firmware",
    ]


def test_pin_file_prefers_the_version_over_upgrades():
    assert apt_pin.pin_file(["*nvidia*", "libcuda*"], "535.261.03") == (
        "Package: *nvidia* libcuda*\nPin: version 535.261.03-*\nPin-Priority: 1001\n"
    )


def test_fresh_host_gets_install_and_hold(run_op):
    commands, _ = run_op(
        apt_pin.installed,
        {"DebPackages": {}, "AptHeldPackages": set()},
        packages=DEBIAN_535,
        version="535.261.03",
        pin_name="p",
    )
    assert commands[-2] == apt_pin.APT_INSTALL + " nvidia-kernel-dkms nvidia-smi libcuda1"
    assert commands[-1] == "apt-mark hold libcuda1 nvidia-kernel-dkms nvidia-smi"


def test_silently_upgraded_driver_is_moved_back(run_op):
    facts = {
        "DebPackages": {
            "nvidia-kernel-dkms": ["535.309.01-0+deb12u1"],
            "nvidia-smi": ["535.261.03-1"],
            "libcuda1": ["535.261.03-1"],
        },
        "AptHeldPackages": set(DEBIAN_535),
    }
    commands, _ = run_op(apt_pin.installed, facts, packages=DEBIAN_535, version="535.261.03", pin_name="p")
    assert apt_pin.APT_INSTALL + " nvidia-kernel-dkms nvidia-smi libcuda1" in commands
    # an install that changes held packages takes their holds away (tests/e2e/test_upgrade.py saw the
    # holds gone after an upgrade): held again after it, although they were held before
    assert commands[-1] == "apt-mark hold libcuda1 nvidia-kernel-dkms nvidia-smi"


def test_converged_driver_is_a_noop(run_op):
    content = apt_pin.pin_file(DEBIAN_535, "535.261.03")
    facts = {
        "DebPackages": {name: ["535.261.03-1"] for name in DEBIAN_535},
        "AptHeldPackages": set(DEBIAN_535),
        "File": {"mode": 644, "user": "root", "group": "root"},
        "Directory": {"mode": 755},
        "Sha1File": hashlib.sha1(content.encode()).hexdigest(),
    }
    commands, noops = run_op(apt_pin.installed, facts, packages=DEBIAN_535, version="535.261.03", pin_name="p")
    assert commands == []
    assert noops[-1] == "nvidia-kernel-dkms, nvidia-smi, libcuda1 at 535.261.03 and held"


@pytest.mark.parametrize("path", ["nvidia-container-runtime", "/usr/bin/nvidia-container-runtime"])
def test_runtime_already_configured_by_name_or_path(run_op, path):
    daemon = {"runtimes": {"nvidia": {"args": [], "path": path}}}
    commands, noops = run_op(nvidia_toolkit.docker_runtime, {"JsonFile": daemon})
    assert commands == [] and noops


def test_runtime_missing_runs_nvidia_ctk(run_op):
    commands, _ = run_op(nvidia_toolkit.docker_runtime, {"JsonFile": {"log-driver": "json-file"}})
    assert commands == ["nvidia-ctk runtime configure --runtime=docker"]


def test_runtime_set_as_default(run_op):
    daemon = {"runtimes": {"nvidia": {"path": "nvidia-container-runtime"}}}
    commands, _ = run_op(nvidia_toolkit.docker_runtime, {"JsonFile": daemon}, set_as_default=True)
    assert commands == ["nvidia-ctk runtime configure --runtime=docker --set-as-default"]


def test_runtime_refuses_malformed_daemon_json(run_op):
    with pytest.raises(Exception, match="daemon.json: not valid JSON"):
        run_op(nvidia_toolkit.docker_runtime, {"JsonFile": JsonFile().process(['{"a": '])})


def test_dev_char_links_fact_makes_targets_absolute():
    links = DevCharLinks().process(["195:0 /dev/nvidia0", "4:1 ../tty1", "195:255 ../nvidiactl"])
    assert links == {"195:0": "/dev/nvidia0", "4:1": "/dev/tty1", "195:255": "/dev/nvidiactl"}


def test_nodes_without_their_dev_char_link_are_missing():
    nodes = {"/dev/nvidia0": (195, 0), "/dev/nvidiactl": (195, 255), "/dev/nvidia-uvm": (238, 0)}
    links = {"195:0": "/dev/nvidia0", "195:255": "/dev/tty9", "4:1": "/dev/tty1"}
    assert missing_dev_char_links(nodes, links) == ["/dev/nvidia-uvm", "/dev/nvidiactl"]


def test_dev_char_links_run_nvidia_ctk_only_when_a_link_is_missing(run_op):
    nodes = {"/dev/nvidia0": (195, 0), "/dev/nvidiactl": (195, 255)}
    commands, _ = run_op(
        nvidia_toolkit.dev_char_links, {"NvidiaDeviceNodes": nodes, "DevCharLinks": {"195:0": "/dev/nvidia0"}}
    )
    assert commands == ["nvidia-ctk system create-dev-char-symlinks --create-all"]
    linked = {"195:0": "/dev/nvidia0", "195:255": "/dev/nvidiactl"}
    commands, noops = run_op(nvidia_toolkit.dev_char_links, {"NvidiaDeviceNodes": nodes, "DevCharLinks": linked})
    assert commands == [] and noops == ["/dev/char links all 2 NVIDIA device nodes"]
    commands, noops = run_op(nvidia_toolkit.dev_char_links, {})
    assert commands == [] and noops == ["no NVIDIA device nodes"]


def test_gpu_container_check_never_pulls_on_an_offline_host():
    image = "nvidia/cuda:12.2.2-base-ubuntu22.04"
    assert nvidia_toolkit.check_command(image) == (
        "docker run --rm --pull missing --gpus all nvidia/cuda:12.2.2-base-ubuntu22.04 "
        "nvidia-smi --query-gpu=index,name,driver_version --format=csv,noheader"
    )
    assert "--pull never --gpus all" in nvidia_toolkit.check_command(image, offline=True)


DEBIAN_CONTAINERD = (DATA / "debian12-containerd-config.toml").read_text().splitlines()
NVIDIA_V2 = [
    '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.nvidia.options]',
    '  BinaryName = "/usr/bin/nvidia-container-runtime"',
]
NVIDIA_V3_DROP_IN = [
    '[plugins."io.containerd.cri.v1.runtime".containerd]',
    '  default_runtime_name = "nvidia"',
    '[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.nvidia.options]',
    '  BinaryName = "/usr/bin/nvidia-container-runtime"',
]


def containerd_files(**files):
    lines = []
    for path, content in files.items():
        lines += [containerd.FILE_MARK + path.replace("__", "/"), *content]
    return lines


def test_containerd_runtimes_from_debian_config_and_drop_ins():
    fact = containerd.ContainerdRuntimes()
    assert fact.process(containerd_files(config=DEBIAN_CONTAINERD)) == {"runtimes": {}, "default": None}
    assert fact.process(containerd_files(config=DEBIAN_CONTAINERD + NVIDIA_V2)) == {
        "runtimes": {"nvidia": "/usr/bin/nvidia-container-runtime"},
        "default": None,
    }
    assert fact.process(containerd_files(config=DEBIAN_CONTAINERD, drop_in=NVIDIA_V3_DROP_IN)) == {
        "runtimes": {"nvidia": "/usr/bin/nvidia-container-runtime"},
        "default": "nvidia",
    }
    assert "not valid TOML" in fact.process(containerd_files(config=["[plugins"]))["__invalid__"]


def test_containerd_runtime_configured_only_when_missing(run_op):
    fact = containerd.ContainerdRuntimes()
    bare = fact.process(containerd_files(config=DEBIAN_CONTAINERD))
    commands, _ = run_op(nvidia_toolkit.containerd_runtime, {"ContainerdRuntimes": bare})
    assert commands == ["nvidia-ctk runtime configure --runtime=containerd"]
    wired = fact.process(containerd_files(config=DEBIAN_CONTAINERD + NVIDIA_V2))
    commands, noops = run_op(nvidia_toolkit.containerd_runtime, {"ContainerdRuntimes": wired})
    assert commands == [] and noops == ["containerd already has the nvidia runtime"]
    commands, _ = run_op(nvidia_toolkit.containerd_runtime, {"ContainerdRuntimes": wired}, set_as_default=True)
    assert commands == ["nvidia-ctk runtime configure --runtime=containerd --set-as-default"]
    with pytest.raises(Exception, match="config.toml: not valid TOML"):
        run_op(
            nvidia_toolkit.containerd_runtime,
            {"ContainerdRuntimes": fact.process(containerd_files(**{"__etc__containerd__config.toml": ["[x"]}))},
        )


def test_cdi_spec_generated_when_missing_or_the_driver_changes(run_op):
    generate = ["nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml"]
    assert run_op(nvidia_toolkit.cdi_spec, {})[0] == generate
    assert run_op(nvidia_toolkit.cdi_spec, {"File": {"mode": 644}})[0] == []
    assert run_op(nvidia_toolkit.cdi_spec, {"File": {"mode": 644}}, regenerate=True)[0] == generate


def test_podman_check_uses_cdi_devices():
    assert nvidia_toolkit.check_command("nvidia/cuda:12.2.2-base-ubuntu22.04", engine="podman").startswith(
        "podman run --rm --pull missing --device nvidia.com/gpu=all nvidia/cuda:12.2.2-base-ubuntu22.04 nvidia-smi"
    )


def test_inference_services_need_the_docker_engine(tmp_path):
    (tmp_path / "tiny.gguf").write_bytes(b"GGUF")
    volumes = {"tiny": {"from": str(tmp_path)}}
    with pytest.raises(ConfigError, match=r"^gpu1: nvidia_toolkit_engine: is 'podman', but the inference services"):
        checks.validate(
            {"nvidia_toolkit_engine": "podman", "inference_services": [SERVICE], "inference_weight_volumes": volumes},
            host_name="gpu1",
        )
    checks.validate({"nvidia_toolkit_engine": "containerd", "inference_services": []})


def test_offline_gpu_host_needs_the_check_image_in_its_bundle():
    manifest = {"images": [{"name": "nvidia/cuda:12.2.2-base-ubuntu22.04", "id": "sha256:" + "0" * 64}]}
    nvidia_toolkit.require_bundled("nvidia/cuda:12.2.2-base-ubuntu22.04", manifest)
    with pytest.raises(
        ConfigError,
        match=r"^gap1: nvidia_toolkit_check_image: nvidia/cuda:12.4.1-base-ubuntu22.04 "
        r"is not among the bundle's images",
    ):
        nvidia_toolkit.require_bundled("nvidia/cuda:12.4.1-base-ubuntu22.04", manifest, "gap1")


def test_an_nvswitch_host_converges_nvidia_ctk_never_links_its_switch_nodes(run_op):
    """nvidia-ctk 1.17.8 links GPUs, control nodes and MIG caps, never nvidia-nvswitch*, nvidia-nvlink or
    nvidia-fs* (cmd/nvidia-ctk/system/create-dev-char-symlinks): with those linked, nothing is missing."""
    nodes = {
        "/dev/nvidia0": (195, 0),
        "/dev/nvidiactl": (195, 255),
        "/dev/nvidia-uvm": (510, 0),
        "/dev/nvidia-nvswitch0": (511, 0),
        "/dev/nvidia-nvswitchctl": (511, 255),
        "/dev/nvidia-nvlink": (234, 0),
        "/dev/nvidia-fs0": (246, 0),
        "/dev/nvidia-caps/nvidia-cap1": (237, 1),
    }
    linked = {
        "195:0": "/dev/nvidia0",
        "195:255": "/dev/nvidiactl",
        "510:0": "/dev/nvidia-uvm",
        "237:1": "/dev/nvidia-caps/nvidia-cap1",
    }
    assert sorted(linked_by_nvidia_ctk(nodes)) == sorted(linked.values())
    commands, noops = run_op(nvidia_toolkit.dev_char_links, {"NvidiaDeviceNodes": nodes, "DevCharLinks": linked})
    assert commands == [] and noops == ["/dev/char links all 4 NVIDIA device nodes"]
    commands, _ = run_op(nvidia_toolkit.dev_char_links, {"NvidiaDeviceNodes": nodes, "DevCharLinks": {}})
    assert commands == ["nvidia-ctk system create-dev-char-symlinks --create-all"]
