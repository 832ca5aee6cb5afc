"""
Images a connected site fetches once. With ``gpufleet_stage_via``, the seed pulls each image from its
registry (as a host without a seed does) and keeps a ``docker save`` archive of it in SITE_IMAGES,
named by the image and its ID; each host naming that seed pulls the archive over the site's relay
(a one-run key, resumable, SHA-256 verified: ``operations.offline.staging.relay``), loads it, checks
the loaded ID is the seed's and removes its copy. A registry sees one pull per site, not one per host
(Docker Hub allows 10 anonymous pulls an hour per address: docker/docs#22134).

A digest reference (``repo@sha256:...``) cannot be relayed so: ``docker load`` restores tags only, and
a unit naming the digest would find nothing. Hosts pull those themselves (said in the run).
"""

import posixpath
import re
import shlex

from pyinfra import host, logger
from pyinfra.api import operation

from operations.container.images import LocalImage
from operations.core import checks
from operations.core.remote import HostFunction, Shell
from operations.offline.staging.facts import StagedFiles
from operations.offline.staging.relay import pull_recorded, pullers
from operations.offline.staging.wire import write_record

SITE_IMAGES = "/var/lib/gpufleet/site-images"


def _served_images(other, carried):
    return {
        service["image"]
        for service in other.data.inference_services
        if relayable(service["image"]) and not carried(other.data.get("gpufleet_bundle"), service["image"])
    }


def site_list(seed, carried):
    """The images ``seed`` keeps for its site: those it runs from a registry that a host pulling from
    it runs too, sorted (the same list on the seed and on each of them). ``carried(bundle, image)``:
    whether a bundle carries the image (then it comes from there)."""
    wanted = set().union(*(_served_images(other, carried) for other in pullers(seed)))
    return sorted(_served_images(seed, carried) & wanted)


def relayable(image):
    """Whether ``image`` can travel as an archive: a tag reference, not a digest."""
    return "@" not in image


def archive_name(image, image_id):
    """The archive's file name in SITE_IMAGES: the reference made safe, then the ID's hex (pure)."""
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', image)}@{image_id.removeprefix('sha256:')}.tar"


def _image_id(shell, image):
    lines = shell.run(f"docker image inspect --format '{{{{.Id}}}}' {shlex.quote(image)}")
    return lines[0].strip()


def _kept(staged, name):
    """Whether the archive ``name`` is in SITE_IMAGES as its record says (``StagedFiles``) (pure)."""
    return bool(staged["files"].get(name)) and staged["record"].get(name, [])[:2] == staged["files"][name]


def _save(state, host, shell, image):  # pyinfra passes state and host by these names
    """On the seed: the archive of ``image`` as Docker holds it now, saved unless its record is
    already there; archives of the image's other IDs removed."""
    name = archive_name(image, _image_id(shell, image))
    facts = StagedFiles()
    staged = facts.process(shell.run(facts.command(SITE_IMAGES)))
    if _kept(staged, name):
        logger.info(f"[{host.name}] {image}: archive for the site kept ({name})")
        return
    path = shlex.quote(posixpath.join(SITE_IMAGES, name))
    prefix = shlex.quote(posixpath.join(SITE_IMAGES, name.rsplit("@", 1)[0]))
    shell.run(
        f"mkdir -p {SITE_IMAGES} && rm -f {prefix}@*.tar {prefix}@*.tar.saving && "
        f"docker save -o {path}.saving {shlex.quote(image)} && mv -f {path}.saving {path}"
    )
    size, digest = shell.run(f"stat -c %s {path} && sha256sum {path}")
    # the staging record as every staged directory keeps it (archives removed above drop out of it)
    recorded = {kept: {"sha256": entry[2]} for kept, entry in staged["record"].items()}
    write_record(shell, SITE_IMAGES, {**recorded, name: {"sha256": digest.split()[0]}})
    logger.info(f"[{host.name}] {image}: saved for the site's hosts ({name}, {size} bytes)")


@operation(is_idempotent=False)
def saved_for_site(image: str, seed: str, pulled_now: bool = False):
    """
    On the seed: keep a ``docker save`` archive of ``image`` in SITE_IMAGES for the hosts that pull
    from it, with the staged record the relay sender serves from. Every host of the seed's site
    passes through it (a no-op on the others), so pyinfra orders the seed's archive before any
    host's pull of it.

    + image: a tag reference the seed pulled
    + seed: the seed's name
    + pulled_now: the seed's pull in this run changes the image (its ID is read once it ran)
    """
    if host.name != seed:
        host.noop(f"{image}: {seed} keeps it for the site")
        return
    local = host.get_fact(LocalImage, image=image)
    if local and not pulled_now:
        name = archive_name(image, local["id"])
        if _kept(host.get_fact(StagedFiles, path=SITE_IMAGES), name):
            host.noop(f"{image}: archive for the site's hosts kept ({name})")
            return
    yield HostFunction(_save, [image], {})


def _load_from_seed(state, host, shell, seed, image, keys_dir, margin):
    """On a host of the site: pull the seed's archive of ``image`` (the seed's record read now, after
    the seed saved it), load it, check the loaded ID is the seed's, remove the copy."""
    seed_id = _image_id(Shell.of(state, seed), image)
    here = shell.run(f"docker image inspect --format '{{{{.Id}}}}' {shlex.quote(image)} 2>/dev/null || true")
    if here and here[0].strip() == seed_id:
        logger.info(f"[{host.name}] {image}: already the seed's ({seed_id[:19]})")
        return
    name = archive_name(image, seed_id)
    pull_recorded(state, host, shell, seed, SITE_IMAGES, keys_dir, margin, "400", only={name})
    path = shlex.quote(posixpath.join(SITE_IMAGES, name))
    shell.run(f"docker load -q -i {path}")
    loaded = _image_id(shell, image)
    shell.run(f"rm -f {path}")
    if loaded != seed_id:
        raise OSError(f"{host.name}: {image} loaded from {seed.name}'s archive is {loaded}, not the seed's {seed_id}")
    logger.info(f"[{host.name}] {image}: loaded from {seed.name}'s archive ({seed_id[:19]})")


@operation(is_idempotent=False)
def from_seed(image: str, seed: str):
    """
    Give Docker ``image`` as the site's seed holds it: nothing when this host already holds the
    seed's image ID, otherwise the seed's archive pulled over the site's relay and loaded. (A tag the
    seed follows to a new image in a run reaches this host on the next run.)

    + image: a tag reference the seed runs too
    + seed: the host this one stages from (``gpufleet_stage_via``), in this run
    """
    seed_host = host.inventory.get_host(seed)
    local = host.get_fact(LocalImage, image=image)
    at_seed = seed_host.get_fact(LocalImage, image=image)
    if local and at_seed and local["id"] == at_seed["id"]:
        host.noop(f"{image}: the seed's ({local['id'][:19]})")
        return
    keys_dir = posixpath.join(host.data.gpufleet_state_dir, "relay")
    margin = checks.size_bytes(host.data.gpufleet_free_space_margin)
    yield HostFunction(_load_from_seed, [seed_host, image, keys_dir, margin], {})
