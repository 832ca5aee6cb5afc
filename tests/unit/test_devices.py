"""Facts parse real output: the H100 samples were read on a lent GPU machine (tests/data/nvidia);
mokutil's outputs are its source's (tests/data/mokutil)."""

from pathlib import Path

import pytest

from operations.driver import devices

DATA = Path(__file__).resolve().parents[1] / "data" / "nvidia"


def lines(name):
    return (DATA / name).read_text().splitlines()


def test_pci_devices_from_real_h100():
    assert devices.NvidiaPciDevices().process(lines("h100-sys-pci-nvidia.txt")) == [
        {"slot": "0000:00:06.0", "class": "0x030200", "device": "0x2330", "kind": "gpu"}
    ]


def test_pci_devices_keep_nvswitches_apart_and_drop_audio_functions():
    found = devices.NvidiaPciDevices().process(
        ["0000:01:00.0 0x030000 0x2684", "0000:01:00.1 0x040300 0x22ba", "0000:0a:00.0 0x068000 0x22a3"]
    )
    assert [d["kind"] for d in found] == ["gpu", "nvswitch"]


def test_nvidia_smi_query_from_real_h100():
    fact = devices.NvidiaSmi().process(lines("h100-nvidia-smi-query.txt") + ["rc=0"])
    assert fact == {
        "ok": True,
        "gpus": [
            {
                "driver_version": "580.159.04",
                "name": "NVIDIA H100 80GB HBM3",
                "bus_id": "00000000:00:06.0",
                "memory_mib": 81559,
            }
        ],
    }


def test_nvidia_smi_without_a_gpu_says_why():
    fact = devices.NvidiaSmi().process(lines("lab-nvidia-smi-no-gpu.txt"))
    assert fact["ok"] is False and fact["rc"] == 9
    assert "couldn't communicate with the NVIDIA driver" in fact["message"]


def test_kernel_module_open_flavour_from_real_h100():
    assert devices.NvidiaKernelModule().process(lines("h100-proc-driver-nvidia-version.txt")) == {
        "version": "580.159.04",
        "open": True,
    }


def test_kernel_module_proprietary_flavour():
    text = [
        "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.129.03  Thu Oct 19 18:56:32 UTC 2023",
        "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)",
    ]
    assert devices.NvidiaKernelModule().process(text) == {"version": "535.129.03", "open": False}


def test_kernel_module_absent():
    assert devices.NvidiaKernelModule().process([]) is None


@pytest.mark.parametrize(
    "capture, state", [("enabled", True), ("shim-validation-off", False), ("disabled", False), ("setup-mode", False)]
)
def test_secure_boot_from_mokutil(capture, state):
    lines = (DATA.parent / "mokutil" / f"sb-state-{capture}.txt").read_text().splitlines()
    assert devices.SecureBoot().process(lines) is state


def test_secure_boot_states():
    fact = devices.SecureBoot()
    assert fact.process(["EFI variables are not supported on this system"]) is None
    assert fact.process(["efivar 1"]) is True
    assert fact.process(["no efi"]) is None


def test_dkms_status_both_layouts():
    fact = devices.DkmsStatus().process(
        [
            "nvidia-current/535.261.03, 6.1.0-28-amd64, amd64: installed",
            "nvidia, 535.54.03, 5.15.0-76-generic, x86_64: installed (WARNING! Diff between built and installed module!)",
            "nvidia-current/535.261.03: added",
        ]
    )
    assert [(m["module"], m["version"], m["kernel"], m["state"]) for m in fact] == [
        ("nvidia-current", "535.261.03", "6.1.0-28-amd64", "installed"),
        ("nvidia", "535.54.03", "5.15.0-76-generic", "installed"),
        ("nvidia-current", "535.261.03", None, "added"),
    ]


def test_kernel_headers():
    assert devices.KernelHeaders().process(["6.1.0-28-amd64", "no"]) == {"kernel": "6.1.0-28-amd64", "headers": False}
