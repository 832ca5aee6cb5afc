"""
The site's TLS: what a service's front (``proxy_port``) presents to clients and what they check it
against. Either the site's own files (``gpufleet_tls_cert_file``, ``gpufleet_tls_key_file``, and the
CA that signed them, ``gpufleet_tls_ca_file``), or gpufleet's site CA, kept on the control node in
``gpufleet_tls_dir``: made the first time a host needs it (an EC P-256 key, ten years), it signs
each host a certificate naming the addresses it is reached at (397 days, remade within 30 days of
its end or when the addresses change). Clients trust ``<gpufleet_tls_dir>/ca.crt``; its key never
leaves the control node. On the host: the CA certificate beside host.json, the certificate and its
key in the root-only secrets directory (HAProxy reads them as root, before it drops to the
service's account).
"""

import ipaddress
import os
import posixpath
import subprocess
import tempfile
from io import BytesIO
from pathlib import Path

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import files

from operations.core import settings
from operations.core.errors import ConfigError
from operations.services import secret_files

CA_DAYS = 3650
HOST_DAYS = 397
RENEW_SECONDS = 30 * 86400
CA_SUBJECT = "/CN=gpufleet site CA"


def host_addresses(name, data):
    """Every name the host is reached at, loopback first: the site address, the SSH address (unless
    loopback, as in the lab) and the inventory name (pure)."""
    found = ["127.0.0.1"]
    for value in (data.get("gpufleet_site_address"), data.get("ssh_hostname"), name):
        if value and value not in found and not _is_loopback(value):
            found.append(value)
    return found


def _is_loopback(value):
    try:
        return ipaddress.ip_address(value).is_loopback
    except ValueError:
        return value == "localhost"


def subject_alt_names(addresses):
    """The certificate's subjectAltName line for ``addresses`` (IP: for addresses, DNS: for names)."""

    def entry(value):
        try:
            return f"IP:{ipaddress.ip_address(value)}"
        except ValueError:
            return f"DNS:{value}"

    return ",".join(entry(value) for value in addresses)


def _openssl(*args, stdin=None):
    done = subprocess.run(["openssl", *args], input=stdin, capture_output=True)
    if done.returncode != 0:
        raise ConfigError("gpufleet_tls_dir", f"openssl {args[0]} failed: {done.stderr.decode().strip()[-300:]}")
    return done.stdout


def ensure_ca(directory):
    """The site CA in ``directory`` (control node): its certificate and key paths, made once."""
    directory = Path(directory).expanduser()
    cert, key = directory / "ca.crt", directory / "ca.key"
    if cert.is_file() and key.is_file():
        return cert, key
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    with tempfile.TemporaryDirectory(dir=directory) as work:
        new_cert, new_key = Path(work) / "ca.crt", Path(work) / "ca.key"
        _openssl(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", str(new_key), "-out", str(new_cert), "-days", str(CA_DAYS), "-subj", CA_SUBJECT,
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )  # fmt: skip
        new_key.chmod(0o600)
        os.replace(new_key, key)
        os.replace(new_cert, cert)
    return cert, key


def _current(pem_path, alt_names):
    """Whether the host certificate at ``pem_path`` was made for ``alt_names`` (its ``.san`` file beside
    it says) and lasts 30 more days."""
    names = pem_path.with_suffix(".san")
    if not pem_path.is_file() or not names.is_file() or names.read_text() != alt_names:
        return False
    lasting = subprocess.run(
        ["openssl", "x509", "-noout", "-checkend", str(RENEW_SECONDS)], input=pem_path.read_bytes(), capture_output=True
    )
    return lasting.returncode == 0


