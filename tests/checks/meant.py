"""Which checks apply to a host follows what its host.json says it is meant to be."""

import pytest


def only_where(host, meant, otherwise):
    """``host`` when it is ``meant`` to have what a check looks at; otherwise the check is skipped,
    saying what the host is (``otherwise``)."""
    if not meant:
        pytest.skip(f"{host.backend.get_hostname()}: {otherwise}")
    return host
