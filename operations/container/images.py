"""Container images on a host: loaded from ``docker save`` archives (an offline bundle) or pulled
from their registry (a connected site), each only when Docker lacks it; registry logins."""

import base64
import hashlib
import json
import posixpath
import re
import shlex

from pyinfra import host, logger
from pyinfra.api import FactBase, operation

from operations import TEMPLATES, TOOLS_DIR
from operations.core.remote import HostFunction

# The digest of root's Docker login for a registry, read on the host (templates/, sent inline).
REGISTRY_AUTH = (TEMPLATES / "gpufleet-registry-auth.py").read_text()
# Go templates for `docker image inspect --format`, shell-quoted.
ID_AND_DIGESTS = "'{{.Id}} {{json .RepoDigests}}'"
DIGESTS = "'{{json .RepoDigests}}'"


class DockerImageIds(FactBase):
    """
    Returns the image IDs Docker holds, each with its tags.

    .. code:: python

        {"sha256:4f3c...": ["gpufleet-lab/llama-server:0.3.36-1a2b3c4d5e6f"]}
    """

    requires_command = "docker"

    def command(self):
        return "docker image ls --no-trunc --format '{{.ID}} {{.Repository}}:{{.Tag}}'"

    def process(self, output):
        images = {}
        for line in output:
            image_id, _, name = line.partition(" ")
            images.setdefault(image_id, []).append(name)
        return images


@operation()
def loaded(image: str, image_id: str, archive: str):
    """
    Load ``image`` from ``archive`` on the host unless Docker already holds ``image_id`` under that name.

    + image: the pinned name, e.g. ``vllm/vllm-openai:v0.6.3``
    + image_id: its ``sha256:`` ID (from the bundle's manifest)
    + archive: path on the host of the ``docker save`` archive
    """
    images = host.get_fact(DockerImageIds) or {}
    if image in images.get(image_id, []):
        host.noop(f"{image} already loaded ({image_id[:19]})")
        return
    yield f"docker load -q -i {shlex.quote(archive)}"


class LocalImage(FactBase):
    """
    Returns what Docker holds under an image reference, or None:

    .. code:: python

        {"id": "sha256:0c01...", "repo_digests": ["10.0.0.5:5000/team/llama-server@sha256:ffd7..."]}
    """

    requires_command = "docker"

    def command(self, image):
        return f"docker image inspect --format {ID_AND_DIGESTS} {shlex.quote(image)} 2>/dev/null || true"

    def process(self, output):
        if not output or not output[0].strip():
            return None  # `docker image inspect --format` prints an empty line for an absent image
        image_id, _, digests = output[0].partition(" ")
        return {"id": image_id, "repo_digests": json.loads(digests or "[]") or []}


class RegistryDigest(FactBase):
    """
    Returns the digest the image's registry serves for its tag now (``gpufleet-registry-digest``),
    or why it could not be read:

    .. code:: python

        {"digest": "sha256:ffd7..."}
        {"error": "HTTP Error 401: Unauthorized"}
    """

    def command(self, image):
        return f"{TOOLS_DIR}/gpufleet-registry-digest {shlex.quote(image)} 2>&1 || echo __failed__"

    def process(self, output):
        if output[-1] == "__failed__":
            return {"error": " ".join(output[:-1]).split(": ", 2)[-1] or "failed"}
        return {"digest": output[-1].strip()}


DOCKER_HUB_NAMES = ("docker.io", "index.docker.io", "registry-1.docker.io")


def repository(image):
    """
    The repository part of a reference as Docker writes it in RepoDigests: ``10.0.0.5:5000/team/x:v1``
    -> ``10.0.0.5:5000/team/x``; Docker Hub's in its short form: ``docker.io/library/nginx:1.27`` ->
    ``nginx``, ``docker.io/vllm/vllm-openai:v0.6.3`` -> ``vllm/vllm-openai``.
    """
    name = image.split("@", 1)[0]
    name = name.rsplit(":", 1)[0] if ":" in name.rsplit("/", 1)[-1] else name
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):  # names a registry
        if first not in DOCKER_HUB_NAMES:
            return name
        name = rest
    return name.removeprefix("library/") if name.count("/") == 1 else name


def has_digest(local, image, digest):
    """True when Docker holds ``image``'s repository at ``digest`` (its RepoDigests say so)."""
    return f"{repository(image)}@{digest}" in (local or {}).get("repo_digests", [])


def registry_of(image):
    """The registry a reference names, Docker Hub's as ``docker.io`` (pure)."""
    first, _, rest = image.partition("/")
    return first if rest and ("." in first or ":" in first or first == "localhost") else "docker.io"


