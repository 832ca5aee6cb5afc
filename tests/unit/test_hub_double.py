"""The hub double answers as the live Hub did in captured answers (tests/data/hub/captured-responses.txt):
each section's question asked of the double, its status, header names and the shapes of Location and
JSON compared with the capture."""

import hashlib
import http.client
import json
import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.fixtures.hub_double import hub as hub_double

CAPTURES = Path(__file__).resolve().parents[1] / "data" / "hub" / "captured-responses.txt"
TOKEN = "hf_lab_token_0123456789"
REPO = "lab/tiny"


def captured():
    """Section name -> {"status": int, "headers": {name: value}, "left_out": set, "body": str}."""
    sections, current = {}, None
    for line in CAPTURES.read_text().splitlines():
        if line.startswith("## "):
            current = sections[line[3:].split(":")[0]] = {"status": None, "headers": {}, "left_out": set(), "body": ""}
        elif current is None or not line or line.startswith("#"):
            continue
        elif line.startswith("HTTP/"):
            current["status"] = int(line.split()[1])
        elif line.startswith("left-out: "):
            current["left_out"].add(line.split()[1])
        elif line.startswith(("[", "{")):
            current["body"] = line
        else:
            name, value = line.split(":", 1)
            current["headers"][name.lower()] = value.strip()
    return sections


