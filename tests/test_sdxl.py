"""SDXL through the whole recipe, on the built-in tiny-sdxl at 64 px: SDXL's crop and size
conditioning, full fine-tuning of the UNet and both text encoders, LoRA files (diffusers and
kohya's SDXL names) that reload to the trained outputs, LoRA extraction, the single file, and a
bit-identical resume.

    .venv/bin/python -m pytest tests/test_sdxl.py -q
"""

from __future__ import annotations

import copy
import json
import random
import re

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from helpers import FAST, assert_close, probe, same_weights, train_tiny
from train.data import image_tensor, prepare, time_ids
from train.families import sdxl
from train.families.sdxl import encode_text
from train.intake import Example
from train.lora import apply_kohya
from train.models import build_builtin

XL = dict(FAST, model="tiny-sdxl", save_precision="fp32")
PARTS = ("unet", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def base():
    return build_builtin("tiny-sdxl")


@pytest.fixture(scope="module")
def full(tmp_path_factory, photos):
    """A full fine-tune of the UNet and both text encoders, written as a diffusers folder, a
    single file and an extracted full-rank LoRA, with one sample."""
    settings = dict(XL, learning_rate=1e-3, output_format="diffusers,single_file",
                    extract_lora=64, gradient_checkpointing=True,
                    save_sample_prompt="a photo of sks ball", n_save_sample=1, save_infer_steps=2)
    out, _ = train_tiny(tmp_path_factory.mktemp("full"), photos, "full", **settings)
    return out


def load(folder):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_time_ids_name_the_crop_of_each_view():
    # A photo of 192x128 (as it came) that intake shrank to 96x64; a 64 px square centre crop
    # takes columns 16..80 of it, and the mirrored view's crop starts 96 - 80 = 16 from its left.
    photo = Example("a.jpg", "c", (192, 128), Image.new("RGB", (96, 64)))
    (ids,) = time_ids([photo], 64, center_crop=True, seed=0, flip=True)
    assert ids.tolist() == [[128, 192, 0, 16, 64, 64], [128, 192, 0, 16, 64, 64]]
    # With aspect buckets the target is the bucket (width 128, height 64), not the square.
    wide = Example("b.jpg", "c", (256, 128), Image.new("RGB", (256, 128)))
    (ids,) = time_ids([wide], 64, True, seed=0, buckets=[(64, 64), (128, 64)])
    assert ids.tolist() == [[128, 256, 0, 0, 64, 128]]

    # Random crops: the offsets are those encode_images crops at (same seed, same draws). Each
    # column's red value is its x, so the crop's first pixel tells where the crop began.
    def ramp(width):
        x = torch.arange(width, dtype=torch.uint8).repeat(64, 1)
        return Image.fromarray(torch.stack([x, x * 0, x * 0], -1).numpy())

    photos = [Example(f"{w}.png", "c", (w, 64), ramp(w)) for w in (160, 200, 120)]
    rng = random.Random(5)
    lefts = [round((image_tensor(p.image, 64, False, rng)[0, 0, 0].item() + 1) * 127.5)
             for p in photos]
    ids = time_ids(photos, 64, center_crop=False, seed=5, flip=True)
    assert [int(i[0, 3]) for i in ids] == lefts and len(set(lefts)) > 1
    assert [int(i[1, 3]) for i in ids] == [w - 64 - x for w, x in zip((160, 200, 120), lefts)]


@torch.no_grad()
def test_cached_text_conditioning_is_the_pipelines(base):
    encoders = [base.text_encoder, base.text_encoder_2]
    image = Image.new("RGB", (64, 64))
    photos = [Example(f"{i}.png", caption, (64, 64), image)
              for i, caption in enumerate(["a photo of sks ball", "a ball"])]
    data = prepare(sdxl, base.vae, encoders, [base.tokenizer, base.tokenizer_2], photos, [], 64,
                   center_crop=True, cache_embeddings=True, seed=0)
    for p, caption in enumerate(sorted(ex.caption for ex in photos)):
        # What StableDiffusionXLPipeline conditions its UNet on, at the full 77 tokens.
        states, _, pooled, _ = base.encode_prompt(caption, device="cpu",
                                                  do_classifier_free_guidance=False)
        assert_close((data.prompt_emb[p:p + 1], data.prompt_pooled[p:p + 1]), (states, pooled))
        # pad_tokens=false slices to the prompt's length: the live encoders agree (causal
        # attention), and the pooled embedding, read at the end token, is the same vector.
        n = int(data.prompt_len[p])
        live = encode_text(encoders, [ids[p:p + 1, :n] for ids in data.prompt_ids])
        assert_close(live, (states[:, :n], pooled))


def test_full_fine_tune_trains_the_unet_and_both_text_encoders(full, base):
    trained = load(full)
    for part in PARTS:
        assert not same_weights(getattr(trained, part), getattr(base, part)), part
    history = json.loads((full / "training.json").read_text())["history"]
    assert len(history) == 4 and all(h["loss"] is not None for h in history)
    # It reloads as an SDXL pipeline that draws at the trained size; the sample was drawn too.
    image = trained("a photo of sks ball", num_inference_steps=2, height=64, width=64,
                    generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    (sample,) = (full / "samples").glob("*.png")
    assert Image.open(sample).size == (64, 64)


# Frozen (embeddings cached), or trained at a rate of 0: text_encoder_lr applies to both.
@pytest.mark.parametrize("option", [dict(train_text_encoder=False), dict(text_encoder_lr=0.0)])
def test_text_encoders_stay_as_they_were(tmp_path, photos, base, option):
    out, _ = train_tiny(tmp_path, photos, "frozen", **dict(XL, **option))
    trained = load(out)
    assert same_weights(trained.text_encoder, base.text_encoder)
    assert same_weights(trained.text_encoder_2, base.text_encoder_2)
    assert not same_weights(trained.unet, base.unet)


def test_single_file_round_trips_exactly(full):
    from diffusers import StableDiffusionXLPipeline

    single = StableDiffusionXLPipeline.from_single_file(
        full / "model.safetensors", config=str(full), local_files_only=True)
    folder = load(full)
    for part in PARTS + ("vae",):
        assert same_weights(getattr(single, part), getattr(folder, part)), part


def test_lora_files_reload_to_the_trained_outputs(tmp_path, photos, base):
    settings = dict(XL, use_lora=True, lora_rank=4, learning_rate=1e-3,
                    output_format="diffusers,lora")
    out, _ = train_tiny(tmp_path, photos, "lora", **settings)
    kohya = load_file(out / "lora.safetensors")
    # kohya's SDXL names: the SGM UNet's blocks, CLIP-L as te1 and bigG as te2.
    key = re.compile(r"^lora_(unet_(input_blocks_\d+|middle_block|output_blocks_\d+)_\d+_"
                     r"|te[12]_text_model_encoder_layers_\d+_)\w+"
                     r"\.(lora_down\.weight|lora_up\.weight|alpha)$")
    assert all(key.match(k) for k in kohya), [k for k in kohya if not key.match(k)][:3]
    names = {k.split(".")[0] for k in kohya}
    assert {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
            "lora_unet_middle_block_1_proj_in", "lora_unet_output_blocks_0_1_proj_out",
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
            "lora_te2_text_model_encoder_layers_1_mlp_fc2"} <= names
    with safe_open(out / "lora.safetensors", "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"

    # The folder holds the trained model with the adapters merged: what each file must give.
    trained = probe(load(out))
    before = probe(base)
    for i in range(3):
        assert (trained[i] - before[i]).abs().max() > 1e-3, i  # all three parts learned
    for source in (dict(pretrained_model_name_or_path_or_dict=str(out / "lora")),
                   dict(pretrained_model_name_or_path_or_dict=str(out),
                        weight_name="lora.safetensors")):
        pipe = copy.deepcopy(base)
        pipe.load_lora_weights(**source)
        assert_close(probe(pipe), trained)
    # As AUTOMATIC1111 and ComfyUI apply it: W += alpha/r · up @ down, by the SGM names.
    pipe = copy.deepcopy(base)
    counts = [apply_kohya(getattr(pipe, part), kohya, part, family="sdxl") for part in PARTS]
    # 22 transformer blocks of 10 layers and 11 proj_in/proj_out pairs; 2 CLIP layers of 6.
    assert counts == [22 * 10 + 11 * 2, 2 * 6, 2 * 6] and sum(counts) == len(names)
    assert_close(probe(pipe), trained)


def test_extracted_lora_has_sdxl_names_and_rebuilds_the_tuned_layers(full, base):
    lora = load_file(full / "lora.safetensors")
    prefixes = {k.split("_")[1] for k in lora}
    assert prefixes == {"unet", "te1", "te2"}
    assert any(k.startswith("lora_unet_output_blocks_") for k in lora)
    with safe_open(full / "lora.safetensors", "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
    # Full rank: the covered layers come back as trained, by hand and through diffusers.
    trained = load(full)
    rebuilt = copy.deepcopy(base)
    for part in PARTS:
        apply_kohya(getattr(rebuilt, part), lora, part, family="sdxl")
    to_q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    torch.testing.assert_close(rebuilt.unet.state_dict()[to_q], trained.unet.state_dict()[to_q],
                               rtol=0, atol=1e-5)
    fc1 = "text_model.encoder.layers.1.mlp.fc1.weight"
    torch.testing.assert_close(rebuilt.text_encoder_2.state_dict()[fc1],
                               trained.text_encoder_2.state_dict()[fc1], rtol=0, atol=1e-5)
    loaded = copy.deepcopy(base)
    loaded.load_lora_weights(str(full), weight_name="lora.safetensors")
    assert_close(probe(loaded), probe(rebuilt), tol=1e-4)


def test_resume_is_bit_identical(tmp_path, photos):
    # The options that keep extra state or draw extra numbers, all at once.
    settings = dict(XL, use_ema=True, offset_noise=0.1, snr_gamma=5.0, flip_p=0.5,
                    gradient_checkpointing=True)
    whole, _ = train_tiny(tmp_path, photos, "whole", **settings, checkpointing_steps=2)
    resumed, lines = train_tiny(tmp_path, photos, "resumed", **settings,
                                resume=str(tmp_path / "whole-checkpoints" / "step-000002"))
    assert any("from step 2" in line for line in lines)
    with safe_open(tmp_path / "whole-checkpoints" / "step-000002" / "trainable.safetensors",
                   "pt") as f:
        assert any(k.startswith("text_encoder_2.") for k in f.keys())
    for path in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                 "text_encoder_2/model.safetensors"):
        a, b = load_file(whole / path), load_file(resumed / path)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), path
