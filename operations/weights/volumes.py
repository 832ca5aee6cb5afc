"""
Weight volumes: one directory per volume under ``inference_weights_root``, root-owned and read-only,
mounted ``:ro`` by the services, with the record the services' start-time check reads
(templates/gpufleet-verify-weights). A volume comes from the offline bundle, from a directory on the
control node (staged: resumable, verified, skipped when intact) or from a Hugging Face hub (fetched
on the host at a pinned commit). A host gets only the volumes its services use.
"""

import functools
import hashlib
import json
import os
import posixpath
import stat
from pathlib import Path

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import files

from operations.core import base, checks, settings
from operations.core.errors import ConfigError
from operations.offline import bundle, staging
from operations.services import secret_files
from operations.weights import hub as hf_hub

HASH_CACHE = Path(os.environ.get("GPUFLEET_CACHE", Path.home() / ".cache" / "gpufleet")) / "hashes"


def volume_of(model):
    """The volume a service's ``model`` path lives in: its first component."""
    return model.split("/")[0]


def path_in_volume(model):
    """The rest of a service's ``model`` path: the file or directory inside its volume ('' for all of it)."""
    return model[len(volume_of(model)) + 1 :].rstrip("/")


def _refuse(field, message, host_name):
    raise ConfigError(f"inference_weight_volumes[{field!r}]", message, host=host_name)


def root_only(path):
    """True when no one but the file's owner may read it (a secret on the control node)."""
    return not os.stat(path).st_mode & (stat.S_IRWXG | stat.S_IRWXO)


# A hub volume's keys: the repository, its commit, a token, and which of its files (snapshot_download's
# allow_patterns / ignore_patterns: Meta's Llama repositories carry original/*.pth beside the
# safetensors, twice the bytes: "ignore_patterns": ["original/"]).
HUB_KEYS = {"hf", "revision", "token_file", "allow_patterns", "ignore_patterns"}


def check_volume(name, spec, data, host_name):
    if not isinstance(spec, dict) or sorted(set(spec) & {"from", "hf"}) not in (["from"], ["hf"]):
        _refuse(name, "a dict with 'from' (a directory on the control node) or 'hf' (a hub repository)", host_name)
    if "from" in spec:
        unknown = set(spec) - {"from"}
        if unknown:
            _refuse(name, f"unknown key {sorted(unknown)[0]!r} for a directory volume (known: from)", host_name)
        if not Path(spec["from"]).expanduser().is_dir():
            _refuse(name, f"{spec['from']}: no such directory on the control node", host_name)
        return
    unknown = set(spec) - HUB_KEYS
    if unknown:
        _refuse(
            name,
            f"unknown key {sorted(unknown)[0]!r} for a hub volume (known: {', '.join(sorted(HUB_KEYS))})",
            host_name,
        )
    for key in ("allow_patterns", "ignore_patterns"):
        value = spec.get(key)
        if value is not None and not (
            (isinstance(value, str) and value)
            or (isinstance(value, list) and value and all(isinstance(p, str) and p for p in value))
        ):
            _refuse(name, f"{key}: {value!r}: a glob or a list of globs, as snapshot_download takes them", host_name)
    if not isinstance(spec["hf"], str) or not hf_hub.REPO.fullmatch(spec["hf"]):
        _refuse(name, f"hf: {spec['hf']!r} is not a repository id such as 'org/name'", host_name)
    revision = spec.get("revision")
    if not isinstance(revision, str) or not revision:
        _refuse(name, "revision: required: the 40-hex commit to fetch", host_name)
    if not hf_hub.COMMIT.fullmatch(revision) and not data.get("inference_weights_follow_branch"):
        _refuse(
            name,
            f"revision: {revision!r} is a branch or tag, which moves; pin the commit it names, or set "
            "inference_weights_follow_branch = True to follow it",
            host_name,
        )
    token = spec.get("token_file")
    if token is not None:
        if not Path(token).is_file():
            _refuse(name, f"token_file: {token}: no such file on the control node", host_name)
        if not root_only(token):
            _refuse(name, f"token_file: {token}: readable by others than its owner; chmod 600 {token}", host_name)
    if data.get("gpufleet_offline"):
        _refuse(name, "a hub volume on an offline host, which reaches no hub: put it in the bundle", host_name)


