"""
Building a bundle on a connected machine: the apt packages with their dependency closure, the
container images (docker save), the weight volumes (directories or a Hugging Face cache), then
the manifest (every file's path, size and SHA-256) and, with a key, its signature.
"""

import email.utils
import glob
import gzip
import hashlib
import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from operations.core.apt_pin import pin_file
from operations.core.checks import is_pinned_image
from operations.core.errors import ConfigError
from operations.offline.bundle.manifest import (
    FORMAT,
    MANIFEST,
    NAMESPACE,
    SIGNATURE,
    VERIFIED,
    cached_sha256,
    check_signature,
    load,
    read_record,
)

# What gpufleet itself installs on hosts besides the spec's packages: every apt bundle carries them
# (nftables for the inference firewall, HAProxy for the services' TLS fronts and the gateway, python3 for
# gpufleet's checks, the node exporter and Prometheus for the site's monitoring).
HOST_PACKAGES = ["nftables", "haproxy", "python3", "prometheus-node-exporter", "prometheus"]


def sign(bundle, key):
    """Sign the bundle's manifest with the SSH private key ``key`` (writes manifest.json.sig)."""
    (Path(bundle) / SIGNATURE).unlink(missing_ok=True)
    subprocess.run(
        ["ssh-keygen", "-q", "-Y", "sign", "-f", str(key), "-n", NAMESPACE, str(Path(bundle) / MANIFEST)],
        check=True,
        capture_output=True,
    )


