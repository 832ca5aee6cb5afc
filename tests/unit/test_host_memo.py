"""host_memo.until_changed: an answer is kept for a host while none of its operations ran a command
or failed, and worked out again after one did (pyinfra's own OperationMeta)."""

from types import SimpleNamespace

import pytest
from pyinfra.api.operation import OperationMeta
from pyinfra.connectors.util import CommandOutput
from pyinfra.context import ctx_host

from operations.core import host_memo
from operations.core.host_memo import until_changed


class Host:
    def __init__(self, name, state):
        self.name, self.state = name, state


def operation(state, on, commands=None, success=True):
    """An operation on host ``on``: run (``commands``: what it ran) when ``commands`` is not None."""
    meta = OperationMeta(f"op{sum(len(ops) for ops in state.ops.values())}", None)
    if commands is not None:
        meta.set_complete(success, commands, CommandOutput([]))
    state.ops.setdefault(on, {})[meta._hash] = SimpleNamespace(operation_meta=meta)
    return meta


@pytest.fixture
def asked():
    calls = []

    @until_changed
    def plan(*args):
        calls.append((ctx_host.get().name, args))
        return f"plan {len(calls)}"

    yield plan, calls
    ctx_host.set(None)


def test_kept_while_operations_run_no_commands_then_worked_out_again_after_a_change(asked):
    plan, calls = asked
    state = SimpleNamespace(ops={})
    gpu = Host("gpu-01", state)
    ctx_host.set(gpu)
    operation(state, gpu)  # prepared, not run yet
    assert plan("distro", "535") == plan("distro", "535") == "plan 1"
    operation(state, gpu, commands=[])  # ran, nothing to do (a no-op)
    assert plan("distro", "535") == "plan 1"
    operation(state, gpu, commands=["apt-get update"])  # changed the host
    assert plan("distro", "535") == "plan 2"
    assert plan("distro", "535") == "plan 2"
    assert plan("cuda", "535") == "plan 3"  # other arguments: their own answer
    operation(state, gpu, commands=["apt-get install x"], success=False)  # failed half-way
    assert plan("distro", "535") == "plan 4"
    assert len(calls) == 4


def test_each_host_has_its_own_answers(asked):
    plan, calls = asked
    state = SimpleNamespace(ops={})
    first, second = Host("gpu-01", state), Host("gpu-02", state)
    ctx_host.set(first)
    assert plan("distro", "535") == "plan 1"
    operation(state, second, commands=["reboot"])  # the other host changed: not this one
    assert plan("distro", "535") == "plan 1"
    ctx_host.set(second)
    assert plan("distro", "535") == "plan 2"
    assert calls == [("gpu-01", ("distro", "535")), ("gpu-02", ("distro", "535"))]


def test_an_exception_is_not_kept(asked):
    attempts = []

    @until_changed
    def flaky():
        attempts.append(1)
        if len(attempts) == 1:
            raise ValueError("apt is busy")
        return "plan"

    ctx_host.set(Host("gpu-01", SimpleNamespace(ops={})))
    with pytest.raises(ValueError):
        flaky()
    assert flaky() == "plan" and len(attempts) == 2


class FactHost(Host):
    def __init__(self, name, state):
        super().__init__(name, state)
        self.asked = []

    def get_fact(self, fact_class, **arguments):
        self.asked.append((fact_class, arguments))
        return {"kernel": "6.1.0-56-amd64", "asked": len(self.asked)}


def test_a_fact_is_asked_once_until_an_operation_changes_the_host_and_each_caller_gets_its_own_copy():
    state = SimpleNamespace(ops={})
    gpu = FactHost("gpu-01", state)
    ctx_host.set(gpu)
    try:
        first = host_memo.fact("KernelHeaders")
        first["kernel"] = "changed by a caller"
        assert host_memo.fact("KernelHeaders") == {"kernel": "6.1.0-56-amd64", "asked": 1}
        assert host_memo.fact("StagedFiles", path="/srv") == {"kernel": "6.1.0-56-amd64", "asked": 2}
        operation(state, gpu, commands=["apt-get install linux-headers-6.1.0-56-amd64"])
        assert host_memo.fact("KernelHeaders")["asked"] == 3
        assert gpu.asked == [("KernelHeaders", {}), ("StagedFiles", {"path": "/srv"}), ("KernelHeaders", {})]
    finally:
        ctx_host.set(None)


def test_an_inventory_wide_answer_is_worked_out_once_per_run_whatever_the_host():
    calls = []

    @host_memo.per_run
    def site():
        calls.append(ctx_host.get().name)
        return f"site {len(calls)}"

    run, next_run = SimpleNamespace(ops={}), SimpleNamespace(ops={})
    try:
        for name in ("gpu-01", "gpu-02", "edge-01"):
            ctx_host.set(Host(name, run))
            assert site() == "site 1"
        ctx_host.set(Host("gpu-01", next_run))  # another run (state): worked out again
        assert site() == "site 2"
        assert calls == ["gpu-01", "gpu-01"]
    finally:
        ctx_host.set(None)
