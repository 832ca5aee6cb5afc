"""What keeps a settings change from taking services down: which daemon.json changes dockerd reloads
(moby v20.10.24's reload list), and the inference unit's main process, gpufleet-container-follow,
against a stand-in `docker` whose answers each case scripts: it ends with its container, and rides out
a dockerd restart."""

import subprocess
from pathlib import Path

import pytest

from operations import TEMPLATES
from operations.container import docker

CURRENT = {
    "log-driver": "json-file",
    "log-opts": {"max-size": "50m", "max-file": "3"},
    "live-restore": True,
    "runtimes": {"nvidia": {"args": [], "path": "nvidia-container-runtime"}},
}
WANTED = docker.daemon_settings("50m", 3, {})


@pytest.mark.parametrize(
    "current, settings, restart",
    [
        (CURRENT, WANTED, False),  # nothing changes
        ({k: v for k, v in CURRENT.items() if k != "live-restore"}, WANTED, False),  # live-restore: reloaded
        (CURRENT, docker.daemon_settings("50m", 3, {}, ["https://m:5000"]), False),  # a registry mirror
        (CURRENT, docker.daemon_settings("20m", 3, {}), True),  # log options: read at start only
        (CURRENT, docker.daemon_settings("50m", 3, {"data-root": "/srv/docker"}), True),
        (None, WANTED, True),  # a new daemon.json: dockerd started without it
    ],
)
def test_only_keys_dockerd_reads_at_start_call_for_a_restart(current, settings, restart):
    assert docker.needs_restart(current, settings) is restart


def test_gpufleet_turns_live_restore_on_and_a_setting_can_turn_it_off():
    assert WANTED["live-restore"] is True
    assert docker.daemon_settings("50m", 3, {"live-restore": False})["live-restore"] is False


FAKE_DOCKER = """#!/bin/sh
# Stand-in for docker: the Nth call of a subcommand answers the Nth line of $FAKE/<subcommand>
# ("<exit status> <output>", output "-" for none); past the last line, the last line again.
n=$(cat "$FAKE/$1.calls" 2>/dev/null || echo 0); n=$((n + 1)); echo "$n" > "$FAKE/$1.calls"
line=$(sed -n "${n}p" "$FAKE/$1"); [ -n "$line" ] || line=$(tail -n 1 "$FAKE/$1")
out=${line#* }; [ "$out" = - ] || echo "$out"
exit "${line%% *}"
"""


def follow(tmp_path, logs, inspect, version, wait=3):
    """Run gpufleet-container-follow against the stand-in; returns the finished process."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(FAKE_DOCKER)
    (bin_dir / "docker").chmod(0o755)
    for name, lines in (("logs", logs), ("inspect", inspect), ("version", version)):
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    return subprocess.run(
        ["sh", str(Path(TEMPLATES) / "gpufleet-container-follow"), "gpufleet-chat", str(wait)],
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", "FAKE": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_it_copies_the_output_and_ends_with_the_containers_exit_status(tmp_path):
    done = follow(tmp_path, ["0 model loaded"], ["0 exited 3"], ["0 20.10.24"])
    assert done.returncode == 3
    assert done.stdout == "model loaded\n"
    assert "gpufleet: container gpufleet-chat ended: exited 3" in done.stderr


def test_a_dockerd_restart_is_waited_out_and_the_container_followed_on(tmp_path):
    done = follow(
        tmp_path,
        ["1 error from daemon: unexpected EOF", "0 still serving"],
        ["1 -", "1 -", "0 running 0", "0 exited 0"],
        ["1 -", "1 -", "0 20.10.24"],
    )
    assert done.returncode == 0  # the container ended later, on its own: systemd restarts the unit
    assert "still serving" in done.stdout
    assert "gpufleet: dockerd went away; container gpufleet-chat keeps running (live-restore), waiting" in done.stderr
    assert "gpufleet: dockerd is back after 2s; container gpufleet-chat still running 0" in done.stderr
    assert (tmp_path / "logs.calls").read_text().strip() == "2"  # it followed on after dockerd came back


def test_a_container_gone_while_dockerd_answers_ends_it(tmp_path):
    done = follow(tmp_path, ["0 -"], ["1 -"], ["0 20.10.24"])
    assert done.returncode == 1
    assert "gpufleet: container gpufleet-chat is gone" in done.stderr


def test_a_dockerd_that_never_comes_back_ends_it_after_the_wait(tmp_path):
    done = follow(tmp_path, ["1 -"], ["1 -"], ["1 -"], wait=2)
    assert done.returncode == 1
    assert "gpufleet: dockerd did not answer for 2s; container gpufleet-chat left to it" in done.stderr
