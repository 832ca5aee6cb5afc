"""Driver and toolkit on lab hosts: real Debian driver packages, the toolkit from the double repo."""

from tests.e2e.conftest import run_deploy
from tests.lab import hosts as lab_hosts


def sh(lab, name, command, check=True):
    return lab_hosts.ssh(lab[name], command, check=check)


def test_pin_holds_the_driver_below_a_newer_candidate(second_deploy, lab):
    policy = sh(lab, "lab-1", "apt-cache policy nvidia-smi").stdout
    assert "Installed: 535.261.03-1" in policy and "Candidate: 535.261.03-1" in policy
    assert "535.309.01" in policy  # Debian offers a newer one; the pin keeps it out
    upgrade = sh(lab, "lab-1", "apt-get -s upgrade").stdout
    assert "Inst nvidia-" not in upgrade and "Inst libcuda1" not in upgrade


def test_malformed_daemon_json_is_named_and_left_untouched(second_deploy, lab):
    sh(lab, "lab-2", "cp /etc/docker/daemon.json /root/daemon.json.good && printf '{ \"log-driver\": ' > /etc/docker/daemon.json")
    try:
        before = sh(lab, "lab-2", "sha256sum /etc/docker/daemon.json").stdout
        result = run_deploy("--limit", "lab-2")
        assert result.rc != 0
        assert "lab-2: /etc/docker/daemon.json: not valid JSON" in result.output
        assert sh(lab, "lab-2", "sha256sum /etc/docker/daemon.json").stdout == before
    finally:
        sh(lab, "lab-2", "cp /root/daemon.json.good /etc/docker/daemon.json")
    assert run_deploy("--limit", "lab-2").changed() == {}


def test_removed_runtime_is_configured_again_and_docker_restarted(second_deploy, lab):
    sh(lab, "lab-2", "python3 -c \"import json; p='/etc/docker/daemon.json'; d=json.load(open(p)); "
                     "d.pop('runtimes'); json.dump(d, open(p, 'w'))\" && systemctl restart docker")
    started = sh(lab, "lab-2", "systemctl show -p ActiveEnterTimestampMonotonic docker").stdout
    result = run_deploy("--limit", "lab-2")
    changed = result.changed()
    assert "Install NVIDIA Container Toolkit | Configure Docker's nvidia runtime (nvidia-ctk runtime configure)" in changed
    assert "Apply Docker configuration | Restart Docker if its configuration changed" in changed
    assert sh(lab, "lab-2", "systemctl show -p ActiveEnterTimestampMonotonic docker").stdout != started
    assert "nvidia" in sh(lab, "lab-2", "docker info --format '{{json .Runtimes}}'").stdout


def test_nvidia_ctk_double_keeps_keys_and_is_byte_stable(second_deploy, lab):
    script = ("set -e; f=/tmp/d.json; echo '{\"data-root\": \"/srv/d\"}' > $f; "
              "nvidia-ctk runtime configure --runtime=docker --config=$f 2>/dev/null; a=$(sha256sum < $f); "
              "nvidia-ctk runtime configure --runtime=docker --config=$f 2>/dev/null; b=$(sha256sum < $f); "
              "[ \"$a\" = \"$b\" ] && cat $f")
    out = sh(lab, "lab-1", script).stdout
    assert '"data-root": "/srv/d"' in out and '"path": "nvidia-container-runtime"' in out
    bad = sh(lab, "lab-1", "echo '{x' > /tmp/bad.json; nvidia-ctk runtime configure --config=/tmp/bad.json; "
                           "echo rc=$?; cat /tmp/bad.json", check=False).stdout
    assert "rc=1" in bad and "{x" in bad
