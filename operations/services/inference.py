"""
Inference services (vLLM, TGI, Ollama, llama.cpp) as systemd-managed containers: one unit per
service, secrets in root-only files, restarted only when something it uses changed, and ready on its
real endpoint before the deploy moves on. Its facts are in ``facts``, the removal of services the
inventory no longer names in ``removal``, each engine's command line in ``engines``.
"""

import posixpath
import shlex
from io import StringIO
from pathlib import Path

from jinja2 import Template
from pyinfra import host, logger
from pyinfra.api import deploy, operation
from pyinfra.operations import files, systemd

from operations import TEMPLATES, TOOLS_DIR
from operations.container import images as docker_images
from operations.container import prune, site_images
from operations.core import base, settings, systemd_syntax
from operations.core.errors import ConfigError
from operations.core.remote import Shell
from operations.driver import cuda_gate
from operations.gateway import drain as gateway_drain
from operations.offline import from_bundle as offline
from operations.offline import staging
from operations.services import auth_proxy, engines, firewall, rolling, secret_files, site_tls
from operations.services.accounts import service_account
from operations.services.facts import ServiceAccounts, ServiceReady
from operations.services.names import cache_path, managed_name, unit_name, unit_path
from operations.services.removal import remove_services, stale_units
from operations.weights import volumes as weights

# Ids of the services' own accounts (gpufleet-<name>): within Debian's 60000-64999, allocated on
# demand (its packages' fixed ids sit at 64000 and above), below systemd's DynamicUser range
# (61184-65519), above login users. The first id no account or group holds is taken, and kept.
SERVICE_IDS = range(60600, 61184)
# Go templates for `docker inspect -f`: the image a container runs, an image's ID.
CONTAINER_IMAGE = shlex.quote("{{.Image}}")
IMAGE_ID = shlex.quote("{{.Id}}")


def check_services(data, host_name):
    services = data.get("inference_services") or []
    if not isinstance(services, list):
        raise ConfigError("inference_services", "a list of services", host=host_name)
    names, ports = set(), set()
    for index, service in enumerate(services):
        engines.check_service(index, service, host_name)
        address = service.get("listen") or data.get("inference_listen") or engines.LOOPBACK
        field = f"inference_services[{index}].listen" if service.get("listen") else "inference_listen"
        if (
            not engines.is_loopback(address)
            and not engines.guarded(service)
            and not data.get("inference_expose_unauthenticated")
        ):
            profile = engines.ENGINES[service["engine"]]
            if not profile["api_key_env"]:
                unkeyed = f"has no API key ({service['engine']} has none)"
            elif not service.get("api_key_file"):
                unkeyed = "has no api_key_file"
            else:
                unkeyed = (
                    f"is keyed, but {service['engine']}'s key leaves some routes open (vLLM: "
                    "/invocations, its --help says; TGI: /info, /metrics, /chat_tokenize, its router's source)"
                )
            raise ConfigError(
                field,
                f"{address}: service {service['name']} {unkeyed}, so anyone reaching {address}:"
                f"{engines.port(service)} could use it. Keep it on 127.0.0.1, set its proxy_port "
                "(gpufleet's authenticating proxy, which checks its api_key_file), or set "
                "inference_expose_unauthenticated = True",
                host=host_name,
            )
        if (
            not engines.is_loopback(address)
            and data.get("inference_firewall", True)
            and not data.get("inference_allowed_sources")
        ):
            raise ConfigError(
                field,
                f"{address}: service {service['name']} listens beyond this host, but "
                "inference_allowed_sources is empty, so the firewall admits nobody: name the "
                "addresses or networks that may connect (e.g. ['10.0.0.0/8']), or set "
                "inference_firewall = False to keep your own firewall",
                host=host_name,
            )
        if service["name"] in names:
            raise ConfigError(f"inference_services[{index}].name", f"{service['name']!r} is used twice", host=host_name)
        for field, port in (("port", engines.port(service)), ("proxy_port", service.get("proxy_port"))):
            if port in ports:
                raise ConfigError(f"inference_services[{index}].{field}", f"port {port} is used twice", host=host_name)
            if port:
                ports.add(port)
        names.add(service["name"])
        for field in ("api_key_file", "hf_token_file"):
            if service.get(field) and not Path(service[field]).is_file():
                raise ConfigError(
                    f"inference_services[{index}].{field}",
                    f"{service[field]}: no such file on the control node",
                    host=host_name,
                )
        if service.get("cuda") and data.get("nvidia_driver_version"):
            cuda_gate.check(
                service["cuda"],
                data["nvidia_driver_version"],
                field=f"inference_services[{index}].image",
                host_name=host_name,
            )
        weights.check_model(index, service["model"], data, host_name)
        _check_model_layout(index, service, data, host_name)
        if data.get("gpufleet_offline") and not offline.carries(data.get("gpufleet_bundle"), service["image"]):
            raise ConfigError(
                f"inference_services[{index}].image",
                f"{service['image']} is not among the bundle's "
                "images, and this offline host cannot pull it: add it to the bundle",
                host=host_name,
            )


