"""
The lab's site services on ``lab-svc-1``, for hosts deployed with no bundle (``lab-net-N``):

- a private container registry: Debian's own ``docker-registry`` package (distribution 2.8), TLS
  with a certificate of a CA made for the lab, htpasswd (bcrypt) logins; the lab's llama.cpp image
  pushed to it from the control node;
- a hub: the Hugging Face Hub download API double (tests/fixtures/hub_double) serving the lab's tiny
  GGUF as the private repository ``gpufleet-lab/tiny-llama`` and the vLLM test's Hugging Face-format
  Llama as ``gpufleet-lab/tiny-hf``, token required.

Everything a connected host needs to reach them is written under .lab: the CA, the registry login
(``USER:PASSWORD``, 0600) and the hub token (0600).
"""

import os
import re
import secrets
import shutil
import subprocess
from pathlib import Path

from tests.fixtures.hub_double import hub as hub_double

from . import hosts, llamacpp, models

REGISTRY_PORT = 5000
HUB_PORT, CDN_PORT = 8090, 8091
HUB_REPO = "gpufleet-lab/tiny-llama"
# The tiny Hugging Face-format Llama of the vLLM test, when the lab has it (tests/lab/bundle.py).
HUB_HF_REPO = "gpufleet-lab/tiny-hf"
HUB_HF_FILES = hosts.STATE_DIR / "models" / "tiny-hf"
SITE_DIR = hosts.STATE_DIR / "site"
CA_CERT = SITE_DIR / "ca.crt"
LOGIN_FILE = hosts.STATE_DIR / "secrets" / "registry-login"
HUB_TOKEN_FILE = hosts.STATE_DIR / "secrets" / "hub-token"
HUB_FILES = hosts.STATE_DIR / "hub" / HUB_REPO
HUB_DOUBLE = Path(hub_double.__file__)
CONTROL_CERTS = Path("/etc/docker/certs.d")

SETUP = r"""
set -eu
if ! dpkg -s docker-registry apache2-utils >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-registry apache2-utils >/dev/null
fi
cd /etc/docker/registry
install -m 644 /tmp/site/registry.crt registry.crt
install -m 600 -o docker-registry /tmp/site/registry.key registry.key
htpasswd -Bbc htpasswd "$1" "$2" 2>/dev/null
cat > config.yml <<EOF
version: 0.1
log:
  fields:
    service: registry
storage:
  filesystem:
    rootdirectory: /var/lib/docker-registry
  delete:
    enabled: true
http:
  addr: :{registry_port}
  tls:
    certificate: /etc/docker/registry/registry.crt
    key: /etc/docker/registry/registry.key
auth:
  htpasswd:
    realm: gpufleet-lab
    path: /etc/docker/registry/htpasswd
EOF
systemctl restart docker-registry
mkdir -p /usr/local/lib/gpufleet-lab /srv/hub
install -m 755 /tmp/site/hub.py /usr/local/lib/gpufleet-lab/hub.py
install -m 600 /tmp/site/hub-token /usr/local/lib/gpufleet-lab/hub-token
rm -rf /srv/hub; mkdir -p /srv/hub; cp -r /tmp/site/repos/. /srv/hub/
cat > /etc/systemd/system/gpufleet-lab-hub.service <<EOF
[Unit]
Description=gpufleet lab: Hugging Face Hub download API double
After=network-online.target
[Service]
ExecStart=/usr/bin/python3 /usr/local/lib/gpufleet-lab/hub.py --public-host $3 --port {hub_port} --cdn-port {cdn_port} --token-file /usr/local/lib/gpufleet-lab/hub-token --access-log {repos}
Restart=always
[Install]
WantedBy=multi-user.target
EOF
systemctl daemon-reload
systemctl enable -q gpufleet-lab-hub
systemctl restart gpufleet-lab-hub
rm -rf /tmp/site
for i in $(seq 50); do
  curl -sf --cacert /etc/docker/registry/registry.crt -o /dev/null https://$3:{registry_port}/ -u "$1:$2" &&
    curl -s -o /dev/null http://127.0.0.1:{hub_port}/ && exit 0
  sleep 0.2
done
echo "registry or hub did not answer" >&2; exit 1
"""


def registry(address):
    return f"{address}:{REGISTRY_PORT}"


def image(address):
    """The lab's llama.cpp image as the connected hosts pull it, from the lab registry."""
    return f"{registry(address)}/{llamacpp.image_tag()}"


def hub_endpoint(address):
    return f"http://{address}:{HUB_PORT}"


def hub_commit(repo=HUB_REPO):
    """The commit the hub double serves ``repo`` at (the SHA-1 of its file list)."""
    return hub_double.Repo(repo, _hub_repos()[repo]).commit


def _openssl(*args):
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _certificates(address):
    """A CA made for the lab, and the registry's certificate for its address (made again when it moves)."""
    SITE_DIR.mkdir(parents=True, exist_ok=True)
    key = SITE_DIR / "ca.key"
    if not CA_CERT.exists():
        _openssl(
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "3650",
            "-subj",
            "/CN=gpufleet lab CA",
            "-keyout",
            str(key),
            "-out",
            str(CA_CERT),
        )
    cert, stamp = SITE_DIR / "registry.crt", SITE_DIR / "registry.address"
    if not cert.exists() or not stamp.exists() or stamp.read_text() != address:
        (SITE_DIR / "ext").write_text(f"subjectAltName=IP:{address}\nextendedKeyUsage=serverAuth\n")
        _openssl(
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            f"/CN={address}",
            "-keyout",
            str(SITE_DIR / "registry.key"),
            "-out",
            str(SITE_DIR / "registry.csr"),
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            str(SITE_DIR / "registry.csr"),
            "-CA",
            str(CA_CERT),
            "-CAkey",
            str(key),
            "-CAcreateserial",
            "-days",
            "3650",
            "-extfile",
            str(SITE_DIR / "ext"),
            "-out",
            str(cert),
        )
        stamp.write_text(address)


