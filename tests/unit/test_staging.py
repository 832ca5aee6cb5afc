"""The staging stream: the sender's frames fed to the host-side receiver script, run here with
/bin/sh and coreutils as on a Debian host (fresh, resumed, damaged and cut-short copies)."""

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from operations.core import remote
from operations.offline import bundle, staging
from operations.offline.staging import wire
from operations.offline.staging.relay import RELAY_SENDER, authorized_line, relay_key


def receive(dest, stream, mode="444"):
    return subprocess.run(["sh", "-c", wire.receive_command(str(dest), mode)], input=stream, capture_output=True)


def stream_of(frames):
    """The sender's frames as the bytes the receiver reads (each ``FileSpan`` read out)."""
    return b"".join(remote.frame_bytes(frames))


def manifest_of(src, names):
    return {
        name: {"size": (src / name).stat().st_size, "sha256": hashlib.sha256((src / name).read_bytes()).hexdigest()}
        for name in names
    }


@pytest.fixture
def src(tmp_path):
    (tmp_path / "src" / "tok").mkdir(parents=True)
    (tmp_path / "src" / "model.bin").write_bytes(os.urandom(3 << 20 | 12345))
    (tmp_path / "src" / "tok" / "a b.json").write_bytes(b"{}\n")
    (tmp_path / "src" / "empty").write_bytes(b"")
    (tmp_path / "dest").mkdir()
    return tmp_path / "src"


def test_fresh_copies_land_whole_with_their_mode_and_bytes_are_counted(src):
    wanted = manifest_of(src, ["model.bin", "tok/a b.json", "empty"])
    counter = [0]
    stream = stream_of(wire.frames(str(src), wanted, dict.fromkeys(wanted, 0), counter))
    result = receive(src.parent / "dest", stream)
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.decode().splitlines()) == ["ok empty", "ok model.bin", "ok tok/a b.json"]
    for name in wanted:
        landed = src.parent / "dest" / name
        assert landed.read_bytes() == (src / name).read_bytes()
        assert oct(landed.stat().st_mode & 0o777) == "0o444"
    assert counter[0] == sum(entry["size"] for entry in wanted.values())
    assert not list((src.parent / "dest").rglob("*" + staging.PART))


def test_resumed_copy_sends_only_the_rest_and_is_hashed_whole_on_the_host(src):
    wanted = manifest_of(src, ["model.bin"])
    half = wanted["model.bin"]["size"] // 2
    (src.parent / "dest" / ("model.bin" + staging.PART)).write_bytes((src / "model.bin").read_bytes()[:half])
    counter = [0]
    result = receive(src.parent / "dest", stream_of(wire.frames(str(src), wanted, {"model.bin": half}, counter)))
    assert result.stdout.decode().splitlines() == ["ok model.bin"]
    assert counter[0] == wanted["model.bin"]["size"] - half
    assert (src.parent / "dest" / "model.bin").read_bytes() == (src / "model.bin").read_bytes()


@pytest.mark.parametrize("offset", [0, "half"])
def test_a_part_file_already_there_gets_the_mode_too(src, offset):
    """A part file the receiver did not create (an older run's, another tool's) keeps its own mode
    through dd: it is set before the file goes into place, for a resumed and a restarted copy."""
    wanted = manifest_of(src, ["model.bin"])
    half = wanted["model.bin"]["size"] // 2
    part = src.parent / "dest" / ("model.bin" + staging.PART)
    part.write_bytes((src / "model.bin").read_bytes()[:half])
    part.chmod(0o644)
    send = {"model.bin": half if offset == "half" else 0}
    result = receive(src.parent / "dest", stream_of(wire.frames(str(src), wanted, send, [0])))
    assert result.stdout.decode().splitlines() == ["ok model.bin"]
    assert oct((src.parent / "dest" / "model.bin").stat().st_mode & 0o777) == "0o444"


