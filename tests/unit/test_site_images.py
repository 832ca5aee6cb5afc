"""What a connected site fetches once, on its seed: images (operations/container/site_images.py:
which images a seed keeps for its site, the archive's name, when the seed saves or a host loads)
and hub volumes (operations/weights/volumes.py, hub.py: which volumes, when a host pulls)."""

from types import SimpleNamespace

from pyinfra.api import Config
from pyinfra.context import ctx_host, ctx_inventory, ctx_state

from operations.container import site_images
from operations.weights import hub as hf_hub
from operations.weights import volumes as weights
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
    return {host.name: host for host in made}, SimpleNamespace(iter_activated_hosts=lambda: iter(made))


def test_a_seed_keeps_the_registry_images_it_runs_that_its_hosts_run_too():
    hosts, inventory = _site(
        ("seed", None, [IMAGE, OTHER, "repo/x@sha256:" + "d" * 64], None),
        ("gpu-01", "seed", [IMAGE, "repo/x@sha256:" + "d" * 64], None),
        ("gpu-02", "seed", [IMAGE, "only/here:1"], None),
        ("gpu-03", None, [OTHER], None),  # pulls itself: not the seed's
    )
    ctx_inventory.set(inventory)
    try:
        # OTHER: no host of the seed runs it; a digest reference cannot travel as an archive;
        # only/here:1: the seed does not run it (gpu-02 pulls it itself)
        assert site_images.site_list(hosts["seed"], lambda bundle, image: False) == [IMAGE]
        assert site_images.site_list(hosts["gpu-03"], lambda bundle, image: False) == []  # nobody pulls from it
        # an image the seed's bundle carries comes from the bundle, not through an archive
        assert site_images.site_list(hosts["seed"], lambda bundle, image: image == IMAGE) == []
    finally:
        ctx_inventory.set(None)


def test_the_archive_is_named_by_reference_and_id():
    assert site_images.archive_name(IMAGE, ID) == NAME
    assert site_images.archive_name("nginx:1.27", ID) == f"nginx_1.27@{'c' * 64}.tar"


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


COMMIT = "0123456789abcdef0123456789abcdef01234567"
HUB = {"hf": "org/model", "revision": COMMIT, "ignore_patterns": "original/"}


def _volume_host(name, via, volumes, models, root="/srv/gpufleet/weights"):
    values = {"gpufleet_stage_via": via, "gpufleet_bundle": None, "inference_weight_volumes": volumes}
    return SimpleNamespace(
        name=name,
        data=SimpleNamespace(
            inference_services=[{"model": model} for model in models],
            inference_weights_root=root,
            get=lambda key, default=None: values.get(key, default),
        ),
    )


def test_a_seed_fetches_for_its_site_the_hub_volumes_its_hosts_use_alike():
    seed = _volume_host(
        "seed", None, {"m": HUB, "branch": {**HUB, "revision": "main"}, "d": {"from": "/x"}}, ["m/a", "branch/a", "d/a"]
    )
    hosts = [
        seed,
        _volume_host("gpu-01", "seed", {"m": HUB, "branch": {**HUB, "revision": "main"}}, ["m/a", "branch/a"]),
        _volume_host("gpu-02", "seed", {"m": {**HUB, "ignore_patterns": None}}, ["m/a"]),  # other files: its own
        _volume_host("gpu-03", "seed", {"m": HUB}, ["m/a"], root="/data"),  # elsewhere: its own
    ]
    ctx_inventory.set(SimpleNamespace(iter_activated_hosts=lambda: iter(hosts)))
    try:
        # a branch is resolved by each host; a directory volume is staged from the control node as before
        assert weights.site_volumes(seed) == ["m"]
        assert weights.site_volumes(hosts[2]) == []  # nobody pulls from gpu-02
    finally:
        ctx_inventory.set(None)
    assert hf_hub.site_source(HUB) == {"repo": "org/model", "commit": COMMIT, "ignore_patterns": ["original/"]}
    assert hf_hub.site_source({**HUB, "revision": "main"}) is None


def test_a_host_pulls_a_hub_volume_from_the_seed_only_when_its_own_copy_differs(run_op):
    source = hf_hub.site_source(HUB)
    seed = FakeHost({}, name="seed-01")
    for volume, changes in (
        ({"source": source, "intact": True, "files": 3}, 0),
        ({"source": source, "intact": False, "files": 3}, 1),
        ({"source": {**source, "commit": "f" * 40}, "intact": True, "files": 3}, 1),
        ({"source": None, "intact": False, "files": 0}, 1),
    ):
        runner = FakeHost({"HubVolume": volume}, {"gpufleet_state_dir": "/var/lib/gpufleet"})
        runner.inventory = SimpleNamespace(get_host=lambda name: seed)
        with ctx_state.use(SimpleNamespace(config=Config(), print_noop_info=False)), ctx_host.use(runner):
            commands = list(hf_hub.from_seed._inner(dest="/srv/gpufleet/weights/m", seed="seed-01", source=source))
        assert len(commands) == changes, (volume, commands)
