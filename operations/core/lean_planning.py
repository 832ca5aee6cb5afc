"""
pyinfra's planning with the same answers and less work, for fleets where the control node plans
every host on a few cores. Measured on a 16-host converged no-op of deploy.py (profiled), the two
largest shares of the control node's CPU:

- where each operation is called from: pyinfra orders a host's operations by the line numbers of the
  calls that led to it (``pyinfra.api.util.get_operation_order_from_stack``), read with
  ``inspect.stack()`` and ``inspect.getframeinfo``, which also read every frame's source lines
  (``findsource`` scans ``sys.modules``): 27,536 frame reads; only file names and line numbers are used.
  ``stack`` and ``getframeinfo`` here answer those from the frames themselves.
- the global arguments' types: ``pyinfra.api.arguments.all_global_arguments`` evaluates the
  ``AllArguments`` TypedDict's annotations (``typing.get_type_hints``) on each of its 3,194 calls; they
  are the same each time, so ``install`` keeps the first answer.

tests/unit/test_lean_planning.py compares each with pyinfra's own.
"""

import sys
from collections import namedtuple

from pyinfra.api import arguments as pyinfra_arguments
from pyinfra.api import util as pyinfra_util

CallSite = namedtuple("CallSite", "filename lineno")


def stack():
    """``inspect.stack()`` as pyinfra reads it: the caller's frame first, then its callers', each as
    an item whose first element is the frame."""
    frames, frame = [], sys._getframe(1)
    while frame is not None:
        frames.append((frame,))
        frame = frame.f_back
    return frames


def getframeinfo(frame):
    """``inspect.getframeinfo(frame)``'s file name and line number, no source lines read."""
    return CallSite(frame.f_code.co_filename, frame.f_lineno)


def kept(read):
    """``read``, read once now (a list): a copy of that answer on every call."""
    answer = tuple(read())

    def read_once():
        return list(answer)

    read_once.gpufleet_kept = True
    return read_once


def install():
    """Give pyinfra's util module the frame reads and its arguments module the kept types (once)."""
    pyinfra_util.stack = stack
    pyinfra_util.getframeinfo = getframeinfo
    if not getattr(pyinfra_arguments.all_global_arguments, "gpufleet_kept", False):
        pyinfra_arguments.all_global_arguments = kept(pyinfra_arguments.all_global_arguments)
