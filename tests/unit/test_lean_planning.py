"""lean_planning: pyinfra's planning reads with less work give pyinfra's own answers."""

import inspect
import types

from pyinfra.api import arguments as pyinfra_arguments
from pyinfra.api import util as pyinfra_util

from operations.core import lean_planning


def _order_with(stack, getframeinfo, state):
    before = pyinfra_util.stack, pyinfra_util.getframeinfo
    pyinfra_util.stack, pyinfra_util.getframeinfo = stack, getframeinfo
    try:
        return pyinfra_util.get_operation_order_from_stack(state), pyinfra_util.get_call_location()
    finally:
        pyinfra_util.stack, pyinfra_util.getframeinfo = before


def _nested(depth, read):
    return _nested(depth - 1, read) if depth else read()


def test_the_operation_order_and_call_location_are_inspects():
    state = types.SimpleNamespace(current_deploy_filename=__file__, current_op_file_number=3)
    reads = {
        "inspect": (inspect.stack, inspect.getframeinfo),
        "frames": (lean_planning.stack, lean_planning.getframeinfo),
    }
    for depth in (0, 1, 4):
        # both read from the same lines: only the functions differ
        by_inspect, by_frames = (
            _nested(depth, lambda way=way: _order_with(*reads[way], state)) for way in ("inspect", "frames")
        )
        assert by_frames == by_inspect
        assert len(by_frames[0]) > depth  # the test's own call lines are in it


def test_the_kept_argument_types_are_pyinfras_and_a_caller_cannot_change_them():
    kept = lean_planning.kept(pyinfra_arguments.all_global_arguments)
    first = kept()
    assert first == pyinfra_arguments.all_global_arguments()
    assert ("_sudo", bool) in first
    first.clear()
    assert kept() == pyinfra_arguments.all_global_arguments()


def test_install_gives_pyinfra_the_lean_reads_once():
    before = pyinfra_util.stack, pyinfra_util.getframeinfo, pyinfra_arguments.all_global_arguments
    try:
        lean_planning.install()
        kept = pyinfra_arguments.all_global_arguments
        lean_planning.install()
        assert (pyinfra_util.stack, pyinfra_util.getframeinfo) == (lean_planning.stack, lean_planning.getframeinfo)
        assert pyinfra_arguments.all_global_arguments is kept and kept.gpufleet_kept
        assert kept() == before[2]()
    finally:
        pyinfra_util.stack, pyinfra_util.getframeinfo, pyinfra_arguments.all_global_arguments = before