def _check_model_layout(index, service, data, host_name):
    """An engine that reads a directory of its own layout (Ollama's models directory) is refused a
    model without it, where the control node can list the volume."""
    layout = engines.ENGINES[service["engine"]].get("model_layout")
    paths = weights.model_files(service["model"], data) if layout else None
    if paths is None:
        return
    inside = weights.path_in_volume(service["model"])
    prefix = f"{inside}/" if inside else ""
    missing = [part for part in layout if not any(path.startswith(prefix + part) for path in paths)]
    if missing:
        raise ConfigError(
            f"inference_services[{index}].model",
            f"{service['model']}: {service['engine']} serves an Ollama models directory (manifests/ and "
            f"blobs/, as ~/.ollama/models of a machine that pulled the model); it has no {', '.join(missing)}. "
            "A lone GGUF file needs `ollama create` (a Modelfile: FROM file.gguf), which writes that directory",
            host=host_name,
        )


@deploy("Provide the services' container images", data_defaults=settings.DEFAULTS)
def install_images(images: list[str], follow_tag: bool | None = None):
    """
    Give Docker each of ``images``: loaded from the offline bundle when it carries the image (only
    those archives are sent), otherwise pulled from its registry by the deploy (never at unit start).

    + images: the images this host runs (its services', and the GPU check image on a GPU host)
    + follow_tag: follow a tag its registry moved (``inference_image_follow_tag``); otherwise the
      move is reported and the host keeps what it has

    Returns the operation that provides each image, by name.
    """
    follow_tag = host.data.inference_image_follow_tag if follow_tag is None else follow_tag
    bundle_path = host.data.get("gpufleet_bundle")
    bundled = [image for image in sorted(set(images)) if offline.carries(bundle_path, image)]
    operations = offline.load_images(bundled) if bundled else {}
    seed = staging.relay_seed()
    site = site_images.site_list(seed or host, offline.carries)  # what the site's seed keeps for it
    for image in sorted(set(images) - set(bundled)):
        if seed is None or image not in site:
            operations[image] = docker_images.pulled(
                name=f"Pull image {image}", image=image, follow_tag=follow_tag, state_dir=host.data.gpufleet_state_dir
            )
    for image in site:
        site_images.saved_for_site(
            name=f"Keep image {image} for the site's hosts",
            image=image,
            seed=(seed or host).name,
            pulled_now=bool(seed is None and operations[image].will_change),
        )
    for image in site if seed else []:
        if image in images:
            operations[image] = site_images.from_seed(
                name=f"Load image {image} from {seed.name}", image=image, seed=seed.name
            )
    return operations


def service_ids(services, accounts):
    """
    Each service's ``UID:GID`` (pure: unit-tested): its ``user`` setting, or its own account's, which
    keeps the UID it has; a new account gets the lowest id of SERVICE_IDS that no account or group
    holds.
    """
    taken = set(accounts["users"].values()) | set(accounts["groups"].values())
    ids = {}
    for service in services:
        if service.get("user"):
            user = str(service["user"])
            ids[service["name"]] = user if ":" in user else f"{user}:{user}"
            continue
        existing = accounts["users"].get(managed_name(service["name"]))
        if existing is None:
            existing = next(number for number in SERVICE_IDS if number not in taken)
            taken.add(existing)
        ids[service["name"]] = f"{existing}:{accounts['groups'].get(managed_name(service['name']), existing)}"
    return ids


