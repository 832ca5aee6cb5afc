"""gpufleet's nftables table (operations/services/firewall.py), checked by this machine's ``nft -c``
(scripts/bootstrap.sh installs Debian's nftables): the allowed sources per family, collapsed; the
forward hook judging packets by the Docker bridge and port they go to, DNAT or not; the digest."""

import shutil
import subprocess

import pytest

from operations.services import firewall

NFT = shutil.which("nft") or "/usr/sbin/nft"


def test_firewall_rules_admit_the_allowed_sources_per_family_and_carry_their_digest():
    text, digest = firewall.rules([8443, 8080, 8080], ["10.0.0.0/8", "192.0.2.7", "fd00::/8"])
    assert f'comment "{digest}"' in text
    assert "elements = { 8080, 8443 }" in text
    assert "elements = { 10.0.0.0/8, 192.0.2.7/32 }" in text and "elements = { fd00::/8 }" in text
    assert "tcp dport @inference_ports ip saddr @allowed_ipv4 accept" in text
    assert text.rstrip().endswith("}") and text.count("reject with tcp reset") == 3
    assert firewall.rules([8080, 8443], ["192.0.2.7", "10.0.0.0/8", "fd00::/8"]) == (text, digest)
    alone, _ = firewall.rules([8080], [])
    assert "accept\n" in alone and "saddr" not in alone and "tcp dport @inference_ports reject" in alone


@pytest.mark.parametrize(
    "sources, collapsed",
    [
        # a network inside another, and two adjacent addresses: one interval set refuses them as given
        (["10.0.0.0/8", "10.20.0.0/16", "192.0.2.7", "192.0.2.6"], (["10.0.0.0/8", "192.0.2.6/31"], [])),
        (["fd00::/8", "fd00:1::/32"], ([], ["fd00::/8"])),
        ([], ([], [])),
    ],
)
def test_the_table_is_one_nft_accepts_with_sources_collapsed(tmp_path, sources, collapsed):
    assert firewall.sources_by_family(sources) == collapsed
    text, _ = firewall.rules([8080, 8443], sources)
    (tmp_path / "firewall.nft").write_text(text)
    checked = subprocess.run([NFT, "-c", "-f", str(tmp_path / "firewall.nft")], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr


def test_a_packet_routed_to_a_containers_port_is_judged_by_where_it_goes_dnat_or_not():
    text, _ = firewall.rules([8080], ["192.0.2.7"])
    forward = text[text.index("chain forward") : text.index("chain to_container")]
    assert 'oifname "docker0" tcp dport @inference_ports jump to_container' in forward
    assert 'oifname "br-*" tcp dport @inference_ports jump to_container' in forward
    rules = [line.strip() for line in text[text.index("chain to_container") :].splitlines()[1:] if line.strip()]
    assert rules == [
        'iifname "docker0" accept',
        'iifname "br-*" accept',
        "ip saddr @allowed_ipv4 accept",
        "reject with tcp reset",
        "}",
        "}",
    ]


def test_the_boot_unit_follows_nftables_service_whose_drop_in_loads_the_table_after_its_own_file():
    unit = firewall.unit_text("/etc/gpufleet/firewall.nft")
    assert "After=nftables.service\n" in unit and "ExecStart=/usr/sbin/nft -f /etc/gpufleet/firewall.nft\n" in unit
    drop_in = firewall.drop_in_text("/etc/gpufleet/firewall.nft")
    assert "ExecStartPost=-/usr/sbin/nft -f /etc/gpufleet/firewall.nft\n" in drop_in
    assert "ExecReload=-/usr/sbin/nft -f /etc/gpufleet/firewall.nft\n" in drop_in


def test_a_gateways_port_is_admitted_from_its_own_sources_with_or_without_service_ports(tmp_path):
    for ports in ([8443], []):
        gateway = {"name": "gateway", "comment": "clients", "ports": [9443], "sources": ["192.0.2.0/24", "192.0.2.9"]}
        text, _ = firewall.rules(ports, ["10.1.0.0/16"] if ports else [], [gateway])
        (tmp_path / "firewall.nft").write_text(text)
        checked = subprocess.run([NFT, "-c", "-f", str(tmp_path / "firewall.nft")], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stderr
        assert "elements = { 192.0.2.0/24 }" in text  # the address inside the network, collapsed
        input_chain = [line.strip() for line in text.split("chain input {", 1)[1].split("}", 1)[0].splitlines()]
        gateway_rules = [line for line in input_chain if "@gateway_ports" in line]
        assert gateway_rules == [
            "tcp dport @gateway_ports ip saddr @gateway_ipv4 accept",
            "tcp dport @gateway_ports reject with tcp reset",
        ]
        assert input_chain[-2] == gateway_rules[-1]  # refused after every admission
        assert ("chain forward" in text) == bool(ports)