CAPTURED = captured()


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    (repo / "sub").mkdir()
    (repo / "model.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 64)
    (repo / "config.json").write_text('{"arch": "llama"}\n')
    (repo / "sub" / "tokenizer.json").write_text('{"vocab": []}\n')
    hub, server, cdn = hub_double.serve({REPO: repo}, TOKEN)
    yield hub, server.server_address[1], cdn.server_address[1], repo
    server.shutdown()
    cdn.shutdown()


def ask(port, method, path, token=TOKEN):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request(method, path, headers={"Authorization": f"Bearer {token}"} if token else {})
    response = connection.getresponse()
    body = response.read()
    connection.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, body


def assert_as_captured(section, status, headers):
    capture = CAPTURED[section]
    assert status == capture["status"], section
    missing = set(capture["headers"]) - capture["left_out"] - set(headers)
    assert not missing, (section, missing)


def test_every_capture_is_read_and_names_its_status():
    assert set(CAPTURED) == {
        "lfs-resolve", "storage-head", "small-resolve", "resolve-cache-head", "resolve-cache-branch",
        "tree-missing-directory", "tree-level", "tree-lfs-entry",
    }  # fmt: skip
    assert all(c["status"] or c["body"] for c in CAPTURED.values())


def test_an_lfs_file_redirects_to_signed_storage_as_captured(hub):
    hub, port, cdn_port, repo = hub
    status, headers, _ = ask(port, "HEAD", f"/{REPO}/resolve/main/model.gguf")
    assert_as_captured("lfs-resolve", status, headers)
    data = (repo / "model.gguf").read_bytes()
    assert headers["x-linked-etag"] == f'"{hashlib.sha256(data).hexdigest()}"'
    assert headers["x-linked-size"] == str(len(data))
    assert headers["x-repo-commit"] == hub.repos[REPO].commit
    shape = r"/xet-bridge-us/([0-9a-f]{24})/([0-9a-f]{64})"
    assert re.fullmatch(shape, urlsplit(CAPTURED["lfs-resolve"]["headers"]["location"]).path)
    location = urlsplit(headers["location"])
    assert location.port == cdn_port != port  # another origin
    xet = re.fullmatch(shape, location.path).group(2)
    assert {"X-Xet-Cas-Uid", "Expires", "Policy", "Signature"} <= {p.split("=")[0] for p in location.query.split("&")}
    status, storage, _ = ask(cdn_port, "HEAD", f"{location.path}?{location.query}", token=None)
    assert_as_captured("storage-head", status, storage)
    assert storage["etag"] == f'"{xet}"' != headers["x-linked-etag"]  # the xetHash, not the SHA-256
    assert storage["content-length"] == str(len(data))


def test_storage_refuses_a_url_whose_signature_or_resource_was_changed(hub):
    _, port, cdn_port, _ = hub
    _, headers, _ = ask(port, "HEAD", f"/{REPO}/resolve/main/model.gguf")
    location = urlsplit(headers["location"])
    tampered = location.query.replace("Signature=", "Signature=0")
    assert ask(cdn_port, "GET", f"{location.path}?{tampered}", token=None)[0] == 403
    other = location.path[:-1] + ("0" if location.path[-1] != "0" else "1")
    assert ask(cdn_port, "GET", f"{other}?{location.query}", token=None)[0] == 403


def test_a_small_file_redirects_to_the_resolve_cache_on_the_same_origin_as_captured(hub):
    hub, port, _, repo = hub
    status, headers, body = ask(port, "HEAD", f"/{REPO}/resolve/main/config.json")
    assert_as_captured("small-resolve", status, headers)
    commit = hub.repos[REPO].commit
    blob = hub.repos[REPO].files["config.json"]["oid"]
    # The captured Location, with its repository, commit, file and blob id put in ours:
    expected = re.sub(r"Qwen/Qwen3-32B|Qwen%2FQwen3-32B", lambda m: REPO if "/" in m[0] else "lab%2Ftiny",
                      CAPTURED["small-resolve"]["headers"]["location"])  # fmt: skip
    expected = expected.replace("9216db5781bf21249d130ec9da846c4624c16137", commit)
    expected = expected.replace("d66d65fbc7960c2b3c254293f74df73b47fef6d3", blob)
    assert headers["location"] == expected
    status, cached, _ = ask(port, "HEAD", headers["location"])
    assert status == CAPTURED["resolve-cache-head"]["status"]
    assert cached["etag"] == f'"{blob}"' and cached["x-repo-commit"] == commit
    assert ask(port, "GET", headers["location"])[2] == (repo / "config.json").read_bytes()


def test_the_resolve_cache_refuses_a_branch_name_as_captured(hub):
    _, port, _, _ = hub
    status, _, _ = ask(port, "GET", f"/api/resolve-cache/models/{REPO}/main/config.json")
    assert status == CAPTURED["resolve-cache-branch"]["status"]


def test_a_tree_lists_directories_then_files_with_the_captured_fields(hub):
    _, port, _, _ = hub
    status, _, body = ask(port, "GET", f"/api/models/{REPO}/tree/main")
    assert status == 200
    ours, theirs = json.loads(body), json.loads(CAPTURED["tree-level"]["body"])
    assert [e["type"] for e in ours] == ["directory", "file", "file"]
    assert [e["path"] for e in ours] == ["sub", "config.json", "model.gguf"]
    kinds = {(e["type"], tuple(sorted(e))) for e in theirs}
    assert {(e["type"], tuple(sorted(e))) for e in ours if "lfs" not in e} <= kinds
    assert all(e["size"] == 0 for e in ours if e["type"] == "directory")
    lfs_entry = next(e for e in ours if "lfs" in e)
    captured_entry = json.loads(CAPTURED["tree-lfs-entry"]["body"])
    assert set(captured_entry) <= set(lfs_entry) and set(captured_entry["lfs"]) == set(lfs_entry["lfs"])


def test_a_missing_directory_in_the_tree_is_a_404_as_captured(hub):
    _, port, _, _ = hub
    status, headers, _ = ask(port, "GET", f"/api/models/{REPO}/tree/main/additional?recursive=False&expand=False")
    assert status == CAPTURED["tree-missing-directory"]["status"]
    assert headers["x-error-code"] == "EntryNotFound"


def test_a_long_tree_comes_in_pages_joined_by_a_link_header(hub):
    hub, port, _, _ = hub
    hub.tree_page = 2
    try:
        path, seen, pages = f"/api/models/{REPO}/tree/main?recursive=true&expand=false", [], 0
        while path and pages < 10:
            status, headers, body = ask(port, "GET", path)
            assert status == 200
            seen += [e["path"] for e in json.loads(body)]
            pages += 1
            link = re.fullmatch(r'<([^>]+)>; rel="next"', headers.get("link", ""))
            path = urlsplit(link.group(1))._replace(scheme="", netloc="").geturl() if link else None
    finally:
        hub.tree_page = hub_double.TREE_PAGE
    assert pages == 2 and seen == ["sub", "config.json", "model.gguf", "sub/tokenizer.json"]