def placement(service, secrets_dir):
    """
    Where a service's secrets go (pure): the API key in a file only the service's account reads,
    mounted read-only, when the engine reads its key from a file (llama.cpp ``--api-key-file``), so
    it is in no environment and not in ``docker inspect``; otherwise in the root-only environment
    file (``--env-file``), with the Hugging Face token. Readiness reads the key from where it is.
    """
    profile = engines.ENGINES[service["engine"]]
    keyed = bool(service.get("api_key_file"))
    key_file = posixpath.join(secrets_dir, f"{service['name']}.key") if keyed and profile["api_key_file_flag"] else None
    in_env = (keyed and not key_file) or bool(service.get("hf_token_file"))
    env_file = posixpath.join(secrets_dir, f"{service['name']}.env") if in_env else None
    return {
        "key_file": key_file,
        "env_file": env_file,
        "key_source": key_file or (env_file if keyed else None),
        "key_var": "" if key_file or not keyed else profile["api_key_env"],
    }


def with_listen(services):
    """The services with the address each listens on filled in (``inference_listen`` unless set)."""
    return [{**service, "listen": service.get("listen") or host.data.inference_listen} for service in services]


def readiness(service, secrets_dir=None):
    """How the host checks that ``service`` answers: its engine's endpoints (behind a proxy, on
    loopback), the file its key is read from and the variable naming it: ``ServiceReady``'s arguments."""
    secrets_dir = secrets_dir or base.secrets_dir()
    engine_service = auth_proxy.engine_side(service) if service.get("proxy_port") else service
    where = placement(engine_service, secrets_dir)
    return {"urls": engines.ready_urls(engine_service), "key_file": where["key_source"], "key_var": where["key_var"]}


def unit_text(
    service,
    weights_root,
    env_file,
    use_gpus,
    start_timeout,
    user=engines.DEFAULT_USER,
    key_file=None,
    host_gpus=1,
    cache_dir=None,
):
    """The systemd unit for ``service`` (pure: unit-tested); its words quoted for systemd, not a shell."""
    profile = engines.ENGINES[service["engine"]]
    container = managed_name(service["name"])
    args = engines.docker_args(
        service,
        weights_root,
        env_file,
        use_gpus,
        user=user,
        key_file=key_file,
        host_gpus=host_gpus,
        cache_dir=cache_dir,
    )
    return Template((TEMPLATES / "inference.service.j2").read_text(), keep_trailing_newline=True).render(
        name=service["name"],
        engine=service["engine"],
        model=service["model"],
        port=engines.port(service),
        container=container,
        tools_dir=TOOLS_DIR,
        user=user,
        key_source=key_file or (env_file if service.get("api_key_file") else "") or "",
        key_var="" if key_file else profile["api_key_env"] or "",
        env_file=env_file or "",
        volume_dir=posixpath.join(weights_root, service["model"].split("/")[0]),
        docker_args=systemd_syntax.command_line(args),
        ready_urls=systemd_syntax.command_line(engines.ready_urls(service)),
        start_timeout=int(service.get("start_timeout", start_timeout)),
    )


def env_content(service, profile, key_in_file=False):
    """The environment file's bytes: the API key (unless the engine reads it from its own file) and
    the Hugging Face token; None when there is neither."""
    lines = []
    for field, variable in (("api_key_file", profile["api_key_env"]), ("hf_token_file", "HF_TOKEN")):
        if service.get(field) and not (field == "api_key_file" and key_in_file):
            value = Path(service[field]).read_text().strip()
            lines.append(f"{variable}={value}")
    return ("\n".join(lines) + "\n").encode() if lines else None


