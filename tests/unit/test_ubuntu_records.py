"""The noble records of Canonical's precompiled NVIDIA module packages (tests/data/ubuntu/noble-archive.txt),
which no noble capture shows whole, compared field by field with the jammy `apt-cache show` captures of
the same packages (tests/data/ubuntu/lrm-apt-show-jammy.txt), kernel and branch put in."""

import re
from pathlib import Path

import pytest

from tests.fixtures.ubuntu_double import stanzas

DATA = Path(__file__).resolve().parents[1] / "data" / "ubuntu"
JAMMY = stanzas(DATA / "lrm-apt-show-jammy.txt")
NOBLE = {r["Package"]: r for r in stanzas(DATA / "noble-archive.txt")}
ABI_MODULES = sorted(p for p in NOBLE if re.fullmatch(r"linux-modules-nvidia-\d+-server-\d+\.\d+\.\d+-\d+-generic", p))


def depends_form(record):
    """A record's Depends with its kernel ABI, package version, branch and driver versions made names."""
    match = re.fullmatch(r"linux-modules-nvidia-(\d+)-server-(\d+\.\d+\.\d+-\d+)-generic", record["Package"])
    branch, abi = match.groups()
    form = re.sub(r"\s+", " ", record["Depends"])
    form = (
        form.replace(f"({'= ' + record['Version']})", "(= VERSION)")
        .replace(abi, "ABI")
        .replace(f"-{branch}-", "-BRANCH-")
    )
    form = re.sub(r"nvidia-kernel-common-BRANCH-server \(<= [^)]+\), ", "", form)  # one capture pins a ceiling too
    return re.sub(r"\(>= \d+\.\d+\.\d+\)", "(>= DRIVER)", form)


def test_the_captures_agree_with_each_other():
    assert len(JAMMY) == 2 and len({depends_form(r) for r in JAMMY}) == 1
    assert {r["Section"] for r in JAMMY} == {"restricted/kernel"}


@pytest.mark.parametrize("name", ABI_MODULES)
def test_a_noble_module_package_has_the_captured_form(name):
    record = NOBLE[name]
    assert record["Section"] == JAMMY[0]["Section"]
    assert depends_form(record) == depends_form(JAMMY[0])
    assert re.fullmatch(
        r"\d+\.\d+\.\d+-\d+\.\d+(~24\.04\.\d+)?\+1", record["Version"]
    )  # "+1", as noble-updates' 6.8.0-64.67+1 ([lrm])


def test_every_restricted_modules_package_is_in_the_restricted_component():
    names = [p for p in NOBLE if re.match(r"linux-(modules|objects|signatures)-nvidia-", p)]
    assert len(names) == 8 and ABI_MODULES
    assert {NOBLE[p]["Section"] for p in names} == {"restricted/kernel"}