def test_resumed_part_from_other_content_is_removed_and_reported(src):
    wanted = manifest_of(src, ["model.bin"])
    (src.parent / "dest" / ("model.bin" + staging.PART)).write_bytes(b"x" * 1000)
    result = receive(src.parent / "dest", stream_of(wire.frames(str(src), wanted, {"model.bin": 1000}, [0])))
    assert result.stdout.decode().splitlines() == ["bad model.bin"]
    assert not list((src.parent / "dest").iterdir())


def test_source_differing_from_the_manifest_is_not_renamed_into_place(src):
    wanted = manifest_of(src, ["model.bin"])
    wanted["model.bin"]["sha256"] = "0" * 64
    result = receive(src.parent / "dest", stream_of(wire.frames(str(src), wanted, {"model.bin": 0}, [0])))
    assert result.stdout.decode().splitlines() == ["bad model.bin"]
    assert not (src.parent / "dest" / "model.bin").exists()


def test_stream_cut_short_keeps_the_part_for_the_next_run(src):
    wanted = manifest_of(src, ["empty", "model.bin", "tok/a b.json"])
    stream = stream_of(wire.frames(str(src), wanted, dict.fromkeys(wanted, 0), [0]))
    result = receive(src.parent / "dest", stream[: len(stream) // 2])
    assert result.returncode != 0
    assert result.stdout.decode().splitlines() == ["ok empty"]
    assert not (src.parent / "dest" / "tok").exists()
    part = src.parent / "dest" / ("model.bin" + staging.PART)
    assert 0 < part.stat().st_size < wanted["model.bin"]["size"]
    assert (src / "model.bin").read_bytes().startswith(part.read_bytes())


def test_source_shorter_than_its_manifest_stops_the_sender(src):
    wanted = manifest_of(src, ["tok/a b.json"])
    wanted["tok/a b.json"]["size"] += 10
    with pytest.raises(OSError, match="shorter than the manifest says"):
        stream_of(wire.frames(str(src), wanted, {"tok/a b.json": 0}, [0]))


SENDER = Path(__file__).resolve().parents[2] / "templates" / "gpufleet-relay-send"


def relay(seed_dir, plan, dest):
    """The seed's sender piped into the receiver, as ``ssh seed DIR | receiver`` does on a relay."""
    sender = subprocess.run(
        ["sh", str(SENDER)],
        input=plan.encode(),
        capture_output=True,
        env={"PATH": os.environ["PATH"], "SSH_ORIGINAL_COMMAND": str(seed_dir)},
    )
    return sender, receive(dest, sender.stdout)


def test_relay_sender_streams_what_the_receiver_verifies_and_resumes(src):
    wanted = manifest_of(src, ["model.bin", "tok/a b.json"])
    (src / staging.RECORD).write_text("{}")
    half = wanted["model.bin"]["size"] // 2
    dest = src.parent / "dest"
    (dest / ("model.bin" + staging.PART)).write_bytes((src / "model.bin").read_bytes()[:half])
    plan = (
        f"{half} {wanted['model.bin']['size']} {wanted['model.bin']['sha256']} model.bin\n"
        f"0 3 {wanted['tok/a b.json']['sha256']} tok/a b.json\n"
    )
    sender, result = relay(src, plan, dest)
    assert sender.returncode == 0, sender.stderr
    assert len(sender.stdout) < wanted["model.bin"]["size"]  # only the missing half travelled
    assert sorted(result.stdout.decode().splitlines()) == ["ok model.bin", "ok tok/a b.json"]
    assert (dest / "model.bin").read_bytes() == (src / "model.bin").read_bytes()


def test_relay_receiver_hashes_a_fresh_copy_itself_and_refuses_a_bad_one(src):
    (src / staging.RECORD).write_text("{}")
    # The plan claims a digest the file does not have: the receiving host's own hash catches it.
    _, result = relay(src, f"0 3 {'0' * 64} tok/a b.json\n", src.parent / "dest")
    assert result.stdout.decode().splitlines() == ["bad tok/a b.json"]
    assert not list((src.parent / "dest").rglob("*.json*"))


@pytest.mark.parametrize(
    "directory, path, message",
    [
        ("relative", "model.bin", "not an absolute directory"),
        (None, "../../etc/passwd", "not inside"),
        (None, "/etc/passwd", "not inside"),
        (None, "model.bin", "not here at 5 bytes"),
    ],
)
def test_relay_sender_serves_only_files_inside_a_staged_directory(src, directory, path, message):
    (src / staging.RECORD).write_text("{}")
    size = 5 if path == "model.bin" else 10
    sender, _ = relay(directory or src, f"0 {size} {'0' * 64} {path}\n", src.parent / "dest")
    assert sender.returncode != 0 and message in sender.stderr.decode()
    assert sender.stdout == b""


def test_relay_sender_refuses_a_directory_gpufleet_did_not_stage(src):
    sender, _ = relay(src, "", src.parent / "dest")
    assert sender.returncode == 2 and b"not a gpufleet staged directory" in sender.stderr


def test_relay_key_is_restricted_to_the_sender_and_expires():
    private, public = relay_key()
    assert private.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----") and public.startswith("ssh-ed25519 ")
    line = authorized_line(public, "gpufleet-relay-lab-2-abc", "202611231500")
    assert line == (f'restrict,command="{RELAY_SENDER}",expiry-time="202611231500" {public} gpufleet-relay-lab-2-abc')


def test_room_is_the_bytes_to_receive_plus_the_margin():
    from operations.core.checks import size_bytes
    from operations.offline.staging.facts import FreeSpace, room_shortfall

    free = FreeSpace().process(["/dev/vda1  268435456000  214748364800  52613349376  81% /srv"])
    assert free == {"available": 52613349376, "mount": "/srv"}
    assert size_bytes("1g") == 1 << 30 and size_bytes("50m") == 50 << 20
    assert room_shortfall("gpu-7", "/srv/w/qwen", 52613349376 - (1 << 30), free, 1 << 30) is None
    assert room_shortfall("gpu-7", "/srv/w/qwen", 0, {"available": 0, "mount": "/"}, 1 << 30) is None  # nothing to send
    refused = room_shortfall("gpu-7", "/srv/w/qwen", 52613349376, free, 1 << 30)
    assert refused.startswith(
        "gpu-7: /srv/w/qwen: no room: 52613349376 bytes to receive + 1073741824 margin "
        "(gpufleet_free_space_margin), 52613349376 free on /srv; nothing was sent"
    )


def test_relay_keys_left_are_counted_in_the_logins_file():
    from operations.offline.staging.relay import RelayKeysLeft

    assert RelayKeysLeft().process(["/home/ops/.ssh/authorized_keys", "2"]) == {
        "path": "/home/ops/.ssh/authorized_keys",
        "count": 2,
    }
    assert RelayKeysLeft().process(["/root/.ssh/authorized_keys"]) == {"path": "/root/.ssh/authorized_keys", "count": 0}


@pytest.mark.parametrize("mode", ["444", "640", "755"])
def test_files_get_the_mode_and_directories_stay_searchable(src, mode):
    """A mode without execute bits comes from the umask as the file is created (no chmod per file);
    one with them is set after; the directories made on the way are 755 either way."""
    wanted = manifest_of(src, ["model.bin", "tok/a b.json"])
    stream = stream_of(wire.frames(str(src), wanted, dict.fromkeys(wanted, 0), [0]))
    result = receive(src.parent / "dest", stream, mode=mode)
    assert result.returncode == 0, result.stderr
    for name in wanted:
        assert oct((src.parent / "dest" / name).stat().st_mode & 0o777) == f"0o{mode}"
    assert oct((src.parent / "dest" / "tok").stat().st_mode & 0o777) == "0o755"


class SSHConnector:
    """What openssh_argv reads of pyinfra's SSH connector: its class name and its data."""

    def __init__(self, **data):
        self.data = {"ssh_strict_host_key_checking": "accept-new", **data}


class FakeHost:
    def __init__(self, name, connector, data=None):
        self.name, self.connector, self.data = name, connector, data or {}


def test_openssh_reaches_the_host_as_pyinfra_does():
    host = FakeHost(
        "gpu-01",
        SSHConnector(
            ssh_hostname="10.0.0.5",
            ssh_port=2222,
            ssh_user="ops",
            ssh_key="/keys/id",
            ssh_config_file="/etc/ssh/fleet_config",
            ssh_known_hosts_file="/etc/ssh/fleet_hosts",
        ),
    )
    argv = remote.openssh_argv(host, "sudo -H -n sh -c 'true'")
    assert argv[0] == "ssh" and argv[-2:] == ["10.0.0.5", "sudo -H -n sh -c 'true'"] and argv[-3] == "--"
    flags = " ".join(argv[1:-3])
    for flag in (
        "-o BatchMode=yes",
        "-o ServerAliveInterval=10 -o ServerAliveCountMax=2",  # the liveness bound: 20 s without an answer
        "-c aes128-gcm@openssh.com,",
        "-F /etc/ssh/fleet_config",
        "-o UserKnownHostsFile=/etc/ssh/fleet_hosts",
        "-o StrictHostKeyChecking=accept-new",
        "-p 2222",
        "-l ops",
        "-i /keys/id",
    ):
        assert flag in flags, (flag, flags)
    # the inventory name when there is no ssh_hostname; nothing pyinfra was not given
    bare = remote.openssh_argv(FakeHost("gpu-02", SSHConnector()), "true")
    assert bare[-2] == "gpu-02" and not {"-p", "-l", "-i", "-F"} & set(bare)


@pytest.mark.parametrize("data", [{"ssh_password": "x"}, {"ssh_key": "/k", "ssh_key_password": "x"}])
def test_openssh_is_not_used_for_a_login_that_would_prompt(data):
    assert remote.openssh_argv(FakeHost("gpu-01", SSHConnector(**data)), "true") is None


def test_openssh_is_not_used_for_other_connectors():
    class DockerConnector:
        data = {}

    assert remote.openssh_argv(FakeHost("gpu-01", DockerConnector()), "true") is None


def test_bulk_stream_through_a_client_process(tmp_path):
    """The bytes reach the command whole; its output and status come back; a command that stops
    reading early ends the stream without an error on this side."""
    data = os.urandom(5 << 20)
    status, lines, stderr = remote._openssh_stream(
        ["sh", "-c", f"cat > {tmp_path}/got && echo done && echo note >&2"], [data[:12345], data[12345:]]
    )
    assert (status, lines, stderr) == (0, ["done"], "note\n")
    assert (tmp_path / "got").read_bytes() == data
    status, lines, _ = remote._openssh_stream(["sh", "-c", "head -c 10 > /dev/null; exit 3"], [data] * 8)
    assert (status, lines) == (3, [])


def test_a_source_file_hashed_this_run_and_unchanged_is_sent_unread(src):
    """A file whose SHA-256 the run established (checking a bundle or a directory's manifest) goes as
    a span of the file, with the manifest's digest as its verdict; one never hashed is read and hashed."""
    wanted = manifest_of(src, ["model.bin", "tok/a b.json"])
    model = src / "model.bin"
    assert bundle.cached_sha256(model, model.stat(), None) == wanted["model.bin"]["sha256"]
    counter = [0]
    frames = list(wire.frames(str(src), wanted, dict.fromkeys(wanted, 0), counter))
    spans = [frame for frame in frames if isinstance(frame, remote.FileSpan)]
    assert [(Path(span.handle.name).name, span.offset, span.count) for span in spans] == [
        ("model.bin", 0, wanted["model.bin"]["size"])
    ]
    assert frames[frames.index(spans[0]) + 1] == (wanted["model.bin"]["sha256"] + "\n").encode()
    assert counter[0] == sum(entry["size"] for entry in wanted.values())
    result = receive(src.parent / "dest", stream_of(wire.frames(str(src), wanted, dict.fromkeys(wanted, 0), [0])))
    assert sorted(result.stdout.decode().splitlines()) == ["ok model.bin", "ok tok/a b.json"]
    assert (src.parent / "dest" / "model.bin").read_bytes() == model.read_bytes()


def test_a_source_file_rewritten_since_it_was_hashed_is_hashed_again(src):
    """Same size, mtime put back: the ctime still moved, so the sender hashes what it sends, and the
    host refuses the copy (the manifest's digest is the old content's)."""
    model = src / "model.bin"
    wanted = manifest_of(src, ["model.bin"])
    before = model.stat()
    bundle.cached_sha256(model, before, None)
    model.write_bytes(os.urandom(before.st_size))
    os.utime(model, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert bundle.vouched_sha256(model, model.stat()) is None
    frames = list(wire.frames(str(src), wanted, {"model.bin": 0}, [0]))
    assert not any(isinstance(frame, remote.FileSpan) for frame in frames)
    result = receive(src.parent / "dest", b"".join(frames))
    assert result.stdout.decode().splitlines() == ["bad model.bin"]


def test_spans_reach_a_client_process_whole_without_passing_through_python(src, tmp_path):
    """The OpenSSH stream splices spans into the client's pipe: the bytes arrive whole, in order
    with the plain frames around them, for a whole file and the rest of one."""
    model = src / "model.bin"
    size = model.stat().st_size
    with open(model, "rb") as handle:
        status, lines, _ = remote._openssh_stream(
            ["sh", "-c", f"cat > {tmp_path}/got && echo done"],
            [b"head\n", remote.FileSpan(handle, 0, size), b"mid\n", remote.FileSpan(handle, size - 1000, 1000)],
        )
    assert (status, lines) == (0, ["done"])
    data = model.read_bytes()
    assert (tmp_path / "got").read_bytes() == b"head\n" + data + b"mid\n" + data[-1000:]


def test_a_span_past_the_end_of_its_file_names_it_and_the_client_is_reaped(src, tmp_path, monkeypatch):
    model = src / "model.bin"
    started, popen = [], remote.subprocess.Popen

    def start(*args, **kwargs):
        started.append(popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(remote.subprocess, "Popen", start)
    with open(model, "rb") as handle, pytest.raises(OSError, match="model.bin: shorter than the manifest says"):
        remote._openssh_stream(
            ["sh", "-c", f"cat > {tmp_path}/got"], [remote.FileSpan(handle, 0, model.stat().st_size + 10)]
        )
    assert (tmp_path / "got").stat().st_size == model.stat().st_size  # the client had ended: all it read is written
    # and it was waited for: its pid is no child of this process any more (other children, such as the
    # lab's image builds that CI runs beside the unit tests, are not this test's)
    assert len(started) == 1 and started[0].returncode == 0
    with pytest.raises(ChildProcessError):
        os.waitpid(started[0].pid, os.WNOHANG)


def test_a_resumed_copy_whose_name_sha256sum_escapes_is_verified(src):
    """sha256sum marks a line whose file name it escaped (a backslash in it) with a leading
    backslash: the receiver reads the digest past it."""
    name = "tok/odd\\name.bin"
    (src / name).write_bytes(os.urandom(5000))
    wanted = manifest_of(src, [name])
    (src.parent / "dest" / "tok").mkdir()
    (src.parent / "dest" / (name + staging.PART)).write_bytes((src / name).read_bytes()[:1000])
    result = receive(src.parent / "dest", stream_of(wire.frames(str(src), wanted, {name: 1000}, [0])))
    assert result.stdout.decode().splitlines() == [f"ok {name}"], result.stderr
    assert (src.parent / "dest" / name).read_bytes() == (src / name).read_bytes()
