"""
A rolling driver upgrade (upgrade.py) of three lab hosts serving llama.cpp, from Debian's real
535.261.03 to its real 535.309.01: lab-1, lab-2 (its module really rebuilt by DKMS) and the
air-gapped lab-gap-1 (from a bundle rebuilt at the new version), one at a time, while a bounded
probe loop on the control node sends completions to the three endpoints and to the site's gateway
(lab-2, GPUFLEET_LAB_GATEWAY), whose pool is lab-1 and lab-2 behind their TLS fronts: through the
gateway, not one completion fails. lab-1 is made to fail verification first: the rollout halts
naming it, the others untouched; fixed, a run again goes on and puts lab-1 back into the pool.

Runs after every other e2e module (the lab's hosts keep the new driver, the gateway and the fronts).
"""

import json
import re
import subprocess

import pytest

from operations import TOOLS_DIR as TOOLS
from operations.core import settings
from tests.lab import bundle as lab_bundle
from tests.lab import hosts as lab_hosts
from tests.lab import probe

from .conftest import REPO, measurements, run_deploy, until

HOSTS = ("lab-1", "lab-2", "lab-gap-1")
OLD = settings.DEFAULTS["nvidia_driver_version"]
NEW = "535.309.01"
KEY = REPO / ".lab" / "secrets" / "chat-api-key"
FAULT = "/etc/systemd/system/gpufleet-chat.service.d/gpufleet-test-fault.conf"
CA = REPO / ".lab" / "site-tls" / "ca.crt"
# lab-1 and lab-2 serve behind TLS fronts (8443) pooled by the gateway on lab-2 (inventories/lab.py)
GATEWAY = {"GPUFLEET_LAB_GATEWAY": "lab-2"}
FRONTED = ("lab-1", "lab-2")


def sh(name, command):
    return lab_hosts.ssh({"name": name}, command, check=False)


def driver(name):
    return sh(name, "dpkg-query -W -f '${Version}' nvidia-kernel-dkms").stdout.strip()


def container_id(name):
    return sh(name, "docker inspect -f '{{.Id}}' gpufleet-chat").stdout.strip()


def _probed(targets, run):
    """``run()``'s result while the probe loop sends completions to ``targets``, and the probe's rounds."""
    prober = probe.Prober(targets, KEY.read_text().strip(), limit_s=900, ca=str(CA))
    prober.start()
    try:
        return run(), prober.stop()
    finally:
        prober.stop()


def _gateway_said(output, name, what):
    return f"[{name}] gateway lab-2: chat/{name}: {what}" in output


@pytest.fixture(scope="module")
def measured():
    yield from measurements("upgrade")


@pytest.fixture(scope="module")
def served(second_deploy, lab):
    """The three hosts' services listening on their lab address (lab-1's and lab-2's through their
    TLS fronts), the fronts, the engine and the gateway admitted from the lab's networks (the control
    node's among them); returns a function running upgrade.py on the three."""
    networks = sorted({".".join(lab[name]["address"].split(".")[:2]) + ".0.0/16" for name in HOSTS})
    common = [
        "--data",
        "inference_listen=0.0.0.0",
        "--data",
        f"inference_allowed_sources={json.dumps(networks)}",
        "--data",
        f"gateway_allowed_sources={json.dumps(networks)}",
        *(arg for name in HOSTS for arg in ("--limit", name)),
    ]

    def upgrade(*args, version=OLD, bundle=None, deploy="upgrade.py"):
        extra = ["--data", f'nvidia_driver_version="{version}"']
        if bundle:
            extra += ["--data", f"gpufleet_bundle={bundle}"]
        return run_deploy(*common, *extra, *args, deploy=deploy, env=GATEWAY)

    listening = upgrade()
    assert listening.rc == 0, listening.output[-3000:]
    assert "Rollout: every host's driver and toolkit are the pinned ones: nothing to roll" in listening.output
    return upgrade


