"""
Inference services (vLLM, TGI, Ollama, llama.cpp) as systemd-managed containers: one unit per
service, secrets in a root-only environment file, restarted only when something it uses changed,
and ready on its real endpoint before the deploy moves on.
"""

import posixpath
import re
import shlex
from io import StringIO
from pathlib import Path

from jinja2 import Template
from pyinfra import host, logger
from pyinfra.api import FactBase, deploy
from pyinfra.operations import files, server, systemd

from operations import TEMPLATES, TOOLS_DIR
from operations.container import images as docker_images, prune
from operations.core import checks, settings, systemd_syntax
from operations.driver import cuda_gate
from operations.offline import from_bundle as offline, staging
from operations.services import auth_proxy, engines, firewall, secret_files
from operations.weights import volumes as weights
from operations.services.accounts import service_account
from operations.core.errors import ConfigError
from operations.core.remote import Shell

UNIT_DIR = "/etc/systemd/system"
# Ids of the services' own accounts (gpufleet-<name>): within Debian's 60000-64999, allocated on
# demand (its packages' fixed ids sit at 64000 and above), below systemd's DynamicUser range
# (61184-65519), above login users. The first id no account or group holds is taken, and kept.
SERVICE_IDS = range(60600, 61184)


def _check(data, host_name):
    services = data.get("inference_services") or []
    if not isinstance(services, list):
        raise ConfigError("inference_services", "a list of services", host=host_name)
    names, ports = set(), set()
    for index, service in enumerate(services):
        engines.check_service(index, service, host_name)
        address = service.get("listen") or data.get("inference_listen") or engines.LOOPBACK
        field = f"inference_services[{index}].listen" if service.get("listen") else "inference_listen"
        if (not engines.is_loopback(address) and not engines.guarded(service)
                and not data.get("inference_expose_unauthenticated")):
            profile = engines.ENGINES[service["engine"]]
            if not profile["api_key_env"]:
                unkeyed = f"has no API key ({service['engine']} has none)"
            elif not service.get("api_key_file"):
                unkeyed = "has no api_key_file"
            else:
                unkeyed = (f"is keyed, but {service['engine']}'s key leaves some routes open (vLLM: "
                           "/invocations, its --help says)")
            raise ConfigError(field, f"{address}: service {service['name']} {unkeyed}, so anyone reaching {address}:"
                              f"{engines.port(service)} could use it. Keep it on 127.0.0.1, set its proxy_port "
                              "(gpufleet's authenticating proxy, which checks its api_key_file), or set "
                              "inference_expose_unauthenticated = True", host=host_name)
        if (not engines.is_loopback(address) and data.get("inference_firewall", True)
                and not data.get("inference_allowed_sources")):
            raise ConfigError(field, f"{address}: service {service['name']} listens beyond this host, but "
                              "inference_allowed_sources is empty, so the firewall admits nobody: name the "
                              "addresses or networks that may connect (e.g. ['10.0.0.0/8']), or set "
                              "inference_firewall = False to keep your own firewall", host=host_name)
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
                raise ConfigError(f"inference_services[{index}].{field}",
                                  f"{service[field]}: no such file on the control node", host=host_name)
        if service.get("cuda") and data.get("nvidia_driver_version"):
            cuda_gate.check(service["cuda"], data["nvidia_driver_version"],
                            field=f"inference_services[{index}].image", host_name=host_name)
        weights.check_model(index, service["model"], data, host_name)
        if data.get("gpufleet_offline") and not offline.carries(data.get("gpufleet_bundle"), service["image"]):
            raise ConfigError(f"inference_services[{index}].image", f"{service['image']} is not among the bundle's "
                              "images, and this offline host cannot pull it: add it to the bundle", host=host_name)


