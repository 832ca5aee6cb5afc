"""
The local RAG stack on a host of ``rag_hosts``: the vector database, then Open WebUI, each a
systemd-managed container of its own account, on 127.0.0.1 only, ready on its own endpoint before the
deploy moves on; Open WebUI ordered after the vector database and the host's chat and embedding
services (``parts``). Its first admin is created through Open WebUI's own sign-up while it has no
account. A host that left ``rag_hosts`` has the units and containers removed; its data stays.
"""

import json
import posixpath
import shlex
from io import StringIO

from pyinfra import host
from pyinfra.api import FactBase, deploy, operation
from pyinfra.facts.files import File, FindFiles
from pyinfra.facts.systemd import SystemdStatus
from pyinfra.operations import files, server, systemd
from pyinfra.operations.util import any_changed

from operations.core import base, settings
from operations.rag import front, parts
from operations.services import rolling
from operations.services.accounts import service_account
from operations.services.facts import ServiceAccounts
from operations.services.inference import service_ids
from operations.services.names import managed_name, unit_name, unit_path
from operations.services.secret_files import secret_file


class WebUIConfig(FactBase):
    """
    Returns what Open WebUI says of itself without a login (``/api/config``, from the host), or None
    when it does not answer:

    .. code:: python

        {"version": "0.12.4", "signup": False, "onboarding": False}

    ``onboarding`` is true while it has no account (its first sign-up then makes an admin).
    """

    def command(self, port):
        return f"curl -fsS -m 5 http://127.0.0.1:{int(port)}/api/config 2>/dev/null || true"

    def process(self, output):
        try:
            config = json.loads("\n".join(output))
        except ValueError:
            return None
        features = config.get("features", {})
        return {
            "version": config.get("version"),
            "signup": bool(features.get("enable_signup")),
            "onboarding": bool(config.get("onboarding")),
        }


def admin_request(email, password_file):
    """The sign-up request's body (pure): the first admin's name, e-mail and password."""
    with open(password_file) as handle:
        password = handle.read().strip()
    return json.dumps({"name": "Admin", "email": email, "password": password}).encode()


@operation()
def first_admin(port: int, request_file: str):
    """
    Create Open WebUI's first account, an admin, through its own sign-up, while it has none.

    + port: Open WebUI's port on 127.0.0.1
    + request_file: the root-only file of the sign-up request (``admin_request``)
    """
    config = host.get_fact(WebUIConfig, port=port)
    if config is not None and not config["onboarding"]:
        host.noop("Open WebUI has its accounts (its first admin is not created again)")
        return
    url = f"http://127.0.0.1:{int(port)}"
    yield (
        f"if curl -fsS -m 10 {url}/api/config | grep -q '\"onboarding\":true'; then "
        f"curl -fsS -m 60 -o /dev/null -X POST -H 'Content-Type: application/json' "
        f"--data-binary @{shlex.quote(request_file)} {url}/api/v1/auths/signup; fi"
    )


@operation()
def secret_key(dest: str, uid: int, gid: int):
    """
    A random secret key in ``dest``, made on the host once and kept (Open WebUI signs its sessions with
    it), readable by its account only.

    + dest: path inside the root-only secrets directory
    + uid, gid: Open WebUI's account
    """
    found = host.get_fact(File, path=dest)
    if found and found["mode"] == 400 and found["user"] in (str(uid), managed_name(parts.WEBUI)):
        host.noop(f"{dest} exists (content not shown)")
        return
    path = shlex.quote(dest)
    yield (
        f"test -s {path} || (umask 077; head -c 32 /dev/urandom | base64 > {path}); "
        f"chown {int(uid)}:{int(gid)} {path} && chmod 400 {path}"
    )


def _service(name):
    return next(service for service in host.data.inference_services if service["name"] == name)


@deploy("RAG stack", data_defaults=settings.DEFAULTS)
def install(image_ops: dict | None = None):
    """
    The vector database and Open WebUI, their accounts, data directories, secrets and units; started
    in order (each waits until ready), restarted when their unit, settings, secrets or image changed;
    then the first admin. Returns what host.json records of the stack.

    + image_ops: image -> the operation that provides it (``inference.install_images``)
    """
    data = host.data
    chat, embedding = _service(data.rag_chat_service), _service(data.rag_embedding_service)
    accounts = host.get_fact(ServiceAccounts)
    ids = service_ids([*data.inference_services, {"name": parts.VECTOR_DB}, {"name": parts.WEBUI}], accounts)
    _accounts_and_data(ids, data.rag_data_dir)
    changed = _settings_and_secrets(chat, embedding, ids[parts.WEBUI])
    admin_file = posixpath.join(base.secrets_dir(), f"{parts.WEBUI}-admin.json")
    secret_file(
        name="Write the first admin's sign-up request (root only)",
        dest=admin_file,
        content=admin_request(data.rag_admin_email, data.rag_admin_password_file),
    )
    units = parts.units(data.dict(), ids, base.secrets_dir(), chat, embedding)
    written = {
        unit: files.put(
            name=f"Install unit {unit}", src=StringIO(text), dest=unit_path(unit), mode="644", user="root", group="root"
        )
        for unit, text in units.items()
    }
    systemd.daemon_reload(name="Reload systemd for the RAG stack's units", _if=any_changed(*written.values()))
    # Started once the host's services are: in its batch, after them, on a host that serves.
    rolling.then(lambda: _start(written, changed, image_ops or {}, admin_file, ids[parts.WEBUI]))
    return {
        "rag": {
            "port": data.rag_port,
            "vector_db": data.rag_vector_db,
            "vector_db_port": data.rag_vector_db_port,
            "chat_service": chat["name"],
            "embedding_service": embedding["name"],
            "admin_email": data.rag_admin_email,
            "data_dir": data.rag_data_dir,
            "units": sorted(units),
            "gateway_port": data.rag_gateway_port,
            "front_port": data.rag_front_port if front.exposed(data.dict()) else None,
        }
    }


