"""Component identities: what names a model in cache fingerprints."""

from __future__ import annotations

import json

from crepa.families.loading import component_identity, load_config


def fake_hub_cache(root, repo: str, revision: str) -> None:
    """A Hugging Face hub cache laid out as huggingface_hub writes it, holding `repo` at `revision`."""
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(revision)
    snapshot = folder / "snapshots" / revision / "vae"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan", "z_dim": len(revision)}))


def test_hub_id_identity_follows_the_cached_revision(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    fake_hub_cache(tmp_path, "org/video-model", "a" * 40)
    before = component_identity("org/video-model", "vae")
    assert before == {"hub_id": "org/video-model", "subfolder": "vae", "revision": "a" * 40}
    assert component_identity("org/video-model", "vae") == before
    fake_hub_cache(tmp_path, "org/video-model", "b" * 40)  # the model was updated and downloaded again
    assert component_identity("org/video-model", "vae")["revision"] == "b" * 40


def test_hub_id_missing_from_the_cache_has_no_revision(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    assert component_identity("org/elsewhere", "vae") == {"hub_id": "org/elsewhere", "subfolder": "vae",
                                                          "revision": None}


def test_hub_components_load_the_revision_their_identity_names(tmp_path, monkeypatch):
    from diffusers import AutoencoderKLWan

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fake_hub_cache(tmp_path, "org/video-model", "c" * 40)
    assert load_config(AutoencoderKLWan, "org/video-model", "vae")["z_dim"] == 40