@deploy("Deploy inference services", data_defaults=settings.DEFAULTS)
def install_services(
    services: list[dict] | None = None,
    gpus: int = 0,
    weights_root: str | None = None,
    start_timeout: int | None = None,
    image_ops: dict | None = None,
):
    """
    Install, start and check every inference service of the host.

    + services: the host's services (``inference_services``), checked by ``checks.validate``
    + gpus: how many NVIDIA GPUs the host really has (0: CPU engines run without ``--gpus``)
    + weights_root: where weight volumes live (``inference_weights_root``)
    + start_timeout: seconds a service may take to become ready (``inference_start_timeout``)
    + image_ops: image -> the operation that provides it (``install_images``); a service restarts
      when its own image changed

    Each service's containers run as its own account (``gpufleet-<name>``, its own UID), unless its
    ``user`` names one. Services the inventory no longer names are removed, and the firewall set to
    these services' ports, once images and weights are in place and before any unit (re)starts.

    Returns ``(service, ready fact or None, where)`` for the summary (``where``: its user and secrets).
    """
    services = with_listen(host.data.inference_services if services is None else services)
    weights_root = weights_root or host.data.inference_weights_root
    start_timeout = start_timeout or host.data.inference_start_timeout
    _install_tools(with_weight_check=bool(services))
    accounts = host.get_fact(ServiceAccounts)
    volumes = (
        weights.stage_volumes(volumes={weights.volume_of(s["model"]) for s in services}, weights_root=weights_root)
        if services
        else {}
    )
    # What the inventory no longer names goes now: images and weights are in place, no new unit
    # has started, and a renamed service's port is free for its successor.
    remove_services(stale_units(services), accounts, secrets_dir=base.secrets_dir())
    # Before any new unit listens, its ports (and its proxy's) admit the allowed sources only; off,
    # gpufleet's table is removed.
    firewall.admit_only_allowed(ports=guarded_ports(services) if services and host.data.inference_firewall else [])
    ids = service_ids(services, accounts)
    # The site's certificate, for the services' TLS fronts (proxy_port).
    tls = site_tls.install() if any(service.get("proxy_port") for service in services) else None
    installed = [
        _install_service(
            service, ids[service["name"]], gpus, weights_root, start_timeout, volumes, image_ops or {}, tls
        )
        for service in services
    ]
    # Starting them (a restart where anything they use changed) and pruning what they no longer use:
    # now, or, on a host that serves, in its batch (``rolling``).
    starts = [start for _, start in installed if start] + [lambda: _prune_unused(services, weights_root)]
    if rolling.hold(starts):
        logger.info(f"[{host.name}] serving: its services restart, where needed, in its batch (gpufleet_upgrade_batch)")
    else:
        for start in starts:
            start()
    return [result for result, _ in installed]


def _install_tools(with_weight_check):
    """gpufleet's readiness check and container follower, and its weight check when the host has services."""
    files.directory(name=f"Ensure {TOOLS_DIR} exists", path=TOOLS_DIR, mode="755")
    for tool, what in (("gpufleet-wait-ready", "readiness check"), ("gpufleet-container-follow", "container follower")):
        files.put(
            name=f"Install the {what}",
            src=str(TEMPLATES / tool),
            dest=f"{TOOLS_DIR}/{tool}",
            mode="755",
            create_remote_dir=False,
        )  # ensured just above
    if with_weight_check:
        files.put(
            name="Install the weight check",
            src=str(TEMPLATES / "gpufleet-verify-weights"),
            dest=f"{TOOLS_DIR}/gpufleet-verify-weights",
            mode="755",
            create_remote_dir=False,
        )


def _install_service(service, user, gpus, weights_root, start_timeout, volumes, image_ops, tls):
    """One service: its account, secrets and unit. Returns ``((engine side, ready fact or None, where),
    start)``: ``start`` adds the operations that run it (None when it cannot run here)."""
    name = service["name"]
    engine_service = auth_proxy.engine_side(service) if service.get("proxy_port") else service
    uid, gid = (int(number) for number in user.split(":"))
    # Its own start_timeout, or the setting raised to what its model's size needs (volumes the control node lists).
    start_timeout = service.get("start_timeout") or engines.fitting_start_timeout(
        start_timeout, weights.model_bytes(service["model"], host.data)
    )
    if not service.get("user"):
        service_account(
            name=f"Add account {managed_name(name)} (its containers run as it)",
            user=managed_name(name),
            uid=uid,
            gid=gid,
        )
    runs_here = _says_where_it_runs(service, gpus)
    where = _placement_with_proxy(service, engine_service, user)
    new_key, new_secrets = write_secrets(service, engine_service, where, uid, gid)
    use_gpus = bool(gpus) and service.get("gpus", "all") != "none"
    cache_dir = where["caches"] = _cache_directory(service)
    unit = files.put(
        name=f"Install unit {unit_name(name)}",
        src=StringIO(
            unit_text(
                engine_service,
                weights_root,
                where["env_file"],
                use_gpus,
                start_timeout,
                user=user,
                key_file=where["key_file"],
                host_gpus=gpus or 1,
                cache_dir=cache_dir,
            )
        ),
        dest=unit_path(unit_name(name)),
        mode="644",
        user="root",
        group="root",
        create_remote_dir=False,
    )
    systemd.daemon_reload(name=f"Reload systemd for {managed_name(name)}", _if=unit.did_change)
    if not runs_here:
        return (engine_service, None, where), None
    ready = host.get_fact(
        ServiceReady, urls=engines.ready_urls(engine_service), key_file=where["key_source"], key_var=where["key_var"]
    )
    volume = weights.volume_of(service["model"])
    restart = restart_needed(
        service,
        ready,
        unit,
        new_secrets,
        image_ops.get(service["image"]),
        volumes[volume],
        posixpath.join(weights_root, volume),
    )
    if service.get("proxy_port") and rolling.readmits_itself():
        _back_where_left_out(service, ready)

    def start():
        _start_service(service, engine_service, where, restart, user, new_key, start_timeout, tls)

    return (engine_service, ready, where), start


