"""
Offline bundles: apt packages with their dependency closure, container images and model weights,
described by one manifest (every file's path, size and SHA-256).

Build one on a connected machine, carry it, deploy from it::

    python -m operations.offline.bundle build bundle.yaml --out /media/bundle [--sign-key ~/.ssh/id_ed25519]
    python -m operations.offline.bundle verify /media/bundle [--signers allowed_signers]

Three parts: ``manifest`` reads and verifies a bundle (what deploys use, re-exported here),
``builder`` makes one, ``__main__`` is the command line.
"""

from operations.offline.bundle.manifest import (
    CHUNK,
    MANIFEST,
    SIGNATURE,
    cached_sha256,
    check_signature,
    load,
    part,
    read_manifest,
    sha256_file,
    verify,
    vouched_sha256,
)

__all__ = [
    "CHUNK",
    "MANIFEST",
    "SIGNATURE",
    "cached_sha256",
    "check_signature",
    "load",
    "part",
    "read_manifest",
    "sha256_file",
    "verify",
    "vouched_sha256",
]
