"""The README and docs/ say only what the tree has: every relative link resolves, every path they show
in backquotes exists, and every test they cite (a test file, ``file.py::test_name`` or a bare
``test_name``) is there."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TOP = ("operations/", "templates/", "tests/", "bench/", "scripts/", "group_data/", "inventories/", "docs/")
# Paths the reader makes: their own inventory, copied from inventories/prod.py as the README says.
THEIRS = {"inventories/mysite.py"}
PLACEHOLDER = re.compile(r"[A-Z]{3,}")  # bench/results/PART.json, /etc/pve/lxc/VMID.conf
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE = re.compile(r"`([^`\n]+)`")
CITED_TEST = re.compile(r"\b(test_\w+\.py)::(test_\w+)|\b(test_\w+\.py)\b|(?<![\w./:])(test_[a-z0-9_]+)\b(?!\.py)")


def known_test_files():
    """Each test file's name and the text of every file of that name (tests/unit and tests/e2e share some)."""
    files = {}
    for path in sorted((REPO / "tests").rglob("test_*.py")):
        files[path.name] = files.get(path.name, "") + path.read_text() + "\n"
    return files


def defined_tests():
    return {match for text in known_test_files().values() for match in re.findall(r"^\s*def (test_\w+)\(", text, re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_relative_links_resolve(page):
    text = page.read_text()
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        assert (page.parent / target.split("#")[0]).exists(), f"{page.name}: link to {target} resolves to nothing"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_paths_shown_exist(page):
    for code in CODE.findall(page.read_text()):
        for word in code.split():
            path = word.split("::")[0].rstrip(".,:;)")
            if (
                not path.startswith(TOP)
                or any(mark in path for mark in "*<>{$…")
                or path in THEIRS
                or PLACEHOLDER.search(path)
            ):
                continue
            assert (REPO / path).exists(), f"{page.name}: {path} does not exist"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_cited_tests_exist(page):
    files, tests = known_test_files(), defined_tests()
    text = "\n".join(CODE.findall(page.read_text()))
    for in_file, name, file_only, bare in CITED_TEST.findall(text):
        if in_file:
            assert in_file in files, f"{page.name}: no test file {in_file}"
            assert re.search(rf"^\s*def {name}\(", files[in_file], re.M), f"{page.name}: {in_file} has no {name}"
        elif file_only:
            assert file_only in files, f"{page.name}: no test file {file_only}"
        elif bare:
            assert bare in tests or bare + ".py" in files, f"{page.name}: no test named {bare}"


def test_the_docs_cite_tests_at_all():
    text = "\n".join(page.read_text() for page in PAGES)
    assert len(CITED_TEST.findall(text)) > 50
