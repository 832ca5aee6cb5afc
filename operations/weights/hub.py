"""
Weight volumes fetched on the host itself from a Hugging Face hub (huggingface.co or a site mirror,
``inference_hf_endpoint``) at a pinned commit, with huggingface_hub's own client: every file checked
against the hub's listing (LFS SHA-256, git blob id), resumable, marked staged only when whole.

The client runs from wheels pinned with their SHA-256 in ``hf_fetch.lock.json`` (for the host's
Python and architecture): the control node downloads them once (pip, cached under
~/.cache/gpufleet/wheels) and stages them; the host unpacks them beside ``gpufleet-hf-fetch``. The
host needs Python 3.10-3.13 and a route to the hub, nothing from PyPI.
"""

import fnmatch
import functools
import hashlib
import json
import os
import posixpath
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from pyinfra import host, logger
from pyinfra.api import FactBase, deploy, operation
from pyinfra.operations import files

from operations import TEMPLATES, TOOLS_DIR
from operations.core.errors import ConfigError
from operations.core.remote import HostFunction, Shell
from operations.offline import staging

LOCK = Path(__file__).resolve().with_name("hf_fetch.lock.json")
CACHE = Path(os.environ.get("GPUFLEET_CACHE", Path.home() / ".cache" / "gpufleet")) / "wheels"
CLIENT_DIR = f"{TOOLS_DIR}/hf"
FETCH = f"{TOOLS_DIR}/gpufleet-hf-fetch"
SOURCE = ".gpufleet-hf.json"
# Scripts run on the host with python3 -c (templates/, read here once).
HUB_VOLUME = (TEMPLATES / "gpufleet-hub-volume.py").read_text()
UNPACK = (TEMPLATES / "gpufleet-unpack-wheels.py").read_text()
COMMIT = re.compile(r"[0-9a-f]{40}")
REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def lock():
    return json.loads(LOCK.read_text())


class HostPython(FactBase):
    """Returns the host's ``python3`` as a wheel target: ``cp311-x86_64``, or None without one."""

    def command(self):
        return (
            'python3 -c \'import sys, platform; print("cp%d%d-%s" % (sys.version_info[0], sys.version_info[1], '
            "platform.machine()))' 2>/dev/null || echo none"
        )

    def process(self, output):
        return None if output[0] == "none" else output[0]


def _target_flags(target):
    python, arch = target.split("-", 1)
    flags = [
        "--only-binary=:all:",
        "--python-version",
        f"{python[2]}.{python[3:]}",
        "--implementation",
        "cp",
        "--abi",
        python,
        "--abi",
        "abi3",
        "--abi",
        "none",
    ]
    for tag in ("manylinux_2_17", "manylinux2014", "manylinux_2_28", "manylinux_2_34"):
        flags += ["--platform", f"{tag}_{arch}"]
    return flags


@functools.cache
def wheelhouse(target, log=print):
    """
    The locked wheels for ``target`` on the control node: (directory, manifest for staging). Downloaded
    once with pip, which checks each against the lock's SHA-256; a cached set is checked again here.
    """
    locked = lock()
    wheels = locked["targets"].get(target)
    if wheels is None:
        raise ConfigError(
            "inference_weight_volumes",
            f"the host's Python is {target}; gpufleet fetches from a hub "
            f"with Python {', '.join(sorted(locked['targets']))}",
        )
    out = CACHE / f"huggingface_hub-{locked['huggingface_hub']}-{target}"

    def intact():
        return all(
            (out / name).is_file() and hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
            for name, digest in wheels.items()
        )

    if not intact():
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", suffix=".txt") as requirements:
            for name, digest in sorted(wheels.items()):
                project, version = name.split("-")[:2]
                requirements.write(f"{project}=={version} --hash=sha256:{digest}\n")
            requirements.flush()
            log(f"pip: downloading huggingface_hub {locked['huggingface_hub']} wheels for {target}")
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "-q",
                    "--no-deps",
                    "--require-hashes",
                    *_target_flags(target),
                    "-d",
                    str(out),
                    "-r",
                    requirements.name,
                ],
                check=True,
            )
        if not intact():
            raise ConfigError("inference_weight_volumes", f"{out}: the downloaded wheels differ from {LOCK.name}")
    return str(out), {name: {"size": (out / name).stat().st_size, "sha256": digest} for name, digest in wheels.items()}


class UnpackedWheels(FactBase):
    """Returns the digest of the wheel set last unpacked into a directory (its marker file), or None."""

    def command(self, site):
        return f"cat {shlex.quote(site)}/.gpufleet-wheels 2>/dev/null || true"

    def process(self, output):
        return output[0].strip() if output else None


