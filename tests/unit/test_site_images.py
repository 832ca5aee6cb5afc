"""Images a connected site fetches once (operations/container/site_images.py): which images a seed
keeps for its site, the archive's name and record, and when the seed saves or a host loads."""

from types import SimpleNamespace

from pyinfra.api import Config
from pyinfra.context import ctx_host, ctx_state

from operations.container import site_images
from tests.unit.conftest import FakeHost

IMAGE = "10.0.0.5:5000/team/llama-server:v1"
OTHER = "10.0.0.5:5000/team/vllm:v2"
ID = "sha256:" + "c" * 64
NAME = f"10.0.0.5_5000_team_llama-server_v1@{'c' * 64}.tar"


def _site(*hosts):
    """Hosts as the inventory gives them: name, data (stage_via, services, bundle)."""
    made = [
        SimpleNamespace(
            name=name,
            data=SimpleNamespace(
                inference_services=[{"image": image} for image in images],
                get=lambda key, default=None, via=via, bundle=bundle: {
                    "gpufleet_stage_via": via,
                    "gpufleet_bundle": bundle,
                }.get(key, default),
            ),
        )
        for name, via, images, bundle in hosts
    ]
    inventory = SimpleNamespace(iter_activated_hosts=lambda: iter(made))
    return {host.name: host for host in made}, SimpleNamespace(state=SimpleNamespace(inventory=inventory))


def test_a_seed_keeps_the_registry_images_it_runs_that_its_hosts_run_too():
    hosts, current = _site(
        ("seed", None, [IMAGE, OTHER, "repo/x@sha256:" + "d" * 64], None),
        ("gpu-01", "seed", [IMAGE, "repo/x@sha256:" + "d" * 64], None),
        ("gpu-02", "seed", [IMAGE, "only/here:1"], None),
        ("gpu-03", None, [OTHER], None),  # pulls itself: not the seed's
    )
    ctx_host.set(current)
    try:
        # OTHER: no host of the seed runs it; a digest reference cannot travel as an archive;
        # only/here:1: the seed does not run it (gpu-02 pulls it itself)
        assert site_images.site_list(hosts["seed"], lambda bundle, image: False) == [IMAGE]
        assert site_images.site_list(hosts["gpu-03"], lambda bundle, image: False) == []  # nobody pulls from it
        # an image the seed's bundle carries comes from the bundle, not through an archive
        assert site_images.site_list(hosts["seed"], lambda bundle, image: image == IMAGE) == []
    finally:
        ctx_host.set(None)


def test_the_archive_is_named_by_reference_and_id_and_relayed_from_the_seeds_record():
    assert site_images.archive_name(IMAGE, ID) == NAME
    record = {NAME: [1234, 1700000000, "e" * 64]}
    assert site_images.wanted_from(record, NAME) == {NAME: {"size": 1234, "sha256": "e" * 64}}
    assert site_images.wanted_from(record, "other.tar") is None


def test_the_seed_saves_an_archive_it_lacks_and_keeps_one_it_has(run_op):
    staged = {"files": {NAME: [1234, 1700000000]}, "parts": {}, "record": {NAME: [1234, 1700000000, "e" * 64]}}
    local = {"id": ID, "repo_digests": []}
    commands, noops = run_op(
        site_images.saved_for_site, {"LocalImage": local, "StagedFiles": staged}, image=IMAGE, seed="fake-host"
    )
    assert commands == [] and noops == [f"{IMAGE}: archive for the site's hosts kept ({NAME})"]
    # pulled again in this run: its ID is read once the pull ran
    commands, _ = run_op(
        site_images.saved_for_site,
        {"LocalImage": local, "StagedFiles": staged},
        image=IMAGE,
        seed="fake-host",
        pulled_now=True,
    )
    assert len(commands) == 1 and "_save" in commands[0]
    empty = {"files": {}, "parts": {}, "record": {}}
    commands, _ = run_op(
        site_images.saved_for_site, {"LocalImage": local, "StagedFiles": empty}, image=IMAGE, seed="fake-host"
    )
    assert len(commands) == 1 and "_save" in commands[0]
    # on the seed's other hosts: nothing
    commands, noops = run_op(site_images.saved_for_site, {}, image=IMAGE, seed="seed-01")
    assert commands == [] and noops == [f"{IMAGE}: seed-01 keeps it for the site"]


def test_a_host_loads_from_the_seed_only_what_differs_from_the_seeds_image(run_op):
    seed = FakeHost({"LocalImage": {"id": ID, "repo_digests": []}}, name="seed-01")

    def load(local):
        host_facts = {"LocalImage": local}
        data = {"gpufleet_state_dir": "/var/lib/gpufleet", "gpufleet_free_space_margin": "1g"}
        runner = FakeHost(host_facts, data)
        runner.inventory = SimpleNamespace(get_host=lambda name: seed)
        return runner

    for local, changes in (({"id": ID, "repo_digests": []}, 0), ({"id": "sha256:" + "f" * 64}, 1), (None, 1)):
        host = load(local)
        with ctx_state.use(SimpleNamespace(config=Config(), print_noop_info=False)), ctx_host.use(host):
            commands = list(site_images.from_seed._inner(image=IMAGE, seed="seed-01"))
        assert len(commands) == changes, (local, commands)
        assert (host.noops == [f"{IMAGE}: the seed's ({ID[:19]})"]) == (changes == 0)
