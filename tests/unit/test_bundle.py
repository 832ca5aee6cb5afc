"""Bundle manifests: a bundle that differs from its manifest is refused, naming the file."""

import hashlib
import json
import os
import subprocess

import pytest

from operations.core.errors import ConfigError
from operations.offline import bundle
from operations.offline.bundle import builder


def make(tmp_path, files):
    for path, data in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(data)
    manifest = {
        "format": 1,
        "files": {p: {"size": len(d), "sha256": bundle.sha256_file(tmp_path / p)} for p, d in files.items()},
        "images": [],
        "weights": {"tiny": "weights/tiny"},
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def test_intact_bundle_verifies_and_records(tmp_path):
    make(tmp_path, {"weights/tiny/a.gguf": b"x" * 1000, "apt/Packages": b"P"})
    assert len(bundle.verify(tmp_path)["files"]) == 2
    assert set(json.loads((tmp_path / bundle.manifest.VERIFIED).read_text())) == {"weights/tiny/a.gguf", "apt/Packages"}


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: p.unlink(), "weights/tiny/a.gguf: missing"),
        (lambda p: p.write_bytes(b"x" * 10), "weights/tiny/a.gguf: 10 bytes, the manifest says 1000"),
        (lambda p: p.write_bytes(b"y" * 1000), "weights/tiny/a.gguf: SHA-256 differs from the manifest (corrupt)"),
    ],
)
def test_damaged_file_is_named(tmp_path, damage, message):
    make(tmp_path, {"weights/tiny/a.gguf": b"x" * 1000})
    bundle.verify(tmp_path)
    damage(tmp_path / "weights/tiny/a.gguf")
    with pytest.raises(ConfigError) as error:
        bundle.verify(tmp_path)
    assert message in str(error.value) and error.value.field == "gpufleet_bundle"


def test_latest_image_in_manifest_is_refused(tmp_path):
    manifest = make(tmp_path, {"images/x.tar": b"t", "weights/tiny/a": b"a"})
    manifest["images"] = [{"name": "ollama/ollama:latest", "id": "sha256:" + "0" * 64, "file": "images/x.tar"}]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="must be pinned by tag or digest"):
        bundle.read_manifest(tmp_path)


def test_missing_manifest_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="no manifest.json"):
        bundle.read_manifest(tmp_path)


def hf_cache(root, commit="a" * 40):
    """A Hugging Face hub cache laid out as huggingface_hub writes it: refs, snapshots of links, blobs."""
    model = root / "models--tiny-org--tiny-model"
    (model / "refs").mkdir(parents=True)
    (model / "refs" / "main").write_text(commit)
    (model / "blobs").mkdir()
    (model / "snapshots" / commit / "tokenizer").mkdir(parents=True)
    for name, data in {"model.gguf": b"g" * 4096, "tokenizer/vocab.json": b"{}"}.items():
        blob = model / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (model / "snapshots" / commit / name).symlink_to(
            os.path.relpath(blob, (model / "snapshots" / commit / name).parent)
        )
    return model


def test_weights_from_a_hugging_face_cache_are_copied_whole(tmp_path):
    hf_cache(tmp_path / "hub")
    (tmp_path / "bundle.yaml").write_text("weights:\n  tiny:\n    hf_cache: hub\n    repo: tiny-org/tiny-model\n")
    manifest = builder.build(tmp_path / "bundle.yaml", tmp_path / "out", log=lambda *_: None)
    assert manifest["weights"] == {"tiny": "weights/tiny"}
    assert set(manifest["files"]) == {"weights/tiny/model.gguf", "weights/tiny/tokenizer/vocab.json"}
    copied = tmp_path / "out" / "weights" / "tiny" / "model.gguf"
    assert not copied.is_symlink() and copied.read_bytes() == b"g" * 4096
    assert manifest["files"]["weights/tiny/model.gguf"]["sha256"] == hashlib.sha256(b"g" * 4096).hexdigest()


def test_hugging_face_snapshot_with_a_missing_blob_or_revision_is_refused(tmp_path):
    model = hf_cache(tmp_path / "hub")
    with pytest.raises(ConfigError, match=r"^weights.tiny: tiny-org/tiny-model@v2: not in the Hugging Face cache"):
        builder.hf_snapshot(tmp_path / "hub", "tiny-org/tiny-model", "v2", field="weights.tiny")
    next((model / "blobs").iterdir()).unlink()
    with pytest.raises(ConfigError, match=r"its blob is missing \(an interrupted download\)"):
        builder.hf_snapshot(tmp_path / "hub", "tiny-org/tiny-model")


def ssh_key(tmp_path, name):
    key = tmp_path / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(key)], check=True)
    return key


@pytest.fixture
def signed(tmp_path):
    """A bundle signed by ops@site's key, and an allowed_signers file naming that key."""
    key = ssh_key(tmp_path, "ops")
    (tmp_path / "signers").write_text(
        f'ops@site namespaces="{bundle.manifest.NAMESPACE}" {(tmp_path / "ops.pub").read_text()}'
    )
    make(tmp_path / "b", {"weights/tiny/a.gguf": b"x" * 1000})
    builder.sign(tmp_path / "b", key)
    return tmp_path


def test_signed_manifest_names_its_signer(signed):
    assert bundle.check_signature(signed / "b", signed / "signers") == "ops@site"


def test_manifest_altered_after_signing_is_refused(signed):
    manifest = json.loads((signed / "b" / "manifest.json").read_text())
    manifest["files"]["weights/tiny/a.gguf"]["sha256"] = "0" * 64
    (signed / "b" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=r"made by ops@site's key, but not over this manifest.json"):
        bundle.check_signature(signed / "b", signed / "signers")


def test_signature_by_another_key_or_none_is_refused(signed):
    builder.sign(signed / "b", ssh_key(signed, "intruder"))
    with pytest.raises(ConfigError, match=r"manifest.json.sig: not made by any key in .*signers"):
        bundle.check_signature(signed / "b", signed / "signers")
    (signed / "b" / bundle.SIGNATURE).unlink()
    with pytest.raises(ConfigError, match=r"manifest.json.sig: missing, and gpufleet_bundle_signers asks"):
        bundle.check_signature(signed / "b", signed / "signers")


def test_build_signs_and_a_changed_unsigned_rebuild_drops_the_old_signature(signed):
    hf_cache(signed / "hub")
    spec = signed / "bundle.yaml"
    spec.write_text("weights:\n  tiny:\n    hf_cache: hub\n    repo: tiny-org/tiny-model\n")
    builder.build(spec, signed / "out", log=lambda *_: None, sign_key=signed / "ops")
    assert bundle.check_signature(signed / "out", signed / "signers") == "ops@site"
    builder.build(spec, signed / "out", log=lambda *_: None)  # same manifest: the signature still holds
    assert (signed / "out" / bundle.SIGNATURE).exists()
    spec.write_text("weights:\n  tiny:\n    from: hub/models--tiny-org--tiny-model/blobs\n")
    builder.build(spec, signed / "out", log=lambda *_: None)
    assert not (signed / "out" / bundle.SIGNATURE).exists()