def _back_where_left_out(service, ready):
    """A pooled service that answers now (its engine and its TLS front), yet is held out at a gateway
    by a run that drained it and stopped (a rollout halted on this host), goes back into the pool now,
    not in its host's batch: before any other host of the pool is drained. Its front is asked only
    where its engine answers and the run has a gateway (one command less on every other run)."""
    if not (ready["ready"] and gateway_drain.gateways()):
        return
    if host.get_fact(ServiceReady, **auth_proxy.readiness(service))["ready"]:
        gateway_drain.put_back_where_left_out(
            name=f"Put {managed_name(service['name'])} back into the gateways' pool {service['name']} "
            "where an earlier run left it out",
            service=service["name"],
        )


def _start_service(service, engine_service, where, restart, user, new_key, start_timeout, tls):
    """Restart the service when ``restart()`` says so (on a host that serves, once its open requests
    finished), keep it running, its proxy too, and check it answers at apply time."""
    name = managed_name(service["name"])
    pooled = bool(service.get("proxy_port"))  # a member of the gateways' pool of its name
    if pooled and rolling.holds_restarts():
        gateway_drain.drained(
            name=f"Take {name} out of the gateways' pool {service['name']} and let its requests there finish",
            service=service["name"],
            timeout=host.data.gpufleet_upgrade_drain_timeout,
            _if=restart,
        )
    if rolling.holds_restarts():
        requests_finished(
            name=f"Let {name}'s open requests finish before it restarts (at most gpufleet_upgrade_drain_timeout s)",
            ports=guarded_ports([service]),
            timeout=host.data.gpufleet_upgrade_drain_timeout,
            _if=restart,
        )
    systemd.service(
        name=f"Restart {name} after its unit, secrets, weights or image changed, or it was not ready",
        service=name,
        restarted=True,
        _if=restart,
    )
    systemd.service(
        name=f"Run {name} ({service['engine']}, {service['model']}) and wait until ready",
        service=name,
        running=True,
        enabled=True,
    )
    if service.get("proxy_port"):
        auth_proxy.install(
            service,
            user=user,
            key_file=where["proxy"]["api_key_at"],
            new_key=new_key,
            tls=tls,
            ready=host.get_fact(ServiceReady, **auth_proxy.readiness(service)),
            start_timeout=start_timeout,
        )
    answers(
        name=f"Check {name} answers now, whatever restarted it in this run",
        service=service["name"],
        urls=engines.ready_urls(engine_service),
        key_file=where["key_source"],
        key_var=where["key_var"],
        timeout=int(service.get("start_timeout", start_timeout)),
    )
    # put back whenever it restarted: also a host that served nothing when the run started (a
    # rollout that halted on it left it drained at the gateways)
    if pooled and rolling.readmits_itself():
        gateway_drain.readmitted(
            name=f"Put {name} back into the gateways' pool {service['name']} once their checks see it up",
            service=service["name"],
            _if=restart,
        )


def _cache_directory(service):
    """The service's own cache directory on the host, for an engine that keeps caches, run as its own
    account (None otherwise: its caches stay in the container's /tmp)."""
    if not engines.ENGINES[service["engine"]].get("caches") or service.get("user"):
        return None
    name, path = managed_name(service["name"]), cache_path(service["name"])
    files.directory(
        name=f"Keep {name}'s compile caches in {path} (its own, across restarts)",
        path=path,
        user=name,
        group=name,
        mode="700",
    )
    return path


