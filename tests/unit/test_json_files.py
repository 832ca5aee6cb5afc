import json

import pytest

from operations.core import json_files
from operations.core.errors import HostStateError
from operations.core.json_files import JsonFile

DAEMON = "/etc/docker/daemon.json"
ROTATION = {"log-driver": "json-file", "log-opts": {"max-size": "50m", "max-file": "3"}}


def uploads(commands):
    return [c for c in commands if isinstance(c, tuple) and c[0] == "upload"]


def test_missing_file_is_created_with_settings(run_op):
    commands, _ = run_op(json_files.merged, {f"JsonFile:{DAEMON}": None}, path=DAEMON, settings=ROTATION)
    ((_, dest, content),) = uploads(commands)
    assert dest == DAEMON and json.loads(content) == ROTATION


def test_existing_keys_are_kept_and_nested_objects_merged(run_op):
    current = {
        "runtimes": {"nvidia": {"path": "nvidia-container-runtime", "args": []}},
        "log-opts": {"labels": "app"},
        "data-root": "/srv/docker",
    }
    commands, _ = run_op(json_files.merged, {f"JsonFile:{DAEMON}": current}, path=DAEMON, settings=ROTATION)
    ((_, _, content),) = uploads(commands)
    written = json.loads(content)
    assert written["runtimes"] == current["runtimes"] and written["data-root"] == "/srv/docker"
    assert written["log-opts"] == {"labels": "app", "max-size": "50m", "max-file": "3"}


def test_written_layout_matches_nvidia_ctk(run_op):
    commands, _ = run_op(json_files.merged, {f"JsonFile:{DAEMON}": None}, path=DAEMON, settings={"b": 1, "a": 2})
    assert uploads(commands)[0][2] == '{\n    "a": 2,\n    "b": 1\n}\n'


def test_converged_file_is_a_noop(run_op):
    current = {**ROTATION, "runtimes": {"nvidia": {"path": "/usr/bin/nvidia-container-runtime", "args": []}}}
    commands, noops = run_op(json_files.merged, {f"JsonFile:{DAEMON}": current}, path=DAEMON, settings=ROTATION)
    assert commands == [] and noops


def test_invalid_json_is_refused_naming_the_file(run_op):
    with pytest.raises(HostStateError, match=r"/etc/docker/daemon.json: not valid JSON"):
        run_op(
            json_files.merged, {f"JsonFile:{DAEMON}": JsonFile().process(["{ broken"])}, path=DAEMON, settings=ROTATION
        )


@pytest.mark.parametrize(
    "lines, expected",
    [
        (["__gpufleet_missing__"], None),
        ([], {}),
        (['{"a": 1}'], {"a": 1}),
        (["[1, 2]"], {"__invalid__": "not a JSON object"}),
    ],
)
def test_json_file_fact(lines, expected):
    assert JsonFile().process(lines) == expected
