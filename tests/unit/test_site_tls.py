"""The site's TLS (operations/services/site_tls.py) with this machine's openssl: the CA made once and
kept, each host's certificate signed by it for exactly its addresses, kept while they hold and
remade when they change; the site's own files refused unless all three are given."""

import subprocess

import pytest

from operations.core.errors import ConfigError
from operations.services import site_tls


def _text(pem):
    return subprocess.run(["openssl", "x509", "-noout", "-text"], input=pem, capture_output=True, check=True).stdout


def test_a_hosts_certificate_is_signed_by_the_site_ca_for_its_addresses_and_kept(tmp_path):
    addresses = site_tls.host_addresses("gpu-7", {"gpufleet_site_address": "10.0.0.7", "ssh_hostname": "127.0.0.1"})
    assert addresses == ["127.0.0.1", "10.0.0.7", "gpu-7"]
    pem = site_tls.host_certificate(tmp_path, "gpu-7", addresses)
    assert b"IP Address:127.0.0.1, IP Address:10.0.0.7, DNS:gpu-7" in _text(pem)
    assert b"-----BEGIN PRIVATE KEY-----" in pem  # HAProxy's crt: certificate, then its key
    verified = subprocess.run(
        ["openssl", "verify", "-CAfile", str(tmp_path / "ca.crt")], input=pem, capture_output=True
    )
    assert verified.returncode == 0, verified.stderr
    ca = (tmp_path / "ca.crt").read_bytes()
    assert (tmp_path / "ca.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "hosts" / "gpu-7.pem").stat().st_mode & 0o777 == 0o600
    assert site_tls.host_certificate(tmp_path, "gpu-7", addresses) == pem  # kept: a second run changes nothing
    moved = site_tls.host_certificate(tmp_path, "gpu-7", ["127.0.0.1", "10.0.0.8", "gpu-7"])
    assert moved != pem and b"IP Address:10.0.0.8" in _text(moved)
    assert (tmp_path / "ca.crt").read_bytes() == ca  # the CA is made once


def test_the_sites_own_files_come_together_and_exist(tmp_path):
    cert = tmp_path / "host.crt"
    cert.write_text("x")
    with pytest.raises(ConfigError, match="gpufleet_tls_key_file, gpufleet_tls_ca_file"):
        site_tls.check_tls_files({"gpufleet_tls_cert_file": str(cert)}, "gpu-1")
    with pytest.raises(ConfigError, match="gpufleet_tls_ca_file.*no such file"):
        site_tls.check_tls_files(
            {"gpufleet_tls_cert_file": str(cert), "gpufleet_tls_key_file": str(cert), "gpufleet_tls_ca_file": "/nope"},
            "gpu-1",
        )
    site_tls.check_tls_files({}, "gpu-1")  # gpufleet's site CA: nothing to check