def _says_where_it_runs(service, gpus):
    """Whether the service can run on this host: an engine that needs a GPU on a host without one gets its
    unit, not started; a CPU engine on a host without a GPU is said to run on the CPU."""
    name, engine, given = service["name"], service["engine"], service.get("gpus", "all")
    needed = engines.gpus_needed(service)
    if given == "all" and gpus and needed > gpus:
        raise ConfigError(
            f"inference_services[{name}].args",
            f"its parallel sizes need {needed} GPUs (tensor x pipeline); this host has {gpus}",
            host=host.name,
        )
    if engines.ENGINES[engine]["needs_gpu"] and given == "none":
        logger.warning(
            f"[{host.name}] {name}: gpus is 'none': {engine} runs on the CPU (its image must be the engine's "
            "CPU build, such as vLLM's)"
        )
        return True
    if engines.ENGINES[engine]["needs_gpu"] and not gpus:
        logger.warning(
            f"[{host.name}] {name}: {engine} needs a GPU and this host has none: unit installed, not started "
            "(gpus: 'none' runs a CPU build)"
        )
        return False
    if not gpus and given != "none":
        logger.warning(
            f"[{host.name}] {name}: no NVIDIA GPU on this host: {engine} runs on the CPU "
            "(no --gpus, no layers offloaded)"
        )
    return True


def _placement_with_proxy(service, engine_service, user):
    """``placement`` of the engine's secrets, the account it runs as, and its proxy's address and key file."""
    where = {**placement(engine_service, base.secrets_dir()), "user": user}
    if service.get("proxy_port"):
        where["proxy"] = {
            "listen": engines.listen(service),
            "port": service["proxy_port"],
            "api_key_at": auth_proxy.key_path(service["name"]),
            **site_tls.paths(),
            "config_at": auth_proxy.config_path(service["name"]),
        }
    return where


def restart_needed(service, ready, unit, new_secrets, image_op, volume_op, volume_dir):
    """
    The condition pyinfra checks (``_if``) once the earlier operations ran: restart ``service`` when it
    was not ready before this run, its unit or secrets changed, its image moved to another ID, or its
    weight volume's bytes changed.
    """

    def needed():
        return (
            not ready["ready"]
            or unit.did_change()
            or new_secrets
            or image_changed(image_op, managed_name(service["name"]), service["image"])
            or content_changed(volume_op, volume_dir)
        )

    return needed


@operation()
def requests_finished(ports: list[int], timeout: int):
    """Wait until no connection to ``ports`` is established (at most ``timeout`` seconds): a request in
    flight finishes before its service restarts."""
    yield rolling.drain_command(ports, timeout)


@operation()
def answers(service: str, urls: list[str], key_file: str, key_var: str, timeout: int):
    """
    ``service`` answers on its endpoint, read when this step runs, after every earlier step of the run
    (its own restart, the container engine's, a reload): nothing to do when it does; otherwise it is
    waited for, at most ``timeout`` seconds, and the run fails naming it if it never answers.
    """
    ready = host.get_fact(ServiceReady, urls=urls, key_file=key_file, key_var=key_var)
    if ready["ready"]:
        host.noop(f"{service} answers ({', '.join(urls)})")
        return
    wait = f"{TOOLS_DIR}/gpufleet-wait-ready {int(timeout)} {' '.join(shlex.quote(url) for url in urls)}"
    failed = f"service {service} does not answer after {int(timeout)} s (before: {ready['reason']})"
    yield (
        f"GPUFLEET_KEY_FILE={shlex.quote(key_file or '')} GPUFLEET_KEY_VAR={shlex.quote(key_var or '')} {wait} "
        f"|| {{ echo {shlex.quote(failed)} >&2; exit 1; }}"
    )


def _prune_unused(services, weights_root):
    """With ``gpufleet_prune``, once the services run: remove the images and weight volumes none of them
    uses (the GPU check's image stays, and a RAG host's stack images)."""
    if host.data.gpufleet_prune:
        prune.pruned(
            name="Remove images and weight volumes no service uses (gpufleet_prune)",
            keep_images=[service["image"] for service in services]
            + [host.data.nvidia_toolkit_check_image]
            + ([host.data.rag_webui_image, host.data.rag_vector_db_image] if "rag_hosts" in host.groups else []),
            keep_volumes=sorted({weights.volume_of(service["model"]) for service in services}),
            weights_root=weights_root,
        )