@operation()
def unpacked(wheels_dir: str, site: str, digest: str):
    """
    Unpack the wheels in ``wheels_dir`` into ``site`` (a fresh directory, swapped in whole) unless
    it already holds the set ``digest`` names.
    """
    if host.get_fact(UnpackedWheels, site=site) == digest:
        host.noop(f"{site} holds wheel set {digest[:12]}")
        return
    new = shlex.quote(f"{site}.gpufleet-new")
    yield (
        f"rm -rf {new} && mkdir -p {new} && python3 -c {shlex.quote(UNPACK)} {shlex.quote(wheels_dir)} {new} && "
        f"echo {digest} > {new}/.gpufleet-wheels && rm -rf {shlex.quote(site)} && mv {new} {shlex.quote(site)}"
    )


@deploy("Install the Hugging Face Hub client")
def install_client():
    """Stage the locked huggingface_hub wheels for the host's Python, unpack them, install the fetcher."""
    target = host.get_fact(HostPython)
    if target is None:
        raise ConfigError(
            "inference_weight_volumes", "fetching from a hub needs python3 on the host; it has none", host=host.name
        )
    src, manifest = wheelhouse(target)
    wheels_dir = f"{CLIENT_DIR}/wheels-{target}"
    staging.stage(
        name=f"Stage huggingface_hub {lock()['huggingface_hub']} wheels ({target})",
        src=src,
        dest=wheels_dir,
        files=manifest,
        mode="444",
    )
    digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    unpacked(
        name="Unpack huggingface_hub for gpufleet-hf-fetch",
        wheels_dir=wheels_dir,
        site=f"{CLIENT_DIR}/site",
        digest=digest,
    )
    files.put(
        name="Install gpufleet-hf-fetch",
        src=str(TEMPLATES / "gpufleet-hf-fetch"),
        dest=FETCH,
        mode="755",
        user="root",
        group="root",
    )


class HubVolume(FactBase):
    """
    Returns what a fetched volume holds: its source (repo, commit), and whether every file its record
    lists is there at the recorded size and mtime (the fetcher hashed each when it wrote the record):

    .. code:: python

        {"source": {"repo": "org/model", "commit": "<40 hex>"}, "intact": True, "files": 7}
    """

    def command(self, path):
        return f"python3 -c {shlex.quote(HUB_VOLUME)} {shlex.quote(path)} {shlex.quote(SOURCE)}"

    def process(self, output):
        return json.loads(output[-1])


class HubRevision(FactBase):
    """Returns the commit a branch or tag of a hub repository names now (asked on the host), or None."""

    def command(self, repo, revision, env, token_file):
        return (
            f"{env} {FETCH} resolve {shlex.quote(repo)} {shlex.quote(revision)}"
            f"{f' --token-file {shlex.quote(token_file)}' if token_file else ''} 2>/dev/null || echo none"
        )

    def process(self, output):
        return None if output[-1] == "none" else output[-1].strip()