checks.register({
    "inference_services": (lambda v: isinstance(v, list), "a list of services (see group_data/all.py)"),
    "inference_start_timeout": (checks._is_positive_int, "seconds, above 0"),
    "inference_image_follow_tag": (checks._is_bool, "true or false"),
    "inference_listen": (engines.is_address, "an IP address of the host (127.0.0.1, 10.0.0.5, 0.0.0.0 for all)"),
    "inference_expose_unauthenticated": (checks._is_bool, "true or false"),
}, cross_check=_check)


@deploy("Provide the services' container images", data_defaults=settings.DEFAULTS)
def install_images(images, follow_tag=None):
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
    for image in sorted(set(images) - set(bundled)):
        operations[image] = docker_images.pulled(name=f"Pull image {image}", image=image, follow_tag=follow_tag,
                                                 state_dir=host.data.gpufleet_state_dir)
    return operations


class ServiceReady(FactBase):
    """
    Returns whether a service's readiness endpoints answer now, from the host itself.

    .. code:: python

        {"ready": False, "reason": "http://127.0.0.1:8080/health not ready after 2 s (Connection refused)"}
    """

    def command(self, urls, key_file, key_var):
        return (f"GPUFLEET_KEY_FILE={shlex.quote(key_file or '')} GPUFLEET_KEY_VAR={shlex.quote(key_var or '')} "
                f"{TOOLS_DIR}/gpufleet-wait-ready 2 {' '.join(shlex.quote(u) for u in urls)} 2>&1 "
                "|| echo __not_ready__")

    def process(self, output):
        if output and output[-1] == "__not_ready__":
            text = " ".join(output[:-1])
            reason = "not installed yet" if "not found" in text else text.replace("gpufleet-wait-ready: ", "")
            return {"ready": False, "reason": reason}
        return {"ready": True, "reason": ""}


class ServiceAccounts(FactBase):
    """
    Returns the host's accounts and groups by name, with their ids (``/etc/passwd``, ``/etc/group``).

    .. code:: python

        {"users": {"root": 0, "gpufleet-chat": 64100}, "groups": {"root": 0, "gpufleet-chat": 64100}}
    """

    def command(self):
        return "cut -d: -f1,3 /etc/passwd; echo --; cut -d: -f1,3 /etc/group"

    def process(self, output):
        found, table = {"users": {}, "groups": {}}, "users"
        for line in output:
            if line == "--":
                table = "groups"
            elif ":" in line:
                name, number = line.rsplit(":", 1)
                found[table][name] = int(number)
        return found


class InstalledServices(FactBase):
    """
    Returns the units gpufleet installed for inference services, read from their first line, by unit.

    .. code:: python

        {"gpufleet-chat.service": {"service": "chat", "proxy": False},
         "gpufleet-chat-proxy.service": {"service": "chat", "proxy": True}}
    """

    @staticmethod
    def default():
        return {}

    def command(self):
        return f"grep -m1 -H '^# Managed by gpufleet: ' {UNIT_DIR}/gpufleet-*.service 2>/dev/null || true"

    def process(self, output):
        units = {}
        for line in output:
            path, _, text = line.partition(":")
            match = re.match(r"# Managed by gpufleet: (inference service|authenticating proxy of inference "
                             r"service) ([a-z0-9-]+)[ .]", text)
            if match:
                units[posixpath.basename(path)] = {"service": match.group(2),
                                                   "proxy": match.group(1).startswith("authenticating")}
        return units


def account(service):
    """The host account a service's containers run as: ``gpufleet-<name>`` (own UID and group)."""
    return f"gpufleet-{service['name']}"


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
        existing = accounts["users"].get(account(service))
        if existing is None:
            existing = next(number for number in SERVICE_IDS if number not in taken)
            taken.add(existing)
        ids[service["name"]] = f"{existing}:{accounts['groups'].get(account(service), existing)}"
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
    return {"key_file": key_file, "env_file": env_file,
            "key_source": key_file or (env_file if keyed else None),
            "key_var": "" if key_file or not keyed else profile["api_key_env"]}


