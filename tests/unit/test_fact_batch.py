"""fact_batch: the one script gives each fact the lines pyinfra would give it, through a real sh."""

import json
import subprocess

import pytest
from pyinfra.api import FactBase, MaskString, StringCommand
from pyinfra.facts.files import File

from operations.core import fact_batch


def through_sh(commands):
    """Each command's stdout lines as the script reports them (exit 0 only), run by /bin/sh."""
    done = subprocess.run(["sh", "-c", fact_batch.script(commands)], capture_output=True, text=True, check=True)
    return fact_batch.outputs(fact_batch.archived(done.stdout.split("\n")))


def alone(command):
    """The stdout lines pyinfra's SSH connector makes of ``command`` run by itself (paramiko's file
    splits at each newline, a carriage return stays)."""
    done = subprocess.run(["sh", "-c", command], capture_output=True)
    lines = [line.decode() for line in done.stdout.split(b"\n")]
    return (lines[:-1] if lines[-1] == "" else lines) if done.returncode == 0 else None


SHAPES = [
    "printf 'one\\ntwo\\n'",
    "printf 'no newline at the end'",
    "true",  # no output
    "printf '\\n\\nblank lines\\n\\n'",
    "printf 'trailing  \\ncarriage\\r\\n'",
    "printf 'caf\\303\\251 \\342\\234\\223\\n'",  # UTF-8
    "echo out; echo err >&2",  # stderr is not stdout
    "echo before; exit 3",  # fails: not answered
    "echo '# a comment ends the line'  # here",
    "x=1; echo $x; exit 0",  # its own subshell: exit ends only it
]


def test_each_command_gets_the_lines_it_would_get_alone():
    found = through_sh(SHAPES)
    for number, command in enumerate(SHAPES):
        assert found.get(number) == alone(command), command
    assert 7 not in found and found[9] == ["1"]


def test_a_fact_answers_from_its_lines_as_pyinfra_would():
    fact = File()
    assert fact_batch.answer(fact, []) == fact.default()
    with pytest.raises(LookupError):
        fact_batch.answer(fact, ["##PYINFRA_NOCMD##"])  # pyinfra raises MissingCommandError there


def test_a_required_command_is_guarded_as_pyinfra_guards_it():
    class NeedsTool(FactBase):
        def requires_command(self):
            return "surely-not-a-command-here"

        def command(self):
            return "surely-not-a-command-here --version"

    command = fact_batch.fact_command(NeedsTool(), {})
    assert through_sh([command.get_raw_value()]) == {0: ["##PYINFRA_NOCMD##"]}


def test_a_masked_command_is_never_written_down(tmp_path):
    secret = StringCommand("login", MaskString("s3cret"))
    assert fact_batch.writable(secret) is None
    assert fact_batch.writable(StringCommand("cat", "/etc/hostname")) == "cat /etc/hostname"
    how = fact_batch.how_key({"_sudo": True, "_sudo_password": "s3cret", "_success_exit_codes": [0]})
    assert "s3cret" not in how and "_sudo" in how
    assert fact_batch.how_key({"_env": {"TOKEN": "x"}}) is None
    assert fact_batch.how_key({"_success_exit_codes": [0, 1]}) is None


def test_the_record_is_the_users_alone_and_holds_only_this_run(tmp_path):
    learned = fact_batch.Learned(tmp_path / "facts" / "host.json")
    learned.asked("how", "key", "cat /etc/hostname")
    learned.save()
    assert (tmp_path / "facts").stat().st_mode & 0o777 == 0o700
    assert learned.path.stat().st_mode & 0o777 == 0o600
    again = fact_batch.Learned(learned.path)
    assert again.batch("how") == [("key", "cat /etc/hostname", [])] and again.batch("other") == []
    learned.path.write_text(json.dumps({"format": 1, "batches": {"how": {"k": "c"}}}))
    assert fact_batch.Learned(learned.path).batch("how") == []  # another format: nothing trusted
    learned.path.write_text("{not json")
    assert fact_batch.Learned(learned.path).batch("how") == []