def fetch_env(endpoint, state_dir):
    """The environment gpufleet-hf-fetch runs in: the unpacked client, the hub, a private HF_HOME."""
    env = {
        "PYTHONPATH": f"{CLIENT_DIR}/site",
        "HF_HOME": posixpath.join(state_dir, "hf-home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    if endpoint:
        env["HF_ENDPOINT"] = endpoint
    return " ".join(f"{key}={shlex.quote(value)}" for key, value in sorted(env.items()))


@operation()
def fetched(
    repo: str,
    revision: str,
    dest: str,
    endpoint: str | None = None,
    token_file: str | None = None,
    state_dir: str = "/var/lib/gpufleet",
    margin: int = 0,
    allow_patterns: list[str] | None = None,
    ignore_patterns: list[str] | None = None,
):
    """
    Make ``dest`` hold ``repo`` at ``revision`` from a hub, every file checked (``gpufleet-hf-fetch``).

    + repo: ``org/name``
    + revision: a 40-hex commit (pinned), or a branch or tag when the deploy follows it: the commit it
      names is asked on each run, and a move is fetched
    + dest: the volume directory on the host
    + endpoint: the hub (``HF_ENDPOINT``; None: huggingface.co)
    + token_file: a root-only file on the host holding the token (read by the fetcher, never in argv)
    + state_dir: where the client keeps its own state (``HF_HOME``)
    + margin: bytes to keep free beyond what is fetched (the fetcher refuses before downloading)
    + allow_patterns, ignore_patterns: which files of the repository the volume holds, as
      huggingface_hub's ``snapshot_download`` takes them (recorded in the volume's source: a change
      fetches again, and what the patterns leave out is removed)

    A volume whose source matches and whose files still match the record is left alone without
    touching the network; anything else runs the fetcher, which hashes what is there and downloads
    only what is missing or damaged.
    """
    env = fetch_env(endpoint, state_dir)
    current = host.get_fact(HubVolume, path=dest)
    commit = (
        revision
        if COMMIT.fullmatch(revision)
        else host.get_fact(HubRevision, repo=repo, revision=revision, env=env, token_file=token_file)
    )
    source = current.get("source") or {}
    wanted = source_record(repo, commit, allow_patterns, ignore_patterns)
    if commit and source == wanted and current["intact"]:
        host.noop(f"{dest}: {repo}@{commit[:12]}, {current['files']} files intact")
        return
    why = (
        "not fetched yet"
        if not source
        else "files changed since they were checked"
        if source == wanted
        else "other file patterns there"
        if source.get("commit") == commit
        else f"{source.get('repo')}@{(source.get('commit') or '?')[:12]} there, {repo}@{(commit or revision)[:12]} wanted"
    )
    host.log(f"{dest}: {why}: fetching {repo}@{revision} from {endpoint or 'huggingface.co'}")
    yield (
        f"{env} {FETCH} fetch {shlex.quote(repo)} {shlex.quote(commit or revision)} {shlex.quote(dest)}"
        f" --margin {int(margin)}{f' --token-file {shlex.quote(token_file)}' if token_file else ''}"
        f"{pattern_flags(allow_patterns, ignore_patterns)}"
    )


def site_source(spec):
    """What makes two hosts' hub volumes one fetch for their site: the source record of ``spec`` (an
    ``inference_weight_volumes`` entry) at its commit (pure); None for a branch or tag, which each
    host resolves itself."""
    if not COMMIT.fullmatch(str(spec.get("revision", ""))):
        return None
    return source_record(
        spec["hf"], spec["revision"], patterns(spec.get("allow_patterns")), patterns(spec.get("ignore_patterns"))
    )


def _pull_volume(state, host, shell, seed, dest, source, keys_dir, margin):  # pyinfra passes state and host
    """On a host of the site: the seed's copy of the volume (its source checked, its record read now,
    once it fetched), only the files missing or different here; files the record does not list are
    removed; the source recorded last, so a volume being changed is never marked."""
    at = shlex.quote(posixpath.join(dest, SOURCE))
    held = json.loads("".join(Shell.of(state, seed).run(f"cat {at} 2>/dev/null || echo '{{}}'")))
    if held != source:
        raise OSError(f"{host.name}: {seed.name} holds {held or 'nothing'} in {dest}, not {source}")
    shell.run(f"rm -f {at}")
    wanted, staged = staging.pull_recorded(state, host, shell, seed, dest, keys_dir, margin, "444")
    extra = sorted(path for path in staged["files"] if path not in wanted and path != SOURCE)
    if extra:
        shell.run(f"cd {shlex.quote(dest)} && rm -f -- {' '.join(shlex.quote(path) for path in extra)}")
    shell.send(f"cat > {at} && chmod 444 {at}", json.dumps(source, sort_keys=True) + "\n")
    logger.info(f"[{host.name}] {dest}: {source['repo']}@{source['commit'][:12]} as {seed.name} fetched it")


@operation(is_idempotent=False)
def from_seed(dest: str, seed: str, source: dict, margin: int = 0):
    """
    Make ``dest`` hold the hub volume ``source`` as the site's seed fetched it: nothing when its
    source and files already match; otherwise the seed's files pulled over the site's relay (only
    those missing or different), what the seed's record does not list removed, the source recorded.
    The host asks the hub nothing and needs no token.

    + dest: the volume directory, the same on the seed
    + seed: the host this one stages from (``gpufleet_stage_via``), in this run, fetching the volume
    + source: the volume's source record (``site_source``)
    + margin: bytes to keep free beyond what is pulled
    """
    current = host.get_fact(HubVolume, path=dest)
    if current.get("source") == source and current["intact"]:
        host.noop(f"{dest}: {source['repo']}@{source['commit'][:12]}, {current['files']} files intact")
        return
    keys_dir = posixpath.join(host.data.gpufleet_state_dir, "relay")
    yield HostFunction(_pull_volume, [host.inventory.get_host(seed), dest, source, keys_dir, margin], {})


def source_record(repo, commit, allow_patterns=None, ignore_patterns=None):
    """What a volume fetched from ``repo`` at ``commit`` with these patterns records as its source (as
    gpufleet-hf-fetch writes it) (pure)."""
    record = {"repo": repo, "commit": commit}
    if allow_patterns:
        record["allow_patterns"] = list(allow_patterns)
    if ignore_patterns:
        record["ignore_patterns"] = list(ignore_patterns)
    return record


def pattern_flags(allow_patterns, ignore_patterns):
    """The fetcher's --allow and --ignore arguments (pure)."""
    return "".join(f" --allow {shlex.quote(p)}" for p in allow_patterns or []) + "".join(
        f" --ignore {shlex.quote(p)}" for p in ignore_patterns or []
    )


def patterns(value):
    """A volume's allow_patterns or ignore_patterns as a list (huggingface_hub also takes one string)."""
    return [value] if isinstance(value, str) else list(value or [])


def selected(path, allow_patterns=None, ignore_patterns=None):
    """Whether a file of the repository passes the patterns, as huggingface_hub's filter_repo_objects
    decides (utils/_paths.py: a pattern ending in "/" gets "*"; fnmatchcase) (pure)."""
    allow = [p + "*" if p.endswith("/") else p for p in patterns(allow_patterns)]
    ignore = [p + "*" if p.endswith("/") else p for p in patterns(ignore_patterns)]
    if allow and not any(fnmatch.fnmatchcase(path, p) for p in allow):
        return False
    return not any(fnmatch.fnmatchcase(path, p) for p in ignore)
