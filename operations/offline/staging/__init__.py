"""
Stage files from the control node onto hosts over pyinfra's own SSH connection: resumable,
verified with SHA-256, and skipped in constant time when already there and intact.

All files for a host go in one stream on one SSH channel (no round trip per file). A fresh copy
is checked on the control node: a file the run already hashed against the manifest (a bundle's or
a directory's, see ``bundle.cached_sha256``) and unchanged since is sent unread; any other is hashed
as it is read (SSH's MAC covers the way, the host checks the size). A resumed copy, or a file found
at the right size without a record, is hashed whole on the host.

On the host, each staged directory keeps ``.gpufleet-staged.json``: path -> [size, mtime, sha256]
of the files verified there. A file whose size and mtime still match its record is intact
without being read; anything else is hashed again (or sent again). An interrupted copy leaves
``<file>.gpufleet-part``; the next run appends to it instead of starting over.

Parts: ``facts`` (what a staged directory holds, and the plan), ``wire`` (the stream and its
receiver, templates/gpufleet-receive), ``push`` (the operation from the control node), ``relay``
(hosts pulling from a seed of their site over one-run keys).
"""

from operations.offline.staging.facts import PART, RECORD, StagedFiles, plan
from operations.offline.staging.push import staged
from operations.offline.staging.relay import pull_recorded, pullers, relay_seed, relayed, seed_ready, serve_relays
from operations.offline.staging.wire import content_changed

__all__ = [
    "PART",
    "RECORD",
    "StagedFiles",
    "content_changed",
    "plan",
    "pull_recorded",
    "pullers",
    "relay_seed",
    "relayed",
    "seed_ready",
    "serve_relays",
    "stage",
    "staged",
]


def stage(name, src, dest, files, mode="444"):
    """
    Stage ``files`` into ``dest``: from the control node (``staged``), or from this host's seed
    (``relayed``). Every host passes through ``staged``, a no-op on a pulling host, so pyinfra
    orders the seed's copy before any pull from it. Returns the operation that brings the files.
    """
    seed = relay_seed()
    direct = staged(name=name, src=src, dest=dest, files=files, mode=mode, pulled_from=seed and seed.name)
    if seed is None:
        return direct
    return relayed(name=f"{name} (from {seed.name})", seed=seed, dest=dest, files=files, mode=mode)