def pull_command(image):
    """``docker pull`` of ``image``; a registry refusing it for too many pulls (HTTP 429: Docker Hub
    allows 10 anonymous pulls an hour per address) said plainly, with what to do, before Docker's
    own words."""
    quoted = shlex.quote(image)
    advice = shlex.quote(
        f"gpufleet: {registry_of(image)} refused the pull of {image}: too many pulls from this address "
        "(HTTP 429, its rate limit). Let one host pull for the site (gpufleet_stage_via), log in "
        "(docker_registry_logins) or name a mirror (docker_registry_mirrors)"
    )
    return (
        f"out=$(docker pull -q {quoted} 2>&1) || {{ case \"$out\" in *toomanyrequests*|*'429 Too Many Requests'*) "
        f'echo {advice} >&2;; esac; echo "$out" >&2; exit 1; }}'
    )


def record_path(state_dir, image):
    return posixpath.join(state_dir, "images", re.sub(r"[^A-Za-z0-9_.-]", "_", image) + ".json")


@operation()
def pulled(image: str, follow_tag: bool = False, state_dir: str = "/var/lib/gpufleet"):
    """
    Pull ``image`` from its registry when Docker lacks it; record what was pulled on the host.

    + image: pinned by digest (``repo@sha256:...``: pulled once, never checked again) or by tag
    + follow_tag: when the registry's digest for the tag moved since it was pulled, pull it again
      (otherwise the move is reported and the host keeps what it has)
    + state_dir: the record goes to ``<state_dir>/images/<image>.json`` (``docker image inspect``)

    A tag is checked against its registry on every run (one HEAD request); pin by digest for runs
    that touch no registry.
    """
    local = host.get_fact(LocalImage, image=image)
    record = shlex.quote(record_path(state_dir, image))
    pull = (
        f"{pull_command(image)} && mkdir -p {shlex.quote(posixpath.dirname(record_path(state_dir, image)))}"
        f" && docker image inspect --format {DIGESTS} {shlex.quote(image)} > {record}"
    )
    if not local:
        yield pull
        return
    if "@" in image:
        host.noop(f"{image} present ({local['id'][:19]})")
        return
    remote = host.get_fact(RegistryDigest, image=image)
    if "error" in remote:
        logger.warning(
            f"[{host.name}] {image}: could not ask its registry for the tag's digest ({remote['error']}); "
            f"keeping the image this host has ({local['id'][:19]})"
        )
        host.noop(f"{image} present; registry not checked")
        return
    if has_digest(local, image, remote["digest"]):
        host.noop(f"{image} at {remote['digest'][:19]}, as its registry serves it")
        return
    held = ", ".join(local["repo_digests"]) or local["id"]
    if not follow_tag:
        logger.warning(
            f"[{host.name}] {image}: its registry now serves {remote['digest']} for this tag; this host "
            f"keeps {held}. Set inference_image_follow_tag = True to follow the tag, or pin by digest"
        )
        host.noop(f"{image}: tag moved in the registry; not followed")
        return
    logger.info(f"[{host.name}] {image}: following the tag from {held} to {remote['digest']}")
    yield pull


class RegistryLogin(FactBase):
    """Returns the SHA-256 of the ``auth`` value Docker keeps for a registry (never the value), or None."""

    def command(self, registry):
        return f"python3 -c {shlex.quote(REGISTRY_AUTH)} {shlex.quote(registry)}"

    def process(self, output):
        return None if output[0] == "none" else output[0]


def _login(state, host, shell, registry, username, password):
    """The password goes to ``docker login --password-stdin`` on the channel's stdin, never in argv."""
    shell.send(
        f"docker login --username {shlex.quote(username)} --password-stdin {shlex.quote(registry)} >/dev/null", password
    )


@operation()
def logged_in(registry: str, username: str, password: str):
    """
    Keep Docker logged in to ``registry`` as ``username`` (root's /root/.docker/config.json, 0600).

    + registry: ``host[:port]`` as image references name it
    + username, password: the credentials (the password reaches the host on stdin only; --diff and
      the logs never show it)
    """
    wanted = hashlib.sha256(base64.b64encode(f"{username}:{password}".encode())).hexdigest()
    if host.get_fact(RegistryLogin, registry=registry) == wanted:
        host.noop(f"Docker logged in to {registry} as {username}")
        return
    host.log(f"Will log Docker in to {registry} as {username} (password not shown)")
    yield HostFunction(_login, [registry, username, password], {})