def _accounts_and_data(ids, root):
    """Each part's account, and its data directory under ``root``, its own."""
    files.directory(name=f"Ensure {root} exists", path=root, mode="755", user="root", group="root")
    for part in (parts.VECTOR_DB, parts.WEBUI):
        uid, gid = (int(number) for number in ids[part].split(":"))
        service_account(
            name=f"Add account {managed_name(part)} (its container runs as it)",
            user=managed_name(part),
            uid=uid,
            gid=gid,
        )
        directory = posixpath.join(root, part.split("-", 1)[1])
        files.directory(
            name=f"Keep {part}'s data in {directory} (its own, kept when the stack is removed)",
            path=directory,
            user=managed_name(part),  # by name: pyinfra compares the owner's name
            group=managed_name(part),
            mode="700",
        )


def _settings_and_secrets(chat, embedding, webui_id):
    """Open WebUI's settings file, its secret key and the keys it sends the model services; returns
    their operations (a change restarts it)."""
    secrets_dir = base.secrets_dir()
    uid, gid = (int(number) for number in webui_id.split(":"))
    changed = [
        secret_key(
            name="Make Open WebUI's secret key (kept across runs)",
            dest=posixpath.join(secrets_dir, f"{parts.WEBUI}-secret-key"),
            uid=uid,
            gid=gid,
        ),
        files.put(
            name="Write Open WebUI's settings (no secrets)",
            src=StringIO(parts.env_file_text(parts.webui_settings(host.data.dict(), chat, embedding))),
            dest=posixpath.join(secrets_dir, f"{parts.WEBUI}.env"),
            mode="600",
            user="root",
            group="root",
        ),
    ]
    services = {"chat": chat, "embedding": embedding}
    for use, path in parts.key_files(secrets_dir, chat, embedding).items():
        with open(services[use]["api_key_file"]) as handle:
            key = handle.readline().strip().encode() + b"\n"
        changed.append(
            secret_file(
                name=f"Write the key Open WebUI sends the {use} service",
                dest=path,
                content=key,
                mode="400",
                uid=uid,
                gid=gid,
            )
        )
    return changed


def _start(written, changed, image_ops, admin_file, webui_id):
    """The vector database, then Open WebUI: restarted where anything they use changed, kept running
    (each start waits until ready); then the first admin, and the TLS front where the gateway serves
    the stack (removed where it no longer does)."""
    data, status = host.data, host.get_fact(SystemdStatus)
    for part, image in ((parts.VECTOR_DB, data.rag_vector_db_image), (parts.WEBUI, data.rag_webui_image)):
        unit = unit_name(part)
        reasons = [written[unit], *([image_ops[image]] if image in image_ops else [])]
        reasons += changed if part == parts.WEBUI else []
        if status.get(unit):  # running now: a restart where anything it uses changed
            systemd.service(
                name=f"Restart {unit} after its unit, settings, secrets or image changed",
                service=unit,
                restarted=True,
                _if=any_changed(*reasons),
            )
        systemd.service(name=f"Run {unit} and wait until ready", service=unit, running=True, enabled=True)
    first_admin(
        name=f"Create Open WebUI's first admin {data.rag_admin_email} while it has no account",
        port=data.rag_port,
        request_file=admin_file,
    )
    if front.exposed(data.dict()):
        front.install(user=webui_id)
    else:
        front.remove()


@deploy("Remove the RAG stack", data_defaults=settings.DEFAULTS)
def remove_if_left():
    """A host that left ``rag_hosts``: its stack's units and containers go; its data, accounts and
    secret key stay (adding it back finds its accounts and documents), unless ``gpufleet_prune``."""
    front.remove()
    removed = []
    for part in (parts.WEBUI, parts.VECTOR_DB):
        unit = unit_name(part)
        if not host.get_fact(File, path=unit_path(unit)):
            continue
        systemd.service(
            name=f"Stop and disable {unit} (the host left rag_hosts)", service=unit, running=False, enabled=False
        )
        removed.append(files.file(name=f"Remove unit {unit}", path=unit_path(unit), present=False))
        server.shell(
            name=f"Remove container {managed_name(part)} if it is left",
            commands=[f"docker rm -f {managed_name(part)} >/dev/null 2>&1 || true"],
        )
    if removed:
        systemd.daemon_reload(name="Reload systemd without the RAG stack's units", _if=any_changed(*removed))
    if host.data.gpufleet_prune:
        _prune_left_data()
    return {}


def _prune_left_data():
    """With ``gpufleet_prune``, a host that left ``rag_hosts`` loses the stack's data too: accounts' chats
    and documents, vectors, the copies a restore kept, and the stack's secrets (its accounts stay:
    nothing of theirs is left)."""
    root = host.data.rag_data_dir
    files.directory(
        name=f"Remove the RAG stack's data {root} (gpufleet_prune: the host left rag_hosts)", path=root, present=False
    )
    found = host.get_fact(FindFiles, path=base.secrets_dir(), maxdepth=1, fname=f"{parts.WEBUI}*") or []
    for path in sorted(found):
        files.file(name=f"Remove the RAG stack's secret {path} (gpufleet_prune)", path=path, present=False)
