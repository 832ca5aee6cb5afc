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
    sh(
        lab,
        "lab-2",
        "cp /etc/docker/daemon.json /root/daemon.json.good && printf '{ \"log-driver\": ' > /etc/docker/daemon.json",
    )
    try:
        before = sh(lab, "lab-2", "sha256sum /etc/docker/daemon.json").stdout
        result = run_deploy("--limit", "lab-2")
        assert result.rc != 0
        assert "lab-2: /etc/docker/daemon.json: not valid JSON" in result.output
        assert sh(lab, "lab-2", "sha256sum /etc/docker/daemon.json").stdout == before
    finally:
        sh(lab, "lab-2", "cp /root/daemon.json.good /etc/docker/daemon.json")
    again = run_deploy("--limit", "lab-2")
    assert again.rc == 0 and again.total_changed() == 0, again.changed()


def test_removed_runtime_is_configured_again_and_docker_reloaded_not_restarted(second_deploy, lab):
    """The runtime entry removed and dockerd restarted without it: the run puts it back and reloads
    dockerd (``runtimes`` is a key it reloads: moby's daemon/reload_unix.go), which then has it."""
    sh(
        lab,
        "lab-2",
        "python3 -c \"import json; p='/etc/docker/daemon.json'; d=json.load(open(p)); "
        "d.pop('runtimes'); json.dump(d, open(p, 'w'))\" && systemctl restart docker",
    )
    assert "nvidia" not in sh(lab, "lab-2", "docker info --format '{{json .Runtimes}}'").stdout
    started = sh(lab, "lab-2", "systemctl show -p ActiveEnterTimestampMonotonic docker").stdout
    result = run_deploy("--limit", "lab-2")
    changed = result.changed()
    assert (
        "GPU host | Install NVIDIA Container Toolkit | Configure Docker's nvidia runtime (nvidia-ctk runtime configure)"
    ) in changed
    assert (
        "GPU host | Apply Docker configuration | Reload Docker if its configuration changed in keys it reloads "
        "(runtimes, mirrors, live-restore)"
    ) in changed
    assert sh(lab, "lab-2", "systemctl show -p ActiveEnterTimestampMonotonic docker").stdout == started
    assert "nvidia" in sh(lab, "lab-2", "docker info --format '{{json .Runtimes}}'").stdout


def test_nvidia_ctk_double_keeps_keys_and_is_byte_stable(second_deploy, lab):
    script = (
        'set -e; f=/tmp/d.json; echo \'{"data-root": "/srv/d"}\' > $f; '
        "nvidia-ctk runtime configure --runtime=docker --config=$f 2>/dev/null; a=$(sha256sum < $f); "
        "nvidia-ctk runtime configure --runtime=docker --config=$f 2>/dev/null; b=$(sha256sum < $f); "
        '[ "$a" = "$b" ] && cat $f'
    )
    out = sh(lab, "lab-1", script).stdout
    assert '"data-root": "/srv/d"' in out and '"path": "nvidia-container-runtime"' in out
    bad = sh(
        lab,
        "lab-1",
        "echo '{x' > /tmp/bad.json; nvidia-ctk runtime configure --config=/tmp/bad.json; echo rc=$?; cat /tmp/bad.json",
        check=False,
    ).stdout
    assert "rc=1" in bad and "{x" in bad


def test_udev_rule_links_dev_char_for_gpu_nodes(second_deploy, lab):
    rule = sh(lab, "lab-1", "cat /lib/udev/rules.d/71-nvidia-dev-char.rules").stdout
    assert (
        'ACTION=="add", DEVPATH=="/bus/pci/drivers/nvidia", '
        'RUN+="/usr/bin/nvidia-ctk system create-dev-char-symlinks --create-all"'
    ) in rule
    # No GPU in the lab: stand-in nodes with the driver's numbers get their links, once; an NVSwitch's
    # node, which nvidia-ctk never links, does not keep the run from converging.
    sh(
        lab,
        "lab-2",
        "mknod /dev/nvidia0 c 195 0 && mknod /dev/nvidiactl c 195 255 && mknod /dev/nvidia-nvswitch0 c 239 0",
    )
    try:
        result = run_deploy("--limit", "lab-2")
        assert result.rc == 0, result.output[-3000:]
        assert list(result.changed()) == [
            "GPU host | Install NVIDIA Container Toolkit | Link the NVIDIA device nodes into /dev/char now"
        ], result.changed()
        links = sh(lab, "lab-2", "readlink /dev/char/195:0 /dev/char/195:255").stdout.split()
        assert links == ["/dev/nvidia0", "/dev/nvidiactl"]
        assert sh(lab, "lab-2", "test -e /dev/char/239:0", check=False).returncode != 0
        again = run_deploy("--limit", "lab-2")
        assert again.rc == 0 and again.total_changed() == 0, again.changed()
    finally:
        sh(lab, "lab-2", "rm -f /dev/nvidia0 /dev/nvidiactl /dev/nvidia-nvswitch0 /dev/char/195:0 /dev/char/195:255")


def test_lxc_guest_leaves_dev_char_to_its_host(second_deploy, lab):
    assert sh(lab, "lab-ct-1", "test -e /lib/udev/rules.d/71-nvidia-dev-char.rules", check=False).returncode == 1


def test_containerd_engine_gets_the_runtime_and_one_restart(second_deploy, lab):
    containerd = ("--limit", "lab-2", "--data", "nvidia_toolkit_engine=containerd", "--data", "inference_services=[]")
    started = sh(lab, "lab-2", "systemctl show -p ActiveEnterTimestampMonotonic containerd").stdout
    try:
        first = run_deploy(*containerd)
        assert first.rc == 0, first.output[-3000:]
        changed = first.changed()
        assert (
            "GPU host | Install NVIDIA Container Toolkit | Configure containerd's nvidia runtime (nvidia-ctk runtime "
            "configure)" in changed
        ), changed
        assert "GPU host | Apply containerd configuration | Restart containerd if its configuration changed" in changed
        assert sh(lab, "lab-2", "systemctl show -p ActiveEnterTimestampMonotonic containerd").stdout != started
        # containerd itself read the new config: its merged view has the runtime.
        dump = sh(lab, "lab-2", "containerd config dump").stdout
        assert "runtimes.nvidia.options]" in dump and 'BinaryName = "/usr/bin/nvidia-container-runtime"' in dump
        again = run_deploy(*containerd)
        assert again.rc == 0 and again.total_changed() == 0, again.changed()
    finally:
        back = run_deploy("--limit", "lab-2")
    assert back.rc == 0, back.output[-3000:]
    assert list(back.changed()) == ["Record what gpufleet deployed | Write /etc/gpufleet/host.json"], back.changed()