def with_listen(services):
    """The services with the address each listens on filled in (``inference_listen`` unless set)."""
    return [{**service, "listen": service.get("listen") or host.data.inference_listen} for service in services]


def readiness(service, secrets_dir=None):
    """How the host checks that ``service`` answers: its engine's endpoints (behind a proxy, on
    loopback), the file its key is read from and the variable naming it: ``ServiceReady``'s arguments."""
    secrets_dir = secrets_dir or posixpath.join(host.data.gpufleet_config_dir, "secrets")
    engine_service = auth_proxy.engine_side(service) if service.get("proxy_port") else service
    where = placement(engine_service, secrets_dir)
    return {"urls": engines.ready_urls(engine_service), "key_file": where["key_source"], "key_var": where["key_var"]}


def unit_text(service, weights_root, env_file, use_gpus, start_timeout, user=engines.DEFAULT_USER, key_file=None):
    """The systemd unit for ``service`` (pure: unit-tested); its words quoted for systemd, not a shell."""
    profile = engines.ENGINES[service["engine"]]
    container = f"gpufleet-{service['name']}"
    args = engines.docker_args(service, weights_root, env_file, use_gpus, user=user, key_file=key_file)
    return Template((TEMPLATES / "inference.service.j2").read_text(), keep_trailing_newline=True).render(
        name=service["name"], engine=service["engine"], model=service["model"],
        port=engines.port(service), container=container, tools_dir=TOOLS_DIR, user=user,
        key_source=key_file or (env_file if service.get("api_key_file") else "") or "",
        key_var="" if key_file else profile["api_key_env"] or "", env_file=env_file or "",
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
def install_services(services=None, gpus=0, weights_root=None, start_timeout=None, image_ops=None):
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
    secrets_dir = posixpath.join(host.data.gpufleet_config_dir, "secrets")
    files.directory(name=f"Ensure {TOOLS_DIR} exists", path=TOOLS_DIR, mode="755")
    files.put(name="Install the readiness check", src=str(TEMPLATES / "gpufleet-wait-ready"),
              dest=f"{TOOLS_DIR}/gpufleet-wait-ready", mode="755", create_remote_dir=False)  # ensured just above
    accounts = host.get_fact(ServiceAccounts)
    if not services:
        remove_services(stale_units(services), accounts, secrets_dir=secrets_dir)
        firewall.admit_only_allowed(ports=[])
        _prune_unused(services, weights_root)
        return []
    files.put(name="Install the weight check", src=str(TEMPLATES / "gpufleet-verify-weights"),
              dest=f"{TOOLS_DIR}/gpufleet-verify-weights", mode="755", create_remote_dir=False)
    volumes = weights.stage_volumes(volumes={weights.volume_of(s["model"]) for s in services},
                                    weights_root=weights_root)
    # What the inventory no longer names goes now: images and weights are in place, no new unit
    # has started, and a renamed service's port is free for its successor.
    remove_services(stale_units(services), accounts, secrets_dir=secrets_dir)
    # Before any new unit listens, its ports (and its proxy's) admit the allowed sources only; off,
    # gpufleet's table is removed.
    firewall.admit_only_allowed(ports=guarded_ports(services) if host.data.inference_firewall else [])

    ids = service_ids(services, accounts)
    results = []
    for service in services:
        name, engine = service["name"], service["engine"]
        proxied = bool(service.get("proxy_port"))
        engine_service = auth_proxy.engine_side(service) if proxied else service
        user = ids[name]
        uid, gid = (int(number) for number in user.split(":"))
        if not service.get("user"):
            service_account(name=f"Add account {account(service)} (its containers run as it)",
                            user=account(service), uid=uid, gid=gid)
        profile = engines.ENGINES[engine]
        use_gpus = bool(gpus) and service.get("gpus", "all") != "none"
        if profile["needs_gpu"] and not gpus:
            logger.warning(f"[{host.name}] {name}: {engine} needs a GPU and this host has none: unit installed, "
                           "not started")
        elif not gpus and service.get("gpus", "all") != "none":
            logger.warning(f"[{host.name}] {name}: no NVIDIA GPU on this host: {engine} runs on the CPU "
                           "(no --gpus, no layers offloaded)")
        where = {**placement(engine_service, secrets_dir), "user": user}
        key_file, env_file = where["key_file"], where["env_file"]
        if proxied:
            where["proxy"] = {"listen": engines.listen(service), "port": service["proxy_port"],
                              "api_key_at": posixpath.join(secrets_dir, f"{name}.key")}
        new_key, new_secrets = write_secrets(service, engine_service, where, uid, gid)
        unit_path = f"{UNIT_DIR}/gpufleet-{name}.service"
        unit = files.put(name=f"Install unit gpufleet-{name}.service",
                         src=StringIO(unit_text(engine_service, weights_root, env_file, use_gpus, start_timeout,
                                                user=user, key_file=key_file)),
                         dest=unit_path, mode="644", user="root", group="root", create_remote_dir=False)
        systemd.daemon_reload(name=f"Reload systemd for gpufleet-{name}", _if=unit.did_change)
        if profile["needs_gpu"] and not gpus:
            results.append((engine_service, None, where))
            continue
        ready = host.get_fact(ServiceReady, urls=engines.ready_urls(engine_service), key_file=where["key_source"],
                              key_var=where["key_var"])
        volume = weights.volume_of(service["model"])
        volume_dir = posixpath.join(weights_root, volume)
        systemd.service(
            name=f"Restart gpufleet-{name} after its unit, secrets, weights or image changed, or it was not ready",
            service=f"gpufleet-{name}", restarted=True,
            _if=lambda ready=ready, unit=unit, new_secrets=new_secrets, image_op=(image_ops or {}).get(service["image"]),
                volume_op=volumes[volume], volume_dir=volume_dir, image=service["image"], name=name: (
                not ready["ready"] or unit.did_change() or new_secrets
                or image_changed(image_op, f"gpufleet-{name}", image) or content_changed(volume_op, volume_dir)),
        )
        systemd.service(name=f"Run gpufleet-{name} ({engine}, {service['model']}) and wait until ready",
                        service=f"gpufleet-{name}", running=True, enabled=True)
        if proxied:
            proxy_ready = host.get_fact(ServiceReady, urls=auth_proxy.ready_urls(service),
                                        key_file=where["proxy"]["api_key_at"], key_var="")
            auth_proxy.install(service, user=user, key_file=where["proxy"]["api_key_at"], new_key=new_key,
                               ready=proxy_ready, start_timeout=start_timeout)
        results.append((engine_service, ready, where))
    _prune_unused(services, weights_root)
    return results


def _prune_unused(services, weights_root):
    """With ``gpufleet_prune``, once the services run: remove the images and weight volumes none of them
    uses (the GPU check's image stays)."""
    if host.data.gpufleet_prune:
        prune.pruned(name="Remove images and weight volumes no service uses (gpufleet_prune)",
                     keep_images=[service["image"] for service in services] + [host.data.nvidia_toolkit_check_image],
                     keep_volumes=sorted({weights.volume_of(service["model"]) for service in services}),
                     weights_root=weights_root)


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
        reader = "its account reads it, nobody else" if key_file else \
            "root only: the proxy reads it before it drops to the service's account"
        owner = (uid, gid) if key_file else (0, 0)
        secret_files.secret_file(name=f"Write {name}'s API key file ({reader})", dest=key_at, content=key, mode="400",
                            uid=owner[0], gid=owner[1])
    if env_file:
        profile = engines.ENGINES[service["engine"]]
        env = env_content(engine_service, profile, key_in_file=bool(key_file))
        new_secrets = new_secrets or secret_files.content_differs(env_file, env)
        secret_files.secret_file(name=f"Write {name}'s secrets (root only)", dest=env_file, content=env)
    return new_key, new_secrets


def guarded_ports(services):
    """Every port the services and their proxies listen on (pure)."""
    return sorted({port for service in services for port in (engines.port(service), service.get("proxy_port"))
                   if port})


def wanted_units(services):
    """The unit of each service, and of its proxy when it has a proxy_port (pure)."""
    units = {f"gpufleet-{service['name']}.service" for service in services}
    return units | {auth_proxy.unit_name(service) for service in services if service.get("proxy_port")}


def stale_units(services):
    """The inference units on the host that ``services`` no longer name."""
    installed = host.get_fact(InstalledServices)
    wanted = wanted_units(services)
    return {unit: found for unit, found in installed.items() if unit not in wanted}


@deploy("Remove services the inventory no longer names", data_defaults=settings.DEFAULTS)
def remove_services(stale, accounts, secrets_dir=None):
    """
    Stop, disable and delete what gpufleet installed for services that are gone: their units
    (proxies first), and for a service gone entirely its container, secrets and account. Its image
    and weight volumes stay (other services, or a later one, may use them).

    + stale: unit -> ``{"service": name, "proxy": bool}`` (``stale_units``)
    + accounts: the host's accounts (``ServiceAccounts``)
    + secrets_dir: where the services' secret files are
    """
    secrets_dir = secrets_dir or posixpath.join(host.data.gpufleet_config_dir, "secrets")
    removed = []
    for unit, found in sorted(stale.items(), key=lambda item: not item[1]["proxy"]):
        systemd.service(name=f"Stop and disable {unit} (no longer in inference_services)", service=unit,
                        running=False, enabled=False)
        removed.append(files.file(name=f"Remove unit {unit}", path=f"{UNIT_DIR}/{unit}", present=False))
    for name in sorted({found["service"] for found in stale.values() if not found["proxy"]}):
        server.shell(name=f"Remove container gpufleet-{name} if it is left",
                     commands=[f"docker rm -f gpufleet-{name} >/dev/null 2>&1 || true"])
        for suffix in ("env", "key"):
            files.file(name=f"Remove {name}'s {suffix} file", path=posixpath.join(secrets_dir, f"{name}.{suffix}"),
                       present=False)
        who = f"gpufleet-{name}"
        if who in accounts["users"] or who in accounts["groups"]:
            server.shell(name=f"Remove account {who}",
                         commands=[f"if getent passwd {who} >/dev/null; then userdel {who}; fi; "
                                   f"if getent group {who} >/dev/null; then groupdel {who}; fi"])
    if removed:
        systemd.daemon_reload(name="Reload systemd without the removed units",
                              _if=lambda: any(op.did_change() for op in removed))


def image_changed(image_op, container, image):
    """Whether the container must move to another image: the image's operation changed something and
    the image's ID now differs from the one the container runs (a re-pull or re-load of the same
    image, say after it was untagged, restarts nothing). Asked on the host when the operation ran."""
    if image_op is None or not image_op.did_change():
        return False
    shell = Shell.of(host.state, host)
    running = shell.run(f"docker inspect -f '{{{{.Image}}}}' {container} 2>/dev/null || true")
    current = shell.run(f"docker image inspect -f '{{{{.Id}}}}' {shlex.quote(image)} 2>/dev/null || true")
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
        logger.info(f"[{host.name}] service {service['name']}: {service['engine']} {service['model']} "
                    f"on {engines.listen(service)}:{engines.port(service)}{behind}: {state}")


def intent(service, started, where):
    """What the checks expect of a service on the host (written to host.json)."""
    profile = engines.ENGINES[service["engine"]]
    return {"name": service["name"], "engine": service["engine"], "model": service["model"],
            "port": engines.port(service), "listen": engines.listen(service), "network": service.get("network", "host"),
            "ready": profile["ready"], "api_key": bool(service.get("api_key_file")),
            "api_key_at": where["key_source"], "api_key_var": where["key_var"], "user": where["user"],
            "served_name": service.get("served_name") or service["name"], "started": started,
            "proxy": where.get("proxy")}