def check_volumes(data, host_name):
    volumes = data.get("inference_weight_volumes") or {}
    if not isinstance(volumes, dict):
        raise ConfigError("inference_weight_volumes", "a dict of volume name -> source", host=host_name)
    bundled = bundle.load(data["gpufleet_bundle"]).get("weights", {}) if data.get("gpufleet_bundle") else {}
    for name, spec in volumes.items():
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise ConfigError(
                "inference_weight_volumes", f"{name!r}: a volume name is one path component", host=host_name
            )
        if name in bundled:
            _refuse(name, f"the bundle {data['gpufleet_bundle']} has a volume {name!r} too: name one source", host_name)
        check_volume(name, spec, data, host_name)


def sources(data):
    """Every volume a host could have: name -> ("bundle", prefix) | ("dir", path) | ("hf", spec)."""
    found = {}
    if data.get("gpufleet_bundle"):
        found.update(
            {
                name: ("bundle", prefix)
                for name, prefix in bundle.load(data.get("gpufleet_bundle")).get("weights", {}).items()
            }
        )
    for name, spec in (data.get("inference_weight_volumes") or {}).items():
        found[name] = ("dir", str(Path(spec["from"]).expanduser())) if "from" in spec else ("hf", spec)
    return found


def check_model(index, model, data, host_name):
    """Refuse a service whose model is in no volume, or missing from the one it names (hub volumes are
    listed by the hub itself: checked on the host when fetched)."""
    volume, inside = volume_of(model), path_in_volume(model)
    known = sources(data)
    field = f"inference_services[{index}].model"
    if volume not in known:
        raise ConfigError(
            field,
            f"{model}: volume {volume!r} is in no source: neither the bundle's weight volumes "
            f"nor inference_weight_volumes ({', '.join(sorted(known)) or 'none'})",
            host=host_name,
        )
    if inside and model_files(model, data) == {}:
        raise ConfigError(field, f"{model}: no {inside!r} in volume {volume!r} ({known[volume][1]})", host=host_name)
    kind, spec = known[volume]
    if kind == "hf" and inside and "." in posixpath.basename(inside):  # a file (model.gguf), not a directory
        if not hf_hub.selected(inside, spec.get("allow_patterns"), spec.get("ignore_patterns")):
            raise ConfigError(
                field,
                f"{model}: volume {volume!r}'s allow_patterns / ignore_patterns leave {inside!r} out of it",
                host=host_name,
            )


def listed_files(model, data):
    """The files of ``model``'s volume, relative to the volume: path -> {"size", "sha256"} (None for a
    hub volume: only the hub lists it, on the host)."""
    kind, where = sources(data)[volume_of(model)]
    if kind == "bundle":
        return bundle.part(bundle.load(data.get("gpufleet_bundle")), where)
    if kind == "dir":
        return directory_manifest(where)
    return None


def model_files(model, data):
    """The files of ``model`` (a file, or a directory of its volume), as ``listed_files`` gives them."""
    files, inside = listed_files(model, data), path_in_volume(model)
    if files is None or not inside:
        return files
    return {path: entry for path, entry in files.items() if path == inside or path.startswith(inside + "/")}


def model_bytes(model, data):
    """The bytes of ``model`` where the control node can list them, else None."""
    files = model_files(model, data)
    return None if files is None else sum(entry["size"] for entry in files.values())


@functools.cache
def directory_manifest(path):
    """Every file below ``path`` on the control node: relative path -> size and SHA-256. Hashes are
    kept in ~/.cache/gpufleet/hashes and trusted while a file's size and mtime stay the same."""
    root = Path(path)
    cache = HASH_CACHE / (hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:24] + ".json")
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    manifest, fresh = {}, {}
    for full in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = str(full.relative_to(root))
        info = full.stat()
        digest = bundle.cached_sha256(full, info, known.get(relative))
        manifest[relative] = {"size": info.st_size, "sha256": digest}
        fresh[relative] = [info.st_size, info.st_mtime_ns, digest]
    if fresh != known:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(fresh))
    return manifest


