"""
A rolling driver upgrade (upgrade.py) of three lab hosts serving llama.cpp, from Debian's real
535.261.03 to its real 535.309.01: lab-1, lab-2 (its module really rebuilt by DKMS) and the
air-gapped lab-gap-1 (from a bundle rebuilt at the new version), one at a time, while a bounded
probe loop on the control node sends completions to the three endpoints. lab-1 is made to fail
verification first: the rollout halts naming it, the others untouched; fixed, a run again goes on.

Runs after every other e2e module (the lab's hosts keep the new driver).
"""

import json
import re
import subprocess

import pytest

from operations.core import settings
from tests.lab import bundle as lab_bundle
from tests.lab import hosts as lab_hosts
from tests.lab import probe

from .conftest import REPO, run_deploy

HOSTS = ("lab-1", "lab-2", "lab-gap-1")
OLD = settings.DEFAULTS["nvidia_driver_version"]
NEW = "535.309.01"
KEY = REPO / ".lab" / "secrets" / "chat-api-key"
FAULT = "/etc/systemd/system/gpufleet-chat.service.d/gpufleet-test-fault.conf"


def sh(name, command):
    return lab_hosts.ssh({"name": name}, command, check=False)


def driver(name):
    return sh(name, "dpkg-query -W -f '${Version}' nvidia-kernel-dkms").stdout.strip()


def container_id(name):
    return sh(name, "docker inspect -f '{{.Id}}' gpufleet-chat").stdout.strip()


def _probed(targets, run):
    """``run()``'s result while the probe loop sends completions to ``targets``, and the probe's rounds."""
    prober = probe.Prober(targets, KEY.read_text().strip(), limit_s=900)
    prober.start()
    try:
        return run(), prober.stop()
    finally:
        prober.stop()


@pytest.fixture(scope="module")
def served(second_deploy, lab):
    """The three hosts' services listening on their lab address, admitted from the lab's networks
    (the control node's among them); returns a function running upgrade.py on the three."""
    networks = sorted({".".join(lab[name]["address"].split(".")[:2]) + ".0.0/16" for name in HOSTS})
    common = [
        "--data",
        "inference_listen=0.0.0.0",
        "--data",
        f"inference_allowed_sources={json.dumps(networks)}",
        *(arg for name in HOSTS for arg in ("--limit", name)),
    ]

    def upgrade(*args, version=OLD, bundle=None, deploy="upgrade.py"):
        extra = ["--data", f'nvidia_driver_version="{version}"']
        if bundle:
            extra += ["--data", f"gpufleet_bundle={bundle}"]
        return run_deploy(*common, *extra, *args, deploy=deploy)

    listening = upgrade()
    assert listening.rc == 0, listening.output[-3000:]
    assert "Rollout: every host's driver and toolkit are the pinned ones: nothing to roll" in listening.output
    return upgrade


@pytest.fixture(scope="module")
def targets(lab):
    return {name: f"http://{lab[name]['address']}:8080" for name in HOSTS}


@pytest.fixture(scope="module")
def new_bundle():
    return lab_bundle.build(
        log=lambda *_: None, driver_version=NEW, out=lab_bundle.LAB / f"bundle-{NEW}", with_vllm=False
    )


def test_every_endpoint_answers_the_control_node_before_the_rollout(served, targets):
    key = KEY.read_text().strip()
    assert all(probe.completion(url, key) for url in targets.values())
    assert {name: driver(name).split("-")[0] for name in HOSTS} == dict.fromkeys(HOSTS, OLD)


def test_dry_run_names_the_batches_and_changes_nothing(served, new_bundle):
    before = {name: container_id(name) for name in HOSTS}
    dry = served("--dry", version=NEW, bundle=new_bundle)
    assert dry.rc == 0, dry.output[-3000:]
    assert (
        f"Rollout: batch 1: lab-1 (driver {OLD} -> {NEW}); batch 2: lab-2 (driver {OLD} -> {NEW}); "
        f"batch 3: lab-gap-1 (driver {OLD} -> {NEW})"
    ) in dry.output
    assert {name: driver(name).split("-")[0] for name in HOSTS} == dict.fromkeys(HOSTS, OLD)
    assert {name: container_id(name) for name in HOSTS} == before


