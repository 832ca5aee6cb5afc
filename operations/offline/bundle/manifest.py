"""
Reading a bundle: its manifest checked, every file verified against it (hashing only what moved
since the last check), its signature checked against allowed signers. This is the part deploys use.

``load()`` is what the deploy calls: a bundle whose manifest is malformed, or whose files are
missing or differ from it, is refused before any host is touched. A signed bundle carries
``manifest.json.sig``, an SSH signature (``ssh-keygen -Y sign``, namespace gpufleet-bundle) of the
manifest, which lists every file's SHA-256: ``check_signature()`` refuses one no allowed signer made.
"""

import functools
import hashlib
import json
import os
import subprocess
from pathlib import Path

from operations.core.checks import is_pinned_image
from operations.core.errors import ConfigError

FORMAT = 1
MANIFEST = "manifest.json"
SIGNATURE = MANIFEST + ".sig"
NAMESPACE = "gpufleet-bundle"
# Control-node record of files already hashed: path -> [size, mtime_ns, sha256]. Lets a bundle
# be re-checked in constant time; a file whose size or mtime moved is hashed again.
VERIFIED = ".gpufleet-verified.json"
CHUNK = 1 << 20


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def read_record(bundle):
    try:
        return json.loads((Path(bundle) / VERIFIED).read_text())
    except (OSError, ValueError):
        return {}


# Source files whose SHA-256 this run established (hashed, or found in a record): resolved path ->
# (the file's identity then, digest). Staging sends such a file without hashing it again while its
# identity holds (staging.wire.frames): each file is read for its hash once per run, not per host.
_VOUCHED = {}


def _identity(stat):
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def cached_sha256(path, stat, known):
    """``path``'s SHA-256: taken from ``known`` ([size, mtime_ns, sha256]) while size and mtime match,
    else hashed. ``stat`` is the file's, taken before; the digest is vouched for (``vouched_sha256``)."""
    if known and known[:2] == [stat.st_size, stat.st_mtime_ns]:
        digest = known[2]
    else:
        digest = sha256_file(path)
    _VOUCHED[os.path.realpath(path)] = (_identity(stat), digest)
    return digest


def vouched_sha256(path, stat):
    """The SHA-256 ``cached_sha256`` gave ``path`` this run, while the file's device, inode, size,
    mtime and ctime (``stat``, e.g. of the open file) are still those it had then; else None."""
    found = _VOUCHED.get(os.path.realpath(path))
    return found[1] if found and found[0] == _identity(stat) else None


def _refuse(bundle, message):
    raise ConfigError("gpufleet_bundle", f"{bundle}: {message}")


def _check_manifest(bundle, manifest):
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        _refuse(bundle, f"{MANIFEST}: not a gpufleet bundle manifest of format {FORMAT}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        _refuse(bundle, f"{MANIFEST}: 'files' must map each path to its size and sha256")
    for path, entry in files.items():
        if Path(path).is_absolute() or ".." in Path(path).parts:
            _refuse(bundle, f"{MANIFEST}: {path}: paths must stay inside the bundle")
        if path != path.strip() or any(ord(char) < 32 for char in path):
            _refuse(bundle, f"{MANIFEST}: {path!r}: paths may not hold control characters or edge spaces")
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("size"), int)
            or not isinstance(entry.get("sha256"), str)
            or len(entry["sha256"]) != 64
        ):
            _refuse(bundle, f"{MANIFEST}: {path}: needs an integer size and a 64-hex sha256")
    for image in manifest.get("images", []):
        if image.get("file") not in files:
            _refuse(bundle, f"{MANIFEST}: image {image.get('name')}: archive {image.get('file')} is not listed")
        if not is_pinned_image(image["name"]):
            _refuse(bundle, f"{MANIFEST}: image {image['name']}: must be pinned by tag or digest, not latest")
    for volume, prefix in manifest.get("weights", {}).items():
        if not any(path.startswith(prefix + "/") for path in files):
            _refuse(bundle, f"{MANIFEST}: weight volume {volume}: no files under {prefix}/")


def verify(bundle, rehash=False):
    """Check every file against the manifest; hash only what changed since the last check (or all)."""
    bundle = Path(bundle)
    record = {} if rehash else read_record(bundle)
    manifest = read_manifest(bundle)
    fresh = {}
    for path, entry in sorted(manifest["files"].items()):
        full = bundle / path
        try:
            stat = full.stat()
        except FileNotFoundError:
            _refuse(bundle, f"{path}: missing (listed in {MANIFEST})")
        if stat.st_size != entry["size"]:
            _refuse(bundle, f"{path}: {stat.st_size} bytes, the manifest says {entry['size']} (truncated or replaced)")
        if cached_sha256(full, stat, record.get(path)) != entry["sha256"]:
            _refuse(bundle, f"{path}: SHA-256 differs from the manifest (corrupt)")
        fresh[path] = [stat.st_size, stat.st_mtime_ns, entry["sha256"]]
    try:
        (bundle / VERIFIED).write_text(json.dumps(fresh))
    except OSError:
        pass  # a read-only medium: verified, but hashed again next time
    return manifest


def read_manifest(bundle):
    bundle = Path(bundle)
    try:
        manifest = json.loads((bundle / MANIFEST).read_text())
    except FileNotFoundError:
        _refuse(bundle, f"no {MANIFEST} (not a bundle, or not built yet)")
    except ValueError as error:
        _refuse(bundle, f"{MANIFEST}: not valid JSON ({error})")
    _check_manifest(bundle, manifest)
    return manifest


@functools.cache
def load(bundle):
    """The verified manifest of the bundle at ``bundle`` (checked once per run, for every host)."""
    if not Path(bundle).is_dir():
        _refuse(bundle, "no such directory")
    return verify(bundle)


@functools.cache
def check_signature(bundle, signers):
    """
    The principal of ``signers`` (an ssh-keygen allowed_signers file) whose key signed the bundle's
    manifest; a missing, foreign or stale signature is refused.
    """
    bundle, signature = Path(bundle), Path(bundle) / SIGNATURE
    if not signature.is_file():
        _refuse(
            bundle,
            f"{SIGNATURE}: missing, and gpufleet_bundle_signers asks for a signed bundle "
            "(python -m operations.offline.bundle build ... --sign-key KEY)",
        )
    found = subprocess.run(
        ["ssh-keygen", "-Y", "find-principals", "-s", str(signature), "-f", str(signers)],
        capture_output=True,
        text=True,
    )
    if found.returncode or not found.stdout.split():
        _refuse(bundle, f"{SIGNATURE}: not made by any key in {signers}")
    principal = found.stdout.split()[0]  # principals sharing the signing key all verify alike
    with open(bundle / MANIFEST, "rb") as manifest:
        checked = subprocess.run(
            ["ssh-keygen", "-Y", "verify", "-f", str(signers), "-I", principal, "-n", NAMESPACE, "-s", str(signature)],
            stdin=manifest,
            capture_output=True,
        )
    if checked.returncode:
        _refuse(
            bundle, f"{SIGNATURE}: made by {principal}'s key, but not over this {MANIFEST} (altered after signing?)"
        )
    return principal


def part(manifest, prefix):
    """The manifest's files under ``prefix``/, keyed by their path below it."""
    return {
        path[len(prefix) + 1 :]: entry for path, entry in manifest["files"].items() if path.startswith(prefix + "/")
    }