def write_secrets(service, engine_service, where, uid, gid):
    """
    Write a service's secret files where ``placement`` put them: its API key file (its account's,
    mounted into the engine; or root's, for its proxy) and its root-only environment file.

    Returns ``(new_key, new_secrets)``: whether the key file's bytes change this run, and whether the
    engine's own secrets do (a mode or owner fix alone is not a change a service restarts for).
    """
    name, key_file, env_file = service["name"], where["key_file"], where["env_file"]
    new_key = new_secrets = False
    if key_file or where.get("proxy"):
        key = Path(service["api_key_file"]).read_text().strip().encode() + b"\n"
        key_at = key_file or where["proxy"]["api_key_at"]
        new_key = secret_files.content_differs(key_at, key)
        new_secrets = bool(key_file) and new_key
        reader = (
            "its account reads it, nobody else"
            if key_file
            else "root only: the proxy reads it before it drops to the service's account"
        )
        owner = (uid, gid) if key_file else (0, 0)
        secret_files.secret_file(
            name=f"Write {name}'s API key file ({reader})",
            dest=key_at,
            content=key,
            mode="400",
            uid=owner[0],
            gid=owner[1],
        )
    if env_file:
        profile = engines.ENGINES[service["engine"]]
        env = env_content(engine_service, profile, key_in_file=bool(key_file))
        new_secrets = new_secrets or secret_files.content_differs(env_file, env)
        secret_files.secret_file(name=f"Write {name}'s secrets (root only)", dest=env_file, content=env)
    return new_key, new_secrets


def guarded_ports(services):
    """Every port the services and their proxies listen on (pure)."""
    return sorted({port for service in services for port in (engines.port(service), service.get("proxy_port")) if port})


def image_changed(image_op, container, image):
    """Whether the container must move to another image: the image's operation changed something and
    the image's ID now differs from the one the container runs (a re-pull or re-load of the same
    image, say after it was untagged, restarts nothing). Asked on the host when the operation ran."""
    if image_op is None or not image_op.did_change():
        return False
    shell = Shell.of(host.state, host)
    running = shell.run(f"docker inspect -f {CONTAINER_IMAGE} {shlex.quote(container)} 2>/dev/null || true")
    current = shell.run(f"docker image inspect -f {IMAGE_ID} {shlex.quote(image)} 2>/dev/null || true")
    return not running or not current or running != current


def content_changed(volume_op, volume_dir):
    """Whether a weight volume's bytes changed this run: staging knows (files only re-hashed and
    re-recorded after their mtime moved change nothing); a hub fetch changes only what differs."""
    if not volume_op.did_change():
        return False
    staged = staging.content_changed(host.name, volume_dir)
    return True if staged is None else staged


def summary(results):
    """One line per service: what it serves, where, and whether it was ready when checked."""
    for service, ready, where in results:
        if ready is None:
            state = "not started: needs a GPU"
        elif ready["ready"]:
            state = "ready"
        else:
            state = f"not ready before this run ({ready['reason']}): started; its unit waits until ready"
        proxy = where.get("proxy")
        behind = f" behind its proxy on {proxy['listen']}:{proxy['port']}" if proxy else ""
        logger.info(
            f"[{host.name}] service {service['name']}: {service['engine']} {service['model']} "
            f"on {engines.listen(service)}:{engines.port(service)}{behind}: {state}"
        )


def intent(service, started, where):
    """What the checks expect of a service on the host (written to host.json)."""
    profile = engines.ENGINES[service["engine"]]
    return {
        "name": service["name"],
        "engine": service["engine"],
        "model": service["model"],
        "port": engines.port(service),
        "listen": engines.listen(service),
        "network": service.get("network", "host"),
        "ready": profile["ready"],
        "api_key": bool(service.get("api_key_file")),
        "api_key_at": where["key_source"],
        "api_key_var": where["key_var"],
        "user": where["user"],
        "served_name": service.get("served_name") or service["name"],
        "started": started,
        "proxy": where.get("proxy"),
        "caches": where.get("caches"),
    }
