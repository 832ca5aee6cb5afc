"""The staging stream: the sender's frames fed to the host-side receiver script, run here with
/bin/sh and coreutils as on a Debian host (fresh, resumed, damaged and cut-short copies)."""

import hashlib
import os
import subprocess

import pytest

from operations import staging


def receive(dest, stream, mode="444"):
    return subprocess.run(["sh", "-c", staging.RECEIVE, "gpufleet-receive", str(dest), mode],
                          input=stream, capture_output=True)


def manifest_of(src, names):
    return {name: {"size": (src / name).stat().st_size, "sha256": hashlib.sha256((src / name).read_bytes()).hexdigest()}
            for name in names}


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
    stream = b"".join(staging._frames(str(src), wanted, dict.fromkeys(wanted, 0), counter))
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
    result = receive(src.parent / "dest", b"".join(staging._frames(str(src), wanted, {"model.bin": half}, counter)))
    assert result.stdout.decode().splitlines() == ["ok model.bin"]
    assert counter[0] == wanted["model.bin"]["size"] - half
    assert (src.parent / "dest" / "model.bin").read_bytes() == (src / "model.bin").read_bytes()


def test_resumed_part_from_other_content_is_removed_and_reported(src):
    wanted = manifest_of(src, ["model.bin"])
    (src.parent / "dest" / ("model.bin" + staging.PART)).write_bytes(b"x" * 1000)
    result = receive(src.parent / "dest", b"".join(staging._frames(str(src), wanted, {"model.bin": 1000}, [0])))
    assert result.stdout.decode().splitlines() == ["bad model.bin"]
    assert not list((src.parent / "dest").iterdir())


def test_source_differing_from_the_manifest_is_not_renamed_into_place(src):
    wanted = manifest_of(src, ["model.bin"])
    wanted["model.bin"]["sha256"] = "0" * 64
    result = receive(src.parent / "dest", b"".join(staging._frames(str(src), wanted, {"model.bin": 0}, [0])))
    assert result.stdout.decode().splitlines() == ["bad model.bin"]
    assert not (src.parent / "dest" / "model.bin").exists()


def test_stream_cut_short_keeps_the_part_for_the_next_run(src):
    wanted = manifest_of(src, ["empty", "model.bin", "tok/a b.json"])
    stream = b"".join(staging._frames(str(src), wanted, dict.fromkeys(wanted, 0), [0]))
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
        b"".join(staging._frames(str(src), wanted, {"tok/a b.json": 0}, [0]))