@deploy("Stage weight volumes", data_defaults=settings.DEFAULTS)
def stage_volumes(volumes: set[str], weights_root: str | None = None, endpoint: str | None = None):
    """
    Bring the named weight volumes under ``weights_root`` (files 0444, owned by root), each from its
    source: the bundle or a control-node directory (staged), or a hub (fetched on the host).

    + volumes: the volume names this host's services use (only these are sent)
    + weights_root: where volumes live on the host (``inference_weights_root``)
    + endpoint: the hub for ``hf`` volumes (``inference_hf_endpoint``; None: huggingface.co)

    Returns the operation that brings each volume, by name.
    """
    weights_root = weights_root or host.data.inference_weights_root
    endpoint = endpoint or host.data.inference_hf_endpoint
    files.directory(name=f"Ensure {weights_root} exists", path=weights_root, mode="755", user="root", group="root")
    known = sources(host.data)
    seed = staging.relay_seed()
    site = site_volumes(seed or host)  # hub volumes the site's seed fetches for it
    from_seed = set(site) & set(volumes) if seed else set()
    if any(known[name][0] == "hf" for name in set(volumes) - from_seed):
        hf_hub.install_client()
    operations = {}
    for name in sorted(set(volumes) - from_seed):
        kind, where = known[name]
        dest = posixpath.join(weights_root, name)
        if kind == "bundle":
            operations[name] = staging.stage(
                name=f"Stage weight volume {name}",
                src=f"{host.data.gpufleet_bundle}/{where}",
                dest=dest,
                files=bundle.part(bundle.load(host.data.gpufleet_bundle), where),
                mode="444",
            )
        elif kind == "dir":
            operations[name] = staging.stage(
                name=f"Stage weight volume {name} from {where}",
                src=where,
                dest=dest,
                files=directory_manifest(where),
                mode="444",
            )
        else:
            token = None
            if where.get("token_file"):
                token = posixpath.join(base.secrets_dir(), f"hf-{name}.token")
                secret_files.secret_file(
                    name=f"Write the hub token of volume {name} (root only)",
                    dest=token,
                    content=Path(where["token_file"]).read_bytes(),
                )
            operations[name] = hf_hub.fetched(
                name=f"Fetch weight volume {name} ({where['hf']}@{where['revision'][:12]})",
                repo=where["hf"],
                revision=where["revision"],
                dest=dest,
                endpoint=endpoint,
                token_file=token,
                state_dir=host.data.gpufleet_state_dir,
                margin=checks.size_bytes(host.data.gpufleet_free_space_margin),
                allow_patterns=hf_hub.patterns(where.get("allow_patterns")),
                ignore_patterns=hf_hub.patterns(where.get("ignore_patterns")),
            )
    for name in site:
        staging.seed_ready(name=f"Weight volume {name} for the site's hosts", what=name, seed=(seed or host).name)
    for name in sorted(from_seed):
        operations[name] = hf_hub.from_seed(
            name=f"Pull weight volume {name} from {seed.name}",
            dest=posixpath.join(weights_root, name),
            seed=seed.name,
            source=hf_hub.site_source(known[name][1]),
            margin=checks.size_bytes(host.data.gpufleet_free_space_margin),
        )
    return operations


def _hub_volumes(other):
    """name -> (source record, weights root) of the hub volumes at a commit that ``other``'s services use."""
    known = sources(other.data)
    found = {}
    for service in other.data.inference_services:
        name = volume_of(service["model"])
        kind, where = known.get(name, (None, None))
        source = hf_hub.site_source(where) if kind == "hf" else None
        if source:
            found[name] = (source, other.data.inference_weights_root)
    return found


def site_volumes(seed):
    """The hub volumes ``seed`` fetches for its site: those a host pulling from it uses too, with the
    same repository, commit, patterns and weights root (sorted names: the same list on the seed and
    on each of its hosts)."""
    own = _hub_volumes(seed)
    shared = set()
    for other in staging.pullers(seed):
        shared |= {name for name, value in _hub_volumes(other).items() if own.get(name) == value}
    return sorted(shared)