def _apt_closure(spec, out, log):
    """Download ``spec['packages']`` and every dependency into ``out`` with a private apt state."""
    target = spec["target"]
    work = Path(tempfile.mkdtemp(prefix="gpufleet-bundle-apt-"))
    try:
        for sub in ("lists/partial", "archives/partial", "etc/preferences.d", "etc/apt.conf.d"):
            (work / sub).mkdir(parents=True)
        status = work / "status"
        baseline = spec.get("baseline_status")
        status.write_text(Path(baseline).read_text() if baseline else "")
        components = " ".join(target.get("components", ["main"]))
        release = target["release"]
        sources = [
            f"deb {target['mirror']} {release} {components}",
            f"deb {target['mirror']} {release}-updates {components}",
        ]
        if target.get("security_mirror"):
            sources.append(f"deb {target['security_mirror']} {release}-security {components}")
        local = work / "local"
        local.mkdir()
        for pattern in spec.get("debs", []):
            for deb in glob.glob(pattern):
                shutil.copy2(deb, local)
        if any(local.iterdir()):
            _index(local)
            sources.append(f"deb [trusted=yes] file:{local} ./")
        (work / "etc/sources.list").write_text("\n".join(sources) + "\n")
        for index, pin in enumerate(spec.get("pins", [])):
            (work / f"etc/preferences.d/{index:02d}-pin").write_text(pin_file(pin["packages"], pin["version"]))
        options = [
            "-o",
            f"APT::Architecture={target.get('arch', 'amd64')}",
            "-o",
            "APT::Architectures::=" + target.get("arch", "amd64"),
            "-o",
            f"Dir::State::Lists={work}/lists",
            "-o",
            f"Dir::State::status={status}",
            "-o",
            f"Dir::Cache={work}",
            "-o",
            f"Dir::Cache::archives={out}",
            "-o",
            f"Dir::Etc::SourceList={work}/etc/sources.list",
            "-o",
            "Dir::Etc::SourceParts=-",
            "-o",
            f"Dir::Etc::Preferences={work}/etc/preferences",
            "-o",
            f"Dir::Etc::PreferencesParts={work}/etc/preferences.d",
            "-o",
            "Debug::NoLocking=1",
            "-o",
            "APT::Install-Recommends=0",
            "-o",
            "APT::Sandbox::User=root",
        ]
        out.mkdir(parents=True, exist_ok=True)
        (out / "partial").mkdir(exist_ok=True)
        log(f"apt: resolving {len(spec['packages'])} packages for {target['distro']} {release}")
        subprocess.run(["apt-get", *options, "-q", "update"], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(
            ["apt-get", *options, "-q", "-y", "--download-only", "install", *spec["packages"]],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        for deb in local.glob("*.deb"):
            shutil.copy2(deb, out)
        shutil.rmtree(out / "partial", ignore_errors=True)
        (out / "lock").unlink(missing_ok=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _index(out)


def _index(repo):
    """Make ``repo`` a flat apt repository: Packages, Packages.gz and a Release with their hashes."""
    packages = subprocess.run(
        ["dpkg-scanpackages", "--multiversion", "."], cwd=repo, check=True, capture_output=True
    ).stdout
    (repo / "Packages").write_bytes(packages)
    with gzip.GzipFile(repo / "Packages.gz", "wb", mtime=0) as handle:
        handle.write(packages)
    newest = max((deb.stat().st_mtime for deb in repo.glob("*.deb")), default=0)
    lines = [
        "Origin: gpufleet",
        "Label: gpufleet bundle",
        f"Date: {email.utils.formatdate(newest, usegmt=True)}",
        "SHA256:",
    ]
    for name in ("Packages", "Packages.gz"):
        data = (repo / name).read_bytes()
        lines.append(f" {hashlib.sha256(data).hexdigest()} {len(data)} {name}")
    (repo / "Release").write_text("\n".join(lines) + "\n")


def archive_name(image):
    """The file a bundle keeps ``image``'s ``docker save`` archive in, under images/."""
    return image.replace("/", "_").replace(":", "_") + ".tar"


def _images(names, out, log):
    out.mkdir(parents=True, exist_ok=True)
    images = []
    for name in names:
        if not is_pinned_image(name):
            raise ConfigError("images", f"{name}: pin it by tag or digest, never latest")
        image_id = subprocess.run(
            ["docker", "image", "inspect", "--format", "{{.Id}}", name], capture_output=True, text=True, check=True
        ).stdout.strip()
        archive = out / archive_name(name)
        stamp = archive.with_suffix(".id")
        if not (archive.exists() and stamp.exists() and stamp.read_text() == image_id):
            log(f"images: docker save {name}")
            subprocess.run(["docker", "save", "-o", str(archive.with_suffix(".partial")), name], check=True)
            archive.with_suffix(".partial").rename(archive)
            stamp.write_text(image_id)
        images.append({"name": name, "id": image_id, "file": f"images/{archive.name}"})
    return images


def hf_snapshot(cache, repo, revision="main", field="weights"):
    """
    The snapshot directory of model ``repo`` at ``revision`` (a branch, tag or commit) in a Hugging
    Face hub cache (``models--ORG--NAME/refs/REV`` names the commit; ``snapshots/COMMIT/`` holds
    links into ``blobs/``). A link whose blob is missing (an interrupted download) is refused.
    """
    root = Path(cache).expanduser() / ("models--" + repo.replace("/", "--"))
    ref = root / "refs" / revision
    if re.fullmatch(r"[0-9a-f]{40}", revision):
        commit = revision
    elif ref.is_file():
        commit = ref.read_text().strip()
    else:
        raise ConfigError(field, f"{repo}@{revision}: not in the Hugging Face cache {cache} (no {ref})")
    snapshot = root / "snapshots" / commit
    if not snapshot.is_dir():
        raise ConfigError(field, f"{repo}@{revision}: no snapshot {snapshot}")
    for path in sorted(snapshot.rglob("*")):
        if path.is_symlink() and not path.exists():
            raise ConfigError(
                field,
                f"{repo}@{revision}: {path.relative_to(snapshot)}: its blob is missing "
                "(an interrupted download): fetch it again",
            )
    return snapshot


def _weights_source(base, volume, source):
    """A volume's files: a directory (``from``) or a Hugging Face cache snapshot (``hf_cache``, ``repo``,
    ``revision``); relative paths are taken from the spec's directory."""
    if "hf_cache" in source:
        return hf_snapshot(
            base / Path(source["hf_cache"]).expanduser(),
            source["repo"],
            str(source.get("revision", "main")),
            field=f"weights.{volume}",
        )
    return base / source["from"]


def _weights(volumes, out, log):
    for volume, source in volumes.items():
        source = Path(source["from"])
        dest = out / volume
        for path in sorted(p for p in source.rglob("*") if p.is_file()):
            target = dest / path.relative_to(source)
            stat = path.stat()
            if (
                target.exists()
                and target.stat().st_size == stat.st_size
                and target.stat().st_mtime_ns == stat.st_mtime_ns
            ):
                continue
            log(f"weights: {volume}/{path.relative_to(source)}")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)


def build(spec_path, out, log=print, sign_key=None):
    """Build (or bring up to date) the bundle described by the YAML file ``spec_path`` in ``out``;
    sign its manifest with ``sign_key`` (an SSH private key) when given."""
    import yaml

    started = time.time()
    spec = yaml.safe_load(Path(spec_path).read_text())
    base = Path(spec_path).resolve().parent
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"format": FORMAT, "target": {}, "files": {}, "images": [], "weights": {}, "apt": {}}
    if spec.get("apt"):
        apt = dict(
            spec["apt"],
            debs=[str(base / pattern) for pattern in spec["apt"].get("debs", [])],
            packages=[
                *spec["apt"]["packages"],
                *(package for package in HOST_PACKAGES if package not in spec["apt"]["packages"]),
            ],
        )
        _apt_closure(apt, out / "apt", log)
        manifest["target"] = apt["target"]
        manifest["apt"] = {"dir": "apt", "packages": apt["packages"]}
    if spec.get("images"):
        manifest["images"] = _images(spec["images"], out / "images", log)
    if spec.get("weights"):
        volumes = {name: {"from": str(_weights_source(base, name, source))} for name, source in spec["weights"].items()}
        _weights(volumes, out / "weights", log)
        manifest["weights"] = {name: f"weights/{name}" for name in volumes}
    record = read_record(out)
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        relative = str(path.relative_to(out))
        if relative in (MANIFEST, VERIFIED, SIGNATURE) or path.suffix in (".id", ".partial"):
            continue
        stat = path.stat()
        digest = cached_sha256(path, stat, record.get(relative))
        manifest["files"][relative] = {"size": stat.st_size, "sha256": digest}
        record[relative] = [stat.st_size, stat.st_mtime_ns, digest]
    (out / VERIFIED).write_text(json.dumps({k: v for k, v in record.items() if k in manifest["files"]}))
    text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    if not (out / MANIFEST).exists() or (out / MANIFEST).read_text() != text:
        (out / MANIFEST).write_text(text)
        (out / SIGNATURE).unlink(missing_ok=True)  # a signature of the old manifest would only mislead
    if sign_key:
        sign(out, sign_key)
    load.cache_clear()
    check_signature.cache_clear()
    total = sum(entry["size"] for entry in manifest["files"].values())
    log(f"bundle {out}: {len(manifest['files'])} files, {total / 1e6:.1f} MB, in {time.time() - started:.1f} s")
    return manifest