def test_the_batch_runs_four_programs_of_its_own_however_many_facts(tmp_path):
    # mktemp, tar, gzip and base64 shimmed on PATH: each logs its call, then runs the real one
    log = tmp_path / "calls"
    for tool in ("tar", "gzip", "base64", "mktemp"):
        real = subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True, text=True).stdout.strip()
        shim = tmp_path / tool
        shim.write_text(f'#!/bin/sh\necho {tool} >>"{log}"\nexec {real} "$@"\n')
        shim.chmod(0o755)
    commands = [f"echo fact {number}" for number in range(40)]
    path = f"{tmp_path}:/usr/bin:/bin"
    done = subprocess.run(["sh", "-c", fact_batch.script(commands)], capture_output=True, text=True, env={"PATH": path})
    assert fact_batch.outputs(fact_batch.archived(done.stdout.split("\n"))) == {
        number: [f"fact {number}"] for number in range(40)
    }
    assert sorted(log.read_text().split()) == ["base64", "gzip", "mktemp", "tar"]


def test_an_unreadable_archive_answers_nothing():
    assert fact_batch.outputs(fact_batch.archived([])) == {}
    assert fact_batch.outputs(fact_batch.archived(["##gpufleet-fact", "bm90IGEgdGFy"])) == {}  # base64 of "not a tar"
    assert fact_batch.outputs(fact_batch.archived(["##gpufleet-fact", "!!"])) == {}


def test_a_command_that_reads_stdin_gets_none_of_the_script_given_on_stdin():
    commands = ["cat", "read line; echo got-$line", "echo after"]
    done = subprocess.run(["sh", "-s"], input=fact_batch.script(commands), capture_output=True, text=True)
    assert fact_batch.outputs(fact_batch.archived(done.stdout.split("\n"))) == {0: [], 1: ["got-"], 2: ["after"]}


def fingerprinted(tmp_path, unchanged, kept):
    """Runs one counted command whose answer follows from ``tmp_path / "state"`` (its lines: the
    state's files) through sh; returns (its answer, its fingerprint, how many times it ran in all)."""
    state, runs = tmp_path / "state", tmp_path / "runs"
    command = f"printf x >> {runs}; ls {state}"
    script = fact_batch.script([command], {0: ([str(state)], unchanged)})
    lines = subprocess.run(["sh", "-s"], input=script, capture_output=True, text=True, check=True).stdout.split("\n")
    files = fact_batch.archived(lines)
    answer = fact_batch.outputs(files, {0: kept} if kept is not None else None).get(0)
    return answer, fact_batch.fingerprints(files).get(0), len(runs.read_text()) if runs.exists() else 0


def test_a_fact_with_files_is_not_run_again_while_they_are_unchanged(tmp_path):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "status").write_text("held\n")
    answer, fingerprint, runs = fingerprinted(tmp_path, None, None)
    assert answer == ["status"] and fingerprint and runs == 1
    answer, again, runs = fingerprinted(tmp_path, fingerprint, ["kept"])
    assert answer == ["kept"] and again == fingerprint and runs == 1  # the kept answer; not run


@pytest.mark.parametrize(
    "change",
    [
        "echo more >> state/status",  # written
        "touch state/lists",  # added
        "rm state/status",  # removed
        # rewritten with the same size and its modification time set back: ctime still moves
        "sleep 0.01; cp state/status state/.new && touch -r state/status state/.new && mv state/.new state/status",
        "sleep 0.01; echo HELD > state/status && touch -d @0 state/status",
    ],
)
def test_any_change_to_a_facts_files_runs_it_again(tmp_path, change):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "status").write_text("held\n")
    _, fingerprint, _ = fingerprinted(tmp_path, None, None)
    subprocess.run(["sh", "-c", change], cwd=tmp_path, check=True)
    answer, again, runs = fingerprinted(tmp_path, fingerprint, ["kept"])
    assert runs == 2 and again != fingerprint
    assert answer == sorted(path.name for path in (tmp_path / "state").iterdir())