def _hub_repos():
    """The repositories the hub serves: name -> directory."""
    repos = {HUB_REPO: HUB_FILES}
    if HUB_HF_FILES.exists():
        repos[HUB_HF_REPO] = HUB_HF_FILES
    return repos


def _secret(path, value):
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.write_text(value + "\n")
        path.chmod(0o600)
    return path.read_text().strip()


def _hub_files():
    """The repository the hub serves: the lab's tiny GGUF and a small config, byte-stable."""
    model = hosts.STATE_DIR / "models" / "tiny" / "tiny.gguf"
    if not model.exists():
        models.write_tiny_gguf(model)
    HUB_FILES.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model, HUB_FILES / "tiny.gguf")
    (HUB_FILES / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}\n')


def push_image(address, log=print):
    """Push the lab's llama.cpp image to the lab registry from the control node's Docker (which
    trusts the lab CA for that registry only, through its certs.d), logged in with a throwaway config."""
    certs = CONTROL_CERTS / registry(address)
    certs.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(CA_CERT, certs / "ca.crt")
    user, password = LOGIN_FILE.read_text().strip().split(":", 1)
    config = SITE_DIR / "docker-config"
    config.mkdir(exist_ok=True)
    subprocess.run(
        ["docker", "--config", str(config), "login", "--username", user, "--password-stdin", registry(address)],
        input=password,
        text=True,
        check=True,
        capture_output=True,
    )
    try:
        tag, _ = llamacpp.ensure_image(log=log)
        subprocess.run(["docker", "tag", tag, image(address)], check=True)
        subprocess.run(
            ["docker", "--config", str(config), "push", "-q", image(address)], check=True, capture_output=True
        )
    finally:
        subprocess.run(["docker", "--config", str(config), "logout", registry(address)], capture_output=True)
    log(f"site: pushed {image(address)}")


def push_variant(address):
    """Push another image under the lab image's tag (the same server, one more label): the registry's
    digest for the tag moves, as when a publisher re-pushes a tag. Returns the new digest."""
    config = SITE_DIR / "docker-config"
    user, password = LOGIN_FILE.read_text().strip().split(":", 1)
    subprocess.run(
        ["docker", "--config", str(config), "login", "--username", user, "--password-stdin", registry(address)],
        input=password,
        text=True,
        check=True,
        capture_output=True,
    )
    try:
        tag, _ = llamacpp.ensure_image(log=lambda *_: None)
        subprocess.run(
            ["docker", "build", "-q", "-t", image(address), "-"],
            check=True,
            capture_output=True,
            input=f"FROM {tag}\nLABEL org.gpufleet.lab.variant=moved\n",
            text=True,
            env={**os.environ, "DOCKER_BUILDKIT": "0"},
        )
        pushed = subprocess.run(
            ["docker", "--config", str(config), "push", image(address)], check=True, capture_output=True, text=True
        ).stdout
    finally:
        subprocess.run(["docker", "--config", str(config), "logout", registry(address)], capture_output=True)
    return re.search(r"digest: (sha256:[0-9a-f]{64})", pushed).group(1)


def install(host, log=print):
    """Turn lab host ``host`` into the site services: registry and hub, with the lab image pushed."""
    address = host["address"]
    _certificates(address)
    login = _secret(LOGIN_FILE, f"gpufleet-lab:{secrets.token_urlsafe(18)}")
    _secret(HUB_TOKEN_FILE, f"hf_lab_{secrets.token_urlsafe(24)}")
    _hub_files()
    container = host["container"]
    subprocess.run(["docker", "exec", container, "rm", "-rf", "/tmp/site"], check=True)
    repos = _hub_repos()
    for name in repos:
        subprocess.run(["docker", "exec", container, "mkdir", "-p", f"/tmp/site/repos/{name}"], check=True)
    for source, target in (
        (SITE_DIR / "registry.crt", "registry.crt"),
        (SITE_DIR / "registry.key", "registry.key"),
        (HUB_DOUBLE, "hub.py"),
        (HUB_TOKEN_FILE, "hub-token"),
    ):
        subprocess.run(["docker", "cp", str(source), f"{container}:/tmp/site/{target}"], check=True)
    for name, files in repos.items():
        subprocess.run(["docker", "cp", f"{files}/.", f"{container}:/tmp/site/repos/{name}"], check=True)
    user, password = login.split(":", 1)
    script = (
        SETUP.replace("{registry_port}", str(REGISTRY_PORT))
        .replace("{hub_port}", str(HUB_PORT))
        .replace("{cdn_port}", str(CDN_PORT))
        .replace("{repos}", " ".join(f"{name}=/srv/hub/{name}" for name in repos))
    )
    setup = subprocess.run(
        ["docker", "exec", container, "sh", "-c", script, "site", user, password, address],
        capture_output=True,
        text=True,
    )
    if setup.returncode:
        raise RuntimeError(f"{host['name']}: site services setup failed: {setup.stderr[-2000:]}")
    push_image(address, log=log)


def remove_control_node_trust():
    """Take the lab registries' CA out of the control node's Docker (lab down)."""
    for path in CONTROL_CERTS.glob(f"*:{REGISTRY_PORT}"):
        if (path / "ca.crt").exists() and CA_CERT.exists() and (path / "ca.crt").read_bytes() == CA_CERT.read_bytes():
            shutil.rmtree(path)