def test_a_branch_pin_keeps_its_point_release_and_only_a_rollout_moves_it(served):
    """nvidia_driver_version = "535" on hosts that have 535.261.03: deploy.py changes nothing (the
    branch keeps the point release a host has, even where the archive offers a newer one); upgrade.py
    would roll the connected hosts, whose archive offers 535.309.01, and not the air-gapped one, whose
    bundle has nothing newer."""
    branch = OLD.split(".")[0]
    before = {name: container_id(name) for name in HOSTS}
    kept = served(version=branch, deploy="deploy.py")
    assert kept.rc == 0, kept.output[-3000:]
    # host.json records the pin as written ("535"); nothing else moves
    assert set(kept.changed()) == {"Record what gpufleet deployed | Write /etc/gpufleet/host.json"}, kept.changed()
    dry = served("--dry", version=branch)
    assert dry.rc == 0, dry.output[-3000:]
    plan = next(line for line in dry.output.splitlines() if "Rollout: " in line)
    assert f"Rollout: batch 1: lab-1 (driver {OLD} -> {NEW}); batch 2: lab-2 (driver {OLD} -> {NEW})" in plan, plan
    assert "lab-gap-1" not in plan
    assert {name: driver(name).split("-")[0] for name in HOSTS} == dict.fromkeys(HOSTS, OLD)
    assert {name: container_id(name) for name in HOSTS} == before


def test_a_host_failing_verification_halts_the_rollout_naming_it(served, targets, new_bundle, lab):
    """lab-1's service is made to fail its next start (a drop-in); lab-1 is drained and upgraded,
    fails, and the rollout stops there: lab-2 and lab-gap-1 keep serving, on the old driver. lab-ubu-1,
    outside the rollout, is unreachable all along (its SSH stopped): pyinfra counts it as failed, and
    the rollout's budget does not (gpufleet_upgrade_max_failed = 0, yet lab-1's batch runs)."""
    untouched = {name: container_id(name) for name in HOSTS[1:]}
    sh(
        "lab-1",
        f"mkdir -p {FAULT.rsplit('/', 1)[0]} && printf '[Service]\\nExecStartPre=/bin/false\\n' > {FAULT} "
        "&& systemctl daemon-reload",
    )
    outside = lab["lab-ubu-1"]["container"]
    subprocess.run(["docker", "exec", outside, "systemctl", "stop", "ssh.service"], check=True, timeout=60)
    try:
        halted, rounds = _probed(targets, lambda: served("--limit", "lab-ubu-1", version=NEW, bundle=new_bundle))
    finally:
        subprocess.run(["docker", "exec", outside, "systemctl", "start", "ssh.service"], check=True, timeout=60)
    assert halted.rc != 0
    assert re.search(r"\[lab-ubu-1\]\s+(Could not connect|SSH error)", halted.output), halted.output[-3000:]
    for name in HOSTS[1:]:
        assert re.search(
            rf"{name}: rollout halted before batch 2 of 3 \(lab-2\): 1 host\(s\) failed \(lab-1\), "
            r"more than gpufleet_upgrade_max_failed = 0\. " + name + r" was left as it was \(serving, "
            r"not upgraded\); left drained \(services stopped\) until a run converges them: lab-1",
            halted.output,
        ), halted.output[-4000:]
        assert driver(name).startswith(f"{OLD}-")
    assert {name: container_id(name) for name in HOSTS[1:]} == untouched
    assert driver("lab-1").startswith(f"{NEW}-")  # upgraded, then failed to serve
    assert sh("lab-1", "systemctl is-active gpufleet-chat").stdout.strip() != "active"
    assert rounds and probe.fewest_answering(rounds) >= 2, rounds
    assert not any(answers["lab-1"] for _, answers in rounds[-3:])


def test_run_again_resumes_one_host_at_a_time_while_two_always_answer(served, targets, new_bundle):
    sh("lab-1", f"rm -f {FAULT} && systemctl daemon-reload")
    resumed, rounds = _probed(targets, lambda: served(version=NEW, bundle=new_bundle))
    assert resumed.rc == 0, resumed.output[-4000:]
    # lab-1 is upgraded already (no longer pending): it is brought back first, with every host not rolled
    assert (
        f"Rollout: batch 1: lab-2 (driver {OLD} -> {NEW}); batch 2: lab-gap-1 (driver {OLD} -> {NEW})" in resumed.output
    )
    assert probe.fewest_answering(rounds) >= 2, rounds
    windows = probe.out_of_service(rounds)
    assert windows["lab-2"] and windows["lab-gap-1"]  # each was drained once, in turn
    assert not any(
        a_start < b_end and b_start < a_end
        for a_start, a_end in windows["lab-2"]
        for b_start, b_end in windows["lab-gap-1"]
    )
    assert all(rounds[-1][1].values())  # all three answer at the end
    for name in HOSTS:
        assert driver(name).startswith(f"{NEW}-")
        assert "nvidia-kernel-dkms" in sh(name, "apt-mark showhold").stdout.split()
        recorded = json.loads(sh(name, "cat /etc/gpufleet/host.json").stdout)
        assert recorded["nvidia_driver_version"] == NEW
    kernel = sh("lab-2", "uname -r").stdout.strip()
    module = sh("lab-2", f"modinfo -k {kernel} -F version nvidia-current").stdout.strip()
    assert module == NEW  # DKMS really rebuilt the module at the new version for the running kernel

    again = served(version=NEW, bundle=new_bundle)
    assert again.rc == 0 and again.total_changed() == 0, again.changed()
    assert "nothing to roll" in again.output