@pytest.fixture(scope="module")
def targets(lab):
    """name -> base URL: each host's endpoint (lab-1's and lab-2's TLS fronts) and the gateway's pool."""
    hosts = {
        name: f"https://{lab[name]['address']}:8443" if name in FRONTED else f"http://{lab[name]['address']}:8080"
        for name in HOSTS
    }
    return {**hosts, "gateway": f"https://{lab['lab-2']['address']}:9443/chat"}


@pytest.fixture(scope="module")
def new_bundle():
    return lab_bundle.build(
        log=lambda *_: None, driver_version=NEW, out=lab_bundle.LAB / f"bundle-{NEW}", with_vllm=False
    )


def test_every_endpoint_answers_the_control_node_before_the_rollout(served, targets):
    key = KEY.read_text().strip()
    assert {name: probe.completion(url, key, ca=str(CA)) for name, url in targets.items()} == dict.fromkeys(
        targets, True
    )
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


def test_a_host_failing_verification_halts_the_rollout_naming_it(served, targets, new_bundle, lab, measured):
    """lab-1's service is made to fail its next start (a drop-in); lab-1 is drained (at the gateway
    too) and upgraded, fails, and the rollout stops there: lab-2 and lab-gap-1 keep serving, on the old
    driver, and the gateway answers every request from lab-2. lab-ubu-1,
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
    assert _gateway_said(halted.output, "lab-1", "drained"), halted.output[-3000:]
    measured["halted"] = {"rounds": len(rounds), "gateway_failed": sum(not a["gateway"] for _, a in rounds)}
    assert rounds and probe.out_of_service(rounds)["gateway"] == [], rounds
    assert probe.fewest_answering(rounds) >= 3, rounds  # the gateway and two hosts, every round
    assert not any(answers["lab-1"] for _, answers in rounds[-3:])


def test_run_again_resumes_one_host_at_a_time_while_two_always_answer(served, targets, new_bundle, measured):
    """... and the gateway answers every request. Fixed, lab-1's service comes back by itself
    (systemd restarts it), yet the gateway still holds it out, set to drain by the halted run: the
    run puts it back before lab-2, the pool's other host, is drained there for its batch (otherwise
    the pool would have no server), and lab-2 is put back after its batch."""
    sh("lab-1", f"rm -f {FAULT} && systemctl daemon-reload")
    key = KEY.read_text().strip()
    assert until(lambda: probe.completion(targets["lab-1"], key, ca=str(CA)), 90, every=2) is not None
    left = sh("lab-2", f"{TOOLS}/gpufleet-gateway-ctl state chat lab-1").stdout
    assert "; set to drain" in left, left
    resumed, rounds = _probed(targets, lambda: served(version=NEW, bundle=new_bundle))
    assert resumed.rc == 0, resumed.output[-4000:]
    measured["resumed"] = {"rounds": len(rounds), "gateway_failed": sum(not a["gateway"] for _, a in rounds)}
    assert probe.out_of_service(rounds)["gateway"] == [], rounds
    put_back = resumed.output.find("[lab-1] gateway lab-2: chat/lab-1: ready (UP")
    lab_2_out = resumed.output.find("[lab-2] gateway lab-2: chat/lab-2: drained")
    assert 0 <= put_back < lab_2_out, resumed.output[-6000:]
    assert _gateway_said(resumed.output, "lab-2", "ready (UP")
    states = {name: sh("lab-2", f"{TOOLS}/gpufleet-gateway-ctl state chat {name}").stdout for name in FRONTED}
    assert all("(UP" in said for said in states.values()), states
    # lab-1 is upgraded already (no longer pending): it is brought back first, with every host not rolled
    assert (
        f"Rollout: batch 1: lab-2 (driver {OLD} -> {NEW}); batch 2: lab-gap-1 (driver {OLD} -> {NEW})" in resumed.output
    )
    assert probe.fewest_answering(rounds) >= 3, rounds  # the gateway and two hosts, every round
    windows = probe.out_of_service(rounds)
    assert windows["lab-2"] and windows["lab-gap-1"]  # each was drained once, in turn
    assert not any(
        a_start < b_end and b_start < a_end
        for a_start, a_end in windows["lab-2"]
        for b_start, b_end in windows["lab-gap-1"]
    )
    assert all(rounds[-1][1].values())  # all three and the gateway answer at the end
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
