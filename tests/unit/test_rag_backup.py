"""The RAG stack backup's host-side commands (operations/rag/backup.py), run here with the real tar and
sha256sum and a systemctl stand-in that records what it is asked and says which units run: the
archive holds both parts' data and its SHA-256 is the file's, the units that ran run again (also
after a failed archive), a restore swaps the data in and keeps what it replaced, and a restore whose
archive cannot be unpacked leaves the data as it was and starts the stack again, failing."""

import hashlib
import os
import subprocess
import tarfile

import pytest

from operations.rag import backup

SYSTEMCTL = """#!/bin/sh
echo "$*" >> "$SYSTEMCTL_LOG"
if [ "$1" = -q ] && [ "$2" = is-active ]; then
    case " $RUNNING " in *" $3 "*) exit 0 ;; esac
    exit 3
fi
exit 0
"""


@pytest.fixture
def host(tmp_path):
    """A data directory with both parts' data, and a PATH whose systemctl is the stand-in."""
    data = tmp_path / "rag"
    for name, content in (("webui", b"accounts and chats"), ("vectordb", b"vectors")):
        (data / name).mkdir(parents=True)
        (data / name / "db.sqlite3").write_bytes(content)
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "systemctl").write_text(SYSTEMCTL)
    (tools / "systemctl").chmod(0o755)
    log = tmp_path / "systemctl.log"
    env = {
        **os.environ,
        "PATH": f"{tools}:{os.environ['PATH']}",
        "SYSTEMCTL_LOG": str(log),
        "RUNNING": "gpufleet-rag-vectordb.service gpufleet-rag-webui.service",
    }
    return {"data": data, "env": env, "log": log, "tmp": tmp_path}


def run(host, command):
    return subprocess.run(["sh", "-c", command], env=host["env"], capture_output=True, text=True)


def test_a_backup_archives_both_parts_at_rest_and_starts_again_what_ran(host):
    outgoing = host["tmp"] / "rag-backup" / "outgoing"
    done = run(host, backup.stop_archive_start(str(host["data"]), str(outgoing)))
    assert done.returncode == 0, done.stderr
    archive = outgoing / backup.ARCHIVE
    assert (outgoing / f"{backup.ARCHIVE}.sha256").read_text().strip() == hashlib.sha256(
        archive.read_bytes()
    ).hexdigest()
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == ["vectordb", "vectordb/db.sqlite3", "webui", "webui/db.sqlite3"]
    assert oct(archive.stat().st_mode & 0o777) == "0o400" and oct(outgoing.stat().st_mode & 0o777) == "0o700"
    calls = host["log"].read_text().splitlines()
    stop = calls.index("stop gpufleet-rag-vectordb.service gpufleet-rag-webui.service")
    # the front did not run (not served by the gateway): only the two that ran start again, after
    assert calls[stop + 1 :] == ["start gpufleet-rag-vectordb.service gpufleet-rag-webui.service"]


def test_a_failed_archive_still_starts_the_stack_and_fails(host):
    outgoing = host["tmp"] / "outgoing"
    (host["data"] / "vectordb").rename(host["data"] / "elsewhere")  # tar cannot find it
    done = run(host, backup.stop_archive_start(str(host["data"]), str(outgoing)))
    assert done.returncode != 0
    assert host["log"].read_text().splitlines()[-1] == "start gpufleet-rag-vectordb.service gpufleet-rag-webui.service"
    assert not (outgoing / backup.ARCHIVE).exists()


def test_a_restore_swaps_the_data_in_keeps_what_it_replaced_and_starts_the_stack(host):
    outgoing = host["tmp"] / "outgoing"
    assert run(host, backup.stop_archive_start(str(host["data"]), str(outgoing))).returncode == 0
    (host["data"] / "webui" / "db.sqlite3").write_bytes(b"changed since")
    me = subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
    done = run(host, backup.put_in_place(str(host["data"]), str(outgoing), {"webui": me, "vectordb": me}))
    assert done.returncode == 0, done.stderr
    assert (host["data"] / "webui" / "db.sqlite3").read_bytes() == b"accounts and chats"
    assert (host["data"] / "webui.before-restore" / "db.sqlite3").read_bytes() == b"changed since"
    assert not (host["data"] / ".restoring").exists()
    assert host["log"].read_text().splitlines()[-1] == "start gpufleet-rag-vectordb.service gpufleet-rag-webui.service"


def test_a_restore_that_cannot_unpack_leaves_the_data_and_starts_the_stack(host):
    incoming = host["tmp"] / "incoming"
    incoming.mkdir()
    (incoming / backup.ARCHIVE).write_bytes(b"not a tar archive")
    done = run(host, backup.put_in_place(str(host["data"]), str(incoming), {"webui": "root", "vectordb": "root"}))
    assert done.returncode != 0
    assert (host["data"] / "webui" / "db.sqlite3").read_bytes() == b"accounts and chats"
    assert not (host["data"] / "webui.before-restore").exists() and not (host["data"] / ".restoring").exists()
    assert host["log"].read_text().splitlines()[-1] == "start gpufleet-rag-vectordb.service gpufleet-rag-webui.service"
