"""gpufleet-hf-fetch with huggingface_hub's real client (the pinned version) against the hub double
on loopback: a fresh fetch, a damaged file fetched again, a resumed download, the named errors."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.hub_double import hub as hub_double

FETCH = Path(__file__).resolve().parents[2] / "templates" / "gpufleet-hf-fetch"
TOKEN = "hf_lab_token_0123456789"


@pytest.fixture
def hub(tmp_path):
    repo = tmp_path / "repo"
    (repo / "sub").mkdir(parents=True)
    (repo / "model.gguf").write_bytes(os.urandom(3 << 20))
    (repo / "config.json").write_text('{"arch": "llama"}\n')
    (repo / "sub" / "tokenizer.json").write_text('{"vocab": []}\n')
    hub, server, cdn = hub_double.serve({"lab/tiny": repo}, TOKEN)
    yield hub, f"http://127.0.0.1:{server.server_address[1]}", repo
    server.shutdown()
    cdn.shutdown()


def fetch(endpoint, dest, *args, token=TOKEN, tmp=None):
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(dest.parent / "hf-home")}
    token_args = []
    if token:
        token_file = dest.parent / "token"
        token_file.write_text(token + "\n")
        token_args = ["--token-file", str(token_file)]
    return subprocess.run(
        [sys.executable, str(FETCH), *args, *token_args], env=env, capture_output=True, text=True, timeout=120
    )


def commit(hub):
    return hub.repos["lab/tiny"].commit


def test_fresh_fetch_lands_every_file_read_only_with_its_record(hub, tmp_path):
    hub, endpoint, repo = hub
    dest = tmp_path / "vol"
    result = fetch(endpoint, dest, "fetch", "lab/tiny", commit(hub), str(dest))
    assert result.returncode == 0, result.stderr
    record = json.loads((dest / ".gpufleet-staged.json").read_text())
    assert sorted(record) == ["config.json", "model.gguf", "sub/tokenizer.json"]
    for path, (_size, _mtime, sha256) in record.items():
        assert (dest / path).read_bytes() == (repo / path).read_bytes()
        assert sha256 == hashlib.sha256((repo / path).read_bytes()).hexdigest()
        assert oct((dest / path).stat().st_mode & 0o777) == "0o444"
    assert json.loads((dest / ".gpufleet-hf.json").read_text()) == {"repo": "lab/tiny", "commit": commit(hub)}
    # The LFS file came from the "CDN" origin, not from the hub's own port; the small ones from the
    # hub's resolve cache, after the 307 the Hub answers for them.
    assert any(path.startswith("/xet-bridge-us/") for _, path, _ in hub.requests)
    cached = {path for method, path, _ in hub.requests if method == "GET" and path.startswith("/api/resolve-cache/")}
    assert cached == {
        f"/api/resolve-cache/models/lab/tiny/{commit(hub)}/{p}" for p in ("config.json", "sub/tokenizer.json")
    }


def test_branch_resolves_to_its_commit(hub, tmp_path):
    hub, endpoint, _ = hub
    result = fetch(endpoint, tmp_path / "x", "resolve", "lab/tiny", "main")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == commit(hub)


def test_a_tag_and_a_pull_request_resolve_to_their_own_commits_and_trees(tmp_path):
    main, tagged, proposed = (tmp_path / name for name in ("main", "v1", "pr"))
    for root, model in ((main, b"main" * 999), (tagged, b"v1.0" * 777), (proposed, b"pr-1" * 555)):
        root.mkdir()
        (root / "model.safetensors").write_bytes(model)
        (root / "config.json").write_text(f'{{"from": "{root.name}"}}\n')
    (tagged / "only-in-v1.txt").write_text("v1\n")
    hub, server, cdn = hub_double.serve(
        {"lab/tiny": main}, TOKEN, refs={"lab/tiny": {"v1.0": tagged, "refs/pr/1": proposed}}
    )
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        commits = {}
        for ref in ("main", "v1.0", "refs/pr/1"):
            result = fetch(endpoint, tmp_path / "x", "resolve", "lab/tiny", ref)
            assert result.returncode == 0, result.stderr
            commits[ref] = result.stdout.strip()
        assert len(set(commits.values())) == 3 and commits["main"] == commit(hub)
        dest = tmp_path / "vol"
        assert fetch(endpoint, dest, "fetch", "lab/tiny", commits["main"], str(dest)).returncode == 0
        moved = fetch(endpoint, dest, "fetch", "lab/tiny", commits["v1.0"], str(dest))
        assert moved.returncode == 0, moved.stderr
        assert sorted(json.loads((dest / ".gpufleet-staged.json").read_text())) == [
            "config.json", "model.safetensors", "only-in-v1.txt",
        ]  # fmt: skip
        assert (dest / "model.safetensors").read_bytes() == (tagged / "model.safetensors").read_bytes()
        assert json.loads((dest / ".gpufleet-hf.json").read_text())["commit"] == commits["v1.0"]
        # the pull request's ref went over the wire quoted, as the client sends it
        assert ("GET", "/api/models/lab/tiny/revision/refs%2Fpr%2F1", None) in hub.requests
    finally:
        server.shutdown()
        cdn.shutdown()


def test_a_tree_of_several_pages_is_read_whole(hub, tmp_path):
    hub, endpoint, _ = hub
    hub.tree_page = 1
    dest = tmp_path / "vol"
    result = fetch(endpoint, dest, "fetch", "lab/tiny", commit(hub), str(dest))
    assert result.returncode == 0, result.stderr
    assert sorted(json.loads((dest / ".gpufleet-staged.json").read_text())) == [
        "config.json", "model.gguf", "sub/tokenizer.json",
    ]  # fmt: skip
    pages = [path for method, path, _ in hub.requests if method == "GET" and "/tree/" in path]
    assert len(pages) == 4  # a directory and three files, one entry a page


def test_damaged_file_is_fetched_again_and_intact_ones_are_kept(hub, tmp_path):
    hub, endpoint, repo = hub
    dest = tmp_path / "vol"
    assert fetch(endpoint, dest, "fetch", "lab/tiny", commit(hub), str(dest)).returncode == 0
    model = dest / "model.gguf"
    model.chmod(0o644)
    with open(model, "r+b") as handle:
        handle.seek(1000)
        handle.write(b"XXXX")
    hub.requests.clear()
    result = fetch(endpoint, dest, "fetch", "lab/tiny", commit(hub), str(dest))
    assert result.returncode == 0, result.stderr
    assert "model.gguf: SHA-256 differs from the hub's (LFS); fetching it again" in result.stderr
    assert model.read_bytes() == (repo / "model.gguf").read_bytes()
    fetched = {path for method, path, _ in hub.requests if method == "GET"}
    assert any(path.startswith("/xet-bridge-us/") for path in fetched)
    assert not any("config.json" in path for path in fetched)  # intact: not downloaded again


def test_interrupted_download_resumes_with_a_range_request(hub, tmp_path):
    hub, endpoint, repo = hub
    dest = tmp_path / "vol"
    sha256 = hashlib.sha256((repo / "model.gguf").read_bytes()).hexdigest()
    # What a run cut off half-way leaves: the part file of the file's current version (its ETag).
    part = dest / ".cache" / "gpufleet" / f"model.gguf.{sha256}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes((repo / "model.gguf").read_bytes()[: 1 << 20])
    result = fetch(endpoint, dest, "fetch", "lab/tiny", commit(hub), str(dest))
    assert result.returncode == 0, result.stderr
    assert f"model.gguf: resumed at byte {1 << 20}" in result.stderr
    assert (dest / "model.gguf").read_bytes() == (repo / "model.gguf").read_bytes()
    entry = hub.repos["lab/tiny"].files["model.gguf"]
    storage = f"/xet-bridge-us/{hub.repos['lab/tiny'].id}/{entry['xetHash']}"
    assert ("GET", storage, f"bytes={1 << 20}-") in hub.requests
    assert not part.exists()


def test_token_never_reaches_the_storage_origin(hub, tmp_path):
    hub, endpoint, _ = hub
    dest = tmp_path / "vol"
    assert fetch(endpoint, dest, "fetch", "lab/tiny", commit(hub), str(dest)).returncode == 0
    assert hub.cdn_authorizations == [None]


@pytest.mark.parametrize(
    "args, token, message",
    [
        (["fetch", "lab/tiny", "f" * 40], TOKEN, "lab/tiny@" + "f" * 40 + " at {endpoint}: no such revision"),
        (
            ["fetch", "lab/nothere", "main"],
            TOKEN,
            "lab/nothere@main at {endpoint}: no such repository, or not readable",
        ),
        (["fetch", "lab/tiny", "main"], "hf_wrong", "lab/tiny@main at {endpoint}: no such repository, or not readable"),
        (["fetch", "lab/tiny", "main"], None, "lab/tiny@main at {endpoint}: no such repository, or not readable"),
    ],
)
def test_errors_name_the_repository_and_revision(hub, tmp_path, args, token, message):
    _, endpoint, _ = hub
    dest = tmp_path / "vol"
    result = fetch(endpoint, dest, *args, str(dest), token=token)
    assert result.returncode == 1
    assert f"gpufleet-hf-fetch: {message.format(endpoint=endpoint)}" in result.stderr, result.stderr
    assert not (dest / ".gpufleet-staged.json").exists()


def test_unreachable_hub_is_named(tmp_path):
    dest = tmp_path / "vol"
    result = fetch("http://127.0.0.1:9", dest, "fetch", "lab/tiny", "a" * 40, str(dest))
    assert result.returncode == 1 and "lab/tiny@" in result.stderr and "http://127.0.0.1:9" in result.stderr, (
        result.stderr
    )


def test_no_room_is_refused_before_any_download(hub, tmp_path):
    import shutil

    hub, endpoint, _ = hub
    dest = tmp_path / "vol"
    # What the volume needs on top of this cannot fit, even if other writers free a GiB meanwhile.
    margin = shutil.disk_usage(tmp_path).free + (1 << 30)
    result = fetch(endpoint, dest, "fetch", "lab/tiny", commit(hub), str(dest), "--margin", str(margin))
    assert result.returncode == 1
    assert (
        f"gpufleet-hf-fetch: {dest}: no room: {(3 << 20) + 18 + 14} bytes to receive + {margin} margin" in result.stderr
    ), result.stderr
    assert not any("/resolve/" in path or path.startswith("/lfs/") for _, path, _ in hub.requests)
    assert not (dest / "model.gguf").exists()


def test_patterns_select_files_as_snapshot_download_does_and_a_change_removes_the_rest(hub, tmp_path):
    hub, endpoint, _ = hub
    dest = tmp_path / "vol"
    first = fetch(endpoint, dest, "fetch", "lab/tiny", commit(hub), str(dest), "--ignore", "sub/", "--ignore", "*.json")
    assert first.returncode == 0, first.stderr
    assert "(2 left out by the patterns)" in first.stdout
    assert sorted(json.loads((dest / ".gpufleet-staged.json").read_text())) == ["model.gguf"]
    assert json.loads((dest / ".gpufleet-hf.json").read_text()) == {
        "repo": "lab/tiny",
        "commit": commit(hub),
        "ignore_patterns": ["sub/", "*.json"],
    }
    narrower = fetch(endpoint, dest, "fetch", "lab/tiny", commit(hub), str(dest), "--allow", "*.json")
    assert narrower.returncode == 0, narrower.stderr
    kept = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file() and ".cache" not in p.parts)
    # the model the first patterns kept is gone; "*.json" takes sub/tokenizer.json too (fnmatch's "*" crosses "/")
    assert kept == [".gpufleet-hf.json", ".gpufleet-staged.json", "config.json", "sub/tokenizer.json"]


def test_patterns_that_leave_nothing_are_refused(hub, tmp_path):
    hub, endpoint, _ = hub
    dest = tmp_path / "vol"
    refused = fetch(endpoint, dest, "fetch", "lab/tiny", commit(hub), str(dest), "--ignore", "*")
    assert refused.returncode == 1 and "the patterns leave none of its 3 files" in refused.stderr
    assert not dest.exists()  # refused before anything was written


def test_an_allow_pattern_that_matches_no_file_is_named_before_anything_is_written(hub, tmp_path):
    hub, endpoint, _ = hub
    dest = tmp_path / "vol"
    refused = fetch(
        endpoint, dest, "fetch", "lab/tiny", commit(hub), str(dest), "--allow", "*.gguf", "--allow", "*.safetensor"
    )
    assert refused.returncode == 1, refused.stderr
    assert f"lab/tiny@{commit(hub)[:12]}: allow_patterns '*.safetensor' matches none of its 3 files" in refused.stderr
    assert not dest.exists()


@pytest.mark.parametrize(
    "allow, ignore",
    [
        (None, ["original/"]),
        (["*.safetensors", "*.json"], None),
        (["*.json"], ["sub/*"]),
        ("model.gguf", None),
        (None, "*.GGUF"),
        (["sub/"], ["*tokenizer*"]),
    ],
)
def test_gpufleets_own_reading_of_the_patterns_is_the_clients(allow, ignore):
    """The control node refuses a service whose model the patterns leave out (hub.selected): it must
    decide as huggingface_hub's filter_repo_objects does, which the fetcher uses on the host."""
    from huggingface_hub.utils import filter_repo_objects

    from operations.weights import hub as hf_hub

    paths = [
        "model.gguf", "config.json", "sub/tokenizer.json", "original/consolidated.00.pth", "original/params.json",
        "model-00001-of-00002.safetensors", "README.md", "sub/deeper/x.json",
    ]  # fmt: skip
    theirs = list(filter_repo_objects(paths, allow_patterns=allow, ignore_patterns=ignore))
    assert [p for p in paths if hf_hub.selected(p, allow, ignore)] == theirs