def host_certificate(directory, name, addresses):
    """The PEM (certificate, then its key) of host ``name`` signed by the site CA in ``directory``:
    the one kept there while it names ``addresses`` and lasts, a new one otherwise."""
    ca_cert, ca_key = ensure_ca(directory)
    hosts = Path(directory).expanduser() / "hosts"
    hosts.mkdir(exist_ok=True, mode=0o700)
    pem_path, alt_names = hosts / f"{name}.pem", subject_alt_names(addresses)
    if _current(pem_path, alt_names):
        return pem_path.read_bytes()
    with tempfile.TemporaryDirectory(dir=hosts) as work:
        key, request, extensions = Path(work) / "key", Path(work) / "csr", Path(work) / "ext"
        _openssl(
            "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", str(key), "-out", str(request), "-subj", f"/CN={name}",
        )  # fmt: skip
        extensions.write_text(
            f"subjectAltName={alt_names}\nbasicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n"
        )
        certificate = _openssl(
            "x509", "-req", "-in", str(request), "-CA", str(ca_cert), "-CAkey", str(ca_key),
            "-set_serial", str(int.from_bytes(os.urandom(16), "big") >> 1), "-days", str(HOST_DAYS),
            "-extfile", str(extensions),
        )  # fmt: skip
        pem = certificate + key.read_bytes()
        written = Path(work) / "pem"
        written.write_bytes(pem)
        written.chmod(0o600)
        os.replace(written, pem_path)
        pem_path.with_suffix(".san").write_text(alt_names)
    return pem


def material(name, data):
    """``{"ca": bytes, "pem": bytes}``: the CA clients check against, and the host's certificate
    followed by its key; the site's own files where set, gpufleet's site CA otherwise."""
    if data.get("gpufleet_tls_cert_file"):
        pem = Path(data["gpufleet_tls_cert_file"]).read_bytes().rstrip(b"\n") + b"\n"
        return {"ca": ca_certificate(data), "pem": pem + Path(data["gpufleet_tls_key_file"]).read_bytes()}
    directory = data.get("gpufleet_tls_dir") or settings.DEFAULTS["gpufleet_tls_dir"]
    return {"ca": ca_certificate(data), "pem": host_certificate(directory, name, host_addresses(name, data))}


def ca_certificate(data):
    """The CA certificate the site's fronts are checked against: the site's own, or gpufleet's site CA."""
    if data.get("gpufleet_tls_ca_file"):
        return Path(data["gpufleet_tls_ca_file"]).read_bytes()
    ca_cert, _ = ensure_ca(data.get("gpufleet_tls_dir") or settings.DEFAULTS["gpufleet_tls_dir"])
    return ca_cert.read_bytes()


def check_tls_files(data, host_name):
    """The site's own certificate, key and CA come together, each a file on the control node."""
    fields = ("gpufleet_tls_cert_file", "gpufleet_tls_key_file", "gpufleet_tls_ca_file")
    given = [field for field in fields if data.get(field)]
    if given and len(given) != len(fields):
        missing = ", ".join(field for field in fields if field not in given)
        raise ConfigError(
            missing, f"is needed with {', '.join(given)} (the site's certificate, key and CA)", host=host_name
        )
    for field in given:
        if not Path(data[field]).is_file():
            raise ConfigError(field, f"{data[field]}: no such file on the control node", host=host_name)


def paths(config_dir=None):
    """Where the host keeps the CA certificate (readable by all) and its own certificate and key (root only)."""
    config_dir = config_dir or host.data.gpufleet_config_dir
    return {
        "ca_at": posixpath.join(config_dir, "site-ca.crt"),
        "pem_at": posixpath.join(config_dir, "secrets", "tls.pem"),
    }


@deploy("Install the site's TLS certificate", data_defaults=settings.DEFAULTS)
def install():
    """
    Put the site's CA certificate and this host's certificate and key on the host.

    Returns ``{"ca_at": path, "pem_at": path, "changed": function}``: ``changed()`` says, once the
    operations ran, whether either file's bytes changed (a front reloads for it).
    """
    found = material(host.name, host.data.dict())
    where = paths()
    new_pem = secret_files.content_differs(where["pem_at"], found["pem"])
    ca = files.put(
        name=f"Write the site's CA certificate {where['ca_at']} (what clients check the fronts against)",
        src=BytesIO(found["ca"]),
        dest=where["ca_at"],
        mode="644",
        user="root",
        group="root",
    )
    secret_files.secret_file(
        name=f"Write this host's TLS certificate and key {where['pem_at']} (root only)",
        dest=where["pem_at"],
        content=found["pem"],
        mode="600",
    )
    return {**where, "changed": lambda: new_pem or ca.did_change()}
