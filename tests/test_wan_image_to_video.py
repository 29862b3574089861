"""Wan image-to-video from the cache: the first-frame condition and CLIP embeddings precompute stores are what
WanImageToVideoPipeline builds for that frame, training reads them from the cache alone, and the pipeline loads the
LoRA and generates from an image. Wan 2.2 TI2V-5B's VAE and per-token timesteps go through the same code.

WanImageToVideoPipeline (diffusers 0.42.1) cleans prompts with ftfy without checking that it is installed, and it is
not here: its calls get the cached text as `prompt_embeds` (WanPipeline's identical encoding is checked against the
cache in test_family_conformance)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import write_dataset
from PIL import Image
from test_train import train_config
from wan_variants import CLIP_WIDTH, save_image_to_video_pipeline, save_ti2v_pipeline

from crepa.cache.export import export_view
from crepa.cache.store import CacheStore
from crepa.cache.view import CacheView
from crepa.cache.wds import iter_webdataset
from crepa.families import Conditioning, get_family
from precompute.config import PrecomputeConfig, TeacherSettings
from precompute.decode import decode_segment
from precompute.pipeline import run_precompute
from train.data import collate, to_tensors
from train.lora import add_lora, lora_layers
from train.trainer import run_train


@pytest.fixture(scope="module")
def i2v_pipeline(tmp_path_factory, tiny_models) -> str:
    return save_image_to_video_pipeline(tiny_models["wan"], str(tmp_path_factory.mktemp("wan_i2v") / "pipe"))


@pytest.fixture(scope="module")
def i2v_cache(tmp_path_factory, tiny_models, i2v_pipeline) -> tuple[str, str]:
    """(a one-clip cache made with the image-to-video pipeline, the dataset folder)."""
    root = tmp_path_factory.mktemp("i2v_cache")
    summary = run_precompute(PrecomputeConfig(
        dataset_config=write_dataset(root, clips=1), family="wan", out=str(root / "cache"), model=i2v_pipeline,
        device="cpu", decode_workers=0, teacher=TeacherSettings(encoder=tiny_models["dinov2"], image_size=56)))
    assert summary.computed == {"latents": 1, "teacher": 1, "condition": 1, "text": 2}  # caption, empty prompt
    return str(root / "cache"), str(root)


def cached_clip(cache: str, dataset_root: str) -> tuple[dict, str, int, np.ndarray]:
    """(the view's sample, its caption, the cached text length, the clip's frames (F, H, W, 3) as precompute
    decoded them)."""
    store = CacheStore.open(cache)
    view = CacheView(store, "wan", with_teacher=False)
    (clip,) = view.clips
    (plan,) = store.plans().values()
    (entry,) = plan["clips"]
    frames = decode_segment(os.path.join(dataset_root, "clips", entry["source"]), entry["frame_indices"],
                            (entry["width"], entry["height"]), entry["crop"])
    return view.load(clip), clip.caption, view.text.attrs["max_length"], frames


def test_cached_condition_is_what_the_pipeline_builds_for_the_first_frame(i2v_cache, i2v_pipeline):
    from diffusers import WanImageToVideoPipeline

    adapter = get_family("wan")
    sample, _, text_length, frames = cached_clip(*i2v_cache)
    batch = collate([to_tensors(sample)], text_length)
    pipe = WanImageToVideoPipeline.from_pretrained(i2v_pipeline)
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda _m, _a, kwargs: calls.append(kwargs), with_kwargs=True)
    with torch.no_grad():
        pipe(image=Image.fromarray(frames[0]), prompt_embeds=batch["text"], num_frames=len(frames),
             height=frames.shape[1], width=frames.shape[2], num_inference_steps=1, guidance_scale=1.0,
             output_type="latent")
    theirs = calls[0]
    channels = sample["latents"].shape[0]
    condition = torch.from_numpy(sample["condition"])
    assert condition.shape == (channels + 4, *sample["latents"].shape[1:])  # t_c = 4 mask channels + z_dim
    torch.testing.assert_close(theirs["hidden_states"][0, channels:], condition, rtol=0, atol=1e-5)
    image_embeds = torch.from_numpy(sample["image_embeds"])
    assert image_embeds.shape == (5, CLIP_WIDTH)  # CLS + 2x2 patches of the 28 px CLIP input
    torch.testing.assert_close(theirs["encoder_hidden_states_image"][0], image_embeds, rtol=0, atol=1e-5)

    # the transformer's input built from the cache alone, on the pipeline's noise and timestep
    noisy = theirs["hidden_states"][:, :channels]
    ours = adapter.transformer_kwargs(pipe.transformer, noisy, theirs["timestep"],
                                      Conditioning.from_batch(batch, noisy.device))
    with torch.no_grad():
        torch.testing.assert_close(pipe.transformer(**ours)[0], pipe.transformer(**theirs)[0], rtol=0, atol=1e-5)


def test_trains_from_the_cache_alone_and_the_pipeline_generates_from_an_image(i2v_cache, i2v_pipeline, tiny_models,
                                                                            tmp_path, monkeypatch):
    import diffusers
    import transformers
    from diffusers import WanImageToVideoPipeline
    from safetensors.torch import load_file

    cache, dataset_root = i2v_cache
    with monkeypatch.context() as patched:  # training never builds the VAE, an image or text encoder, or DINOv2
        def forbidden(*args, **kwargs):
            raise AssertionError("training must not build this model")

        for cls in (diffusers.AutoencoderKLWan, transformers.UMT5EncoderModel, transformers.CLIPVisionModel,
                    transformers.Dinov2Model):
            patched.setattr(cls, "__init__", forbidden)
        out = str(tmp_path / "run")
        run_train(train_config(cache, tiny_models, out, model=i2v_pipeline, max_train_steps=2, learning_rate=1e-2))

    adapter = get_family("wan")
    trained = WanImageToVideoPipeline.from_pretrained(i2v_pipeline).transformer
    add_lora(trained, 4, 4.0, 0.0, list(adapter.default_lora_targets))
    trained.load_state_dict(load_file(os.path.join(out, "checkpoint-2", "trainable.safetensors")), strict=False)
    ours = lora_layers(trained)
    pipe = WanImageToVideoPipeline.from_pretrained(i2v_pipeline)
    pipe.load_lora_weights(out)
    loaded = lora_layers(pipe.transformer)
    # diffusers adds zero LoRAs on the image keys/values (add_k_proj, add_v_proj) to a LoRA that has none
    assert set(ours) <= set(loaded) and all(".add_" in name for name in set(loaded) - set(ours))
    for name, layer in loaded.items():
        (adapter_name,) = layer.lora_A.keys()
        expected = ours[name].get_delta_weight("default") if name in ours else 0 * layer.get_delta_weight(adapter_name)
        torch.testing.assert_close(layer.get_delta_weight(adapter_name), expected, rtol=1e-5, atol=1e-7)

    sample, _, text_length, frames = cached_clip(cache, dataset_root)
    text = collate([to_tensors(sample)], text_length)["text"]

    def generate(pipeline):
        with torch.no_grad():
            return pipeline(image=Image.fromarray(frames[0]), prompt_embeds=text, num_frames=len(frames),
                            height=frames.shape[1], width=frames.shape[2], num_inference_steps=2, guidance_scale=1.0,
                            output_type="pt", generator=torch.Generator().manual_seed(0)).frames
    video = generate(pipe)
    assert video.shape == (1, len(frames), 3, frames.shape[1], frames.shape[2]) and torch.isfinite(video).all()
    assert not torch.allclose(video, generate(WanImageToVideoPipeline.from_pretrained(i2v_pipeline)), atol=1e-4)


def test_shards_carry_the_condition(i2v_cache, tmp_path):
    cache, _ = i2v_cache
    view = CacheView(CacheStore.open(cache), "wan", with_teacher=False)
    expected = view.load(view.clips[0])
    urls = export_view(cache, str(tmp_path / "shards"), with_teacher=False)
    (sample,) = iter_webdataset(urls)
    assert sample["json"]["condition_set"] == view.condition.fingerprint
    for name in ("condition", "image_embeds"):
        np.testing.assert_array_equal(sample[f"{name}.npy"], expected[name])


def test_a_text_to_video_cache_is_refused_by_an_image_to_video_transformer(trained_cache, tiny_models,
                                                                           i2v_pipeline, tmp_path):
    with pytest.raises(ValueError, match="cache latents have 4 channels but the wan transformer takes 12"):
        run_train(train_config(trained_cache, tiny_models, str(tmp_path / "run"), model=i2v_pipeline))


def test_ti2v_vae_and_per_token_timesteps_work_through_the_configs(tmp_path, tiny_models):
    """A Wan 2.2 TI2V-5B-like pipeline: residual VAE with 16x spatial compression and its own z_dim; its pipeline
    gives the transformer one timestep per token (`expand_timesteps`), training one per clip: the same forward."""
    from diffusers import WanPipeline

    from precompute.synthetic import write_captioned_clips

    model = save_ti2v_pipeline(tiny_models["wan"], str(tmp_path / "ti2v"))
    write_captioned_clips(tmp_path / "clips", count=1, frames=9)
    config = tmp_path / "dataset.toml"
    config.write_text('[general]\nresolutions = [[64, 32]]\ntarget_frames = [9]\nframe_extraction = "head"\n\n'
                      '[[datasets]]\nname = "t"\nvideo_directory = "clips"\n')
    cache = str(tmp_path / "cache")
    run_precompute(PrecomputeConfig(dataset_config=str(config), family="wan", out=cache, model=model, device="cpu",
                                    decode_workers=0, skip_teacher=True))
    view = CacheView(CacheStore.open(cache), "wan", with_teacher=False)
    sample = view.load(view.clips[0])
    assert sample["latents"].shape == (6, 3, 2, 4)  # z_dim 6, 9 frames -> 3, 32 x 64 px / 16
    assert view.condition is None

    pipe = WanPipeline.from_pretrained(model)
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda _m, _a, kwargs: calls.append(kwargs), with_kwargs=True)
    with torch.no_grad():
        pipe(prompt=view.clips[0].caption, num_frames=9, height=32, width=64, num_inference_steps=1,
             guidance_scale=1.0, output_type="latent")
    theirs = calls[0]
    assert theirs["timestep"].shape == (1, 3 * 1 * 2)  # one per token (frames x h/2 x w/2 patches)
    adapter = get_family("wan")
    batch = collate([to_tensors(sample)], view.text.attrs["max_length"])
    ours = adapter.transformer_kwargs(pipe.transformer, theirs["hidden_states"], theirs["timestep"][:, 0],
                                      Conditioning.from_batch(batch, torch.device("cpu")))
    with torch.no_grad():
        torch.testing.assert_close(pipe.transformer(**ours)[0], pipe.transformer(**theirs)[0], rtol=0, atol=1e-5)

    result = run_train(train_config(cache, tiny_models, str(tmp_path / "run"), model=model, max_train_steps=2,
                                    crepa_block_index=0, crepa_use_backbone_features=True,
                                    crepa_teacher_block_index=2))
    assert result.steps == 2 and os.path.exists(result.lora_path)
