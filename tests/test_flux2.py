"""FLUX.2 [klein] through the whole recipe, on the built-in tiny-flux2 at 64 px: the chat-templated
Qwen3 conditioning (layers 9, 18, 27 with the attention mask), the VAE latents patchified and
normalised by its batch norm, the packing, the 4-axis positions and the transformer call are
Flux2KleinPipeline's own; the training timesteps are shifted by the image's size as the sampler
shifts them in its many-step limit; a training step is the flow-matching loss; a full
fine-tune trains the transformer alone and reloads in Flux2KleinPipeline and draws; a LoRA
reloads to the trained outputs; a resume is bit-identical.

    .venv/bin/python -m pytest tests/test_flux2.py -q
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from diffusers import Flux2KleinPipeline
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu
from PIL import Image
from safetensors.torch import load_file

from helpers import FAST, assert_close, check_resume, flow_step, probe, same_weights, train_tiny
from train import TrainConfig, run
from train.data import encode_images, image_tensor, prepare, prompt_texts, tokenize
from train.errors import UserError
from train.families import flow, flux2
from train.intake import Example
from train.models import check_model, load_pipeline

FLUX2 = dict(FAST, model="tiny-flux2", save_precision="fp32")
P = Flux2KleinPipeline  # its static methods are the reference


@pytest.fixture(scope="module")
def base():
    return load_pipeline("tiny-flux2", "cpu")


def load(folder):
    pipe = Flux2KleinPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def bn(vae):
    """The pipeline's batch-norm mean and std, as it computes them."""
    return (vae.bn.running_mean.view(1, -1, 1, 1),
            torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps))


@torch.no_grad()
def test_latents_are_patchified_normalised_packed_and_placed_as_the_pipeline_does(base):
    latents = torch.randn(2, 32, 8, 12, generator=torch.Generator().manual_seed(0))
    patches = flux2.patchify(latents)
    assert torch.equal(patches, P._patchify_latents(latents)) and patches.shape == (2, 128, 4, 6)
    # channel 3's 2x2 patch at rows 2-3, columns 4-5 is channels 12-15 at (1, 2)
    assert torch.equal(patches[0, 12:16, 1, 2], latents[0, 3, 2:4, 4:6].flatten())
    assert torch.equal(flux2.unpatchify(patches), latents)
    mean, std = bn(base.vae)
    assert not torch.allclose(mean, torch.zeros_like(mean))  # the statistics are the VAE's own
    normalised, _ = flux2.scale_latents(base.vae, latents)
    tokens = flux2.pack(flux2.patchify(normalised))
    assert torch.equal(tokens, P._pack_latents((P._patchify_latents(latents) - mean) / std))
    assert tokens.shape == (2, 4 * 6, 128)
    assert torch.equal(flux2.unpack(tokens, 4, 6), flux2.patchify(normalised))
    assert torch.equal(flux2.image_ids(4, 6), P._prepare_latent_ids(patches)[0])
    assert flux2.image_ids(4, 6)[1 * 6 + 2].tolist() == [0, 1, 2, 0]
    assert torch.equal(flux2.text_ids(512), P._prepare_text_ids(torch.zeros(1, 512, 8))[0])
    # What the trainer caches for a photo: the pipeline's normalised latents of it (its
    # reference-image encoding takes the distribution's mode, the mean), in the VAE's layout;
    # the std divided by the same per-channel std.
    image = Image.effect_noise((64, 64), 60).convert("RGB")
    means, stds = encode_images(base.vae, [Example("a.png", "x", (64, 64), image)], 64, True,
                                seed=0, family=flux2)
    pixels = image_tensor(image, 64, True, None)[None]
    want = base._encode_vae_image(pixels, None)
    assert_close(flux2.patchify(means[0]), want, tol=1e-6)
    dist = base.vae.encode(pixels).latent_dist
    assert_close(flux2.patchify(stds[0]), P._patchify_latents(dist.std) / std, tol=1e-6)


@torch.no_grad()
def test_cached_text_conditioning_is_the_pipelines(base):
    image = Image.new("RGB", (64, 64))
    captions = ["a photo of sks ball", "a ball on the beach, in the snow"]
    photos = [Example(f"{i}.png", c, (64, 64), image) for i, c in enumerate(captions)]
    data = prepare(flux2, base.vae, [base.text_encoder], [base.tokenizer], photos, [], 64,
                   center_crop=True, cache_embeddings=True, seed=0)
    assert data.prompt_ids[0].shape == (2, 512) and data.prompt_pooled is None
    for p, caption in enumerate(sorted(captions)):
        # The tokens are the chat-templated prompt's, padded to 512
        text = base.tokenizer.decode(data.prompt_ids[0][p], skip_special_tokens=False)
        assert text.startswith(f"<|im_start|>user\n{caption}<|im_end|>\n<|im_start|>assistant\n"
                               "<think>\n\n</think>\n\n<|endoftext|>")
        states, text_ids = base.encode_prompt(caption)
        assert states.shape == (1, 512, 3 * 32)
        # Encoded in a batch of two here, of one there: equal to float rounding.
        assert_close(data.prompt_emb[p:p + 1], states, tol=1e-6)
        assert torch.equal(text_ids[0], flux2.text_ids(512))
    # A batch of one is the pipeline's to the bit (the mask is the tokenizer's)
    ids = tokenize(base.tokenizer, prompt_texts(flux2, base.tokenizer, captions[:1]), 512)[0]
    assert torch.equal(flux2.encode_text([base.text_encoder], [ids])[0],
                       base.encode_prompt(captions[0])[0])


@torch.no_grad()
def test_denoise_is_the_pipelines_transformer_call(base):
    calls = []
    hook = base.transformer.register_forward_hook(
        lambda module, args, kwargs, out: calls.append((kwargs, out[0])), with_kwargs=True)
    try:  # a non-square image: rows and columns must not be swapped anywhere
        base(prompt="a photo of a ball", num_inference_steps=2, height=64, width=96,
             generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    kwargs, want = calls[-1]
    assert kwargs["guidance"] is None
    ids = tokenize(base.tokenizer, prompt_texts(flux2, base.tokenizer, ["a photo of a ball"]),
                   512)[0]
    states, pooled = flux2.encode_text([base.text_encoder], [ids])
    assert pooled is None and torch.equal(states, kwargs["encoder_hidden_states"])
    assert torch.equal(flux2.image_ids(4, 6), kwargs["img_ids"][0])
    noisy = flux2.unpatchify(flux2.unpack(kwargs["hidden_states"], 4, 6))
    assert noisy.shape == (1, 32, 8, 12)
    got = flux2.denoise(base.transformer, noisy, kwargs["timestep"] * 1000, states)
    assert got.shape == noisy.shape
    assert torch.equal(flux2.pack(flux2.patchify(got)), want)


def test_timesteps_are_shifted_by_the_image_size_as_the_sampler_shifts_them(base):
    config = base.scheduler.config
    for tokens in (16, 256, 1024, 4096):  # 64, 256, 512, 1024 px
        # the klein sampler's shift at 200 steps and more, which is FLUX.1's line
        assert flux2.shift_mu(tokens) == compute_empirical_mu(tokens, 200)
        # (to its coefficients' rounding: 0.00016927 for 0.65 / 3840)
        assert flux2.shift_mu(tokens) == pytest.approx(flow.resolution_shift(config, tokens),
                                                       abs=1e-5)
        assert compute_empirical_mu(tokens, 4) > compute_empirical_mu(tokens, 50) \
            > flux2.shift_mu(tokens)  # fewer steps, more shift: the sampler's budget
    for tokens in (4301, 8192):  # above 4300 tokens the sampler's shift is the line at any steps
        assert flux2.shift_mu(tokens) == pytest.approx(compute_empirical_mu(tokens, 4))
    assert flux2.shift_mu(4096) == pytest.approx(1.15, abs=1e-5)
    assert flux2.shift_mu(256) == pytest.approx(0.5, abs=1e-5)
    # The sampler's own shift of a grid of sigmas with that mu
    sampler = copy.deepcopy(base.scheduler)
    grid = torch.linspace(1.0, 0.05, 20)
    sampler.set_timesteps(sigmas=grid.tolist(), mu=flux2.shift_mu(4096))
    assert_close(sampler.sigmas[:-1], flow.time_shift(grid, flux2.shift_mu(4096)))
    # Drawn logit-normally, then shifted: the median moves toward noise with the size. The
    # size is the VAE latents' (h, w); the tokens are its 2x2 patches.
    scheduler = flux2.training_scheduler(config)
    medians = [float((flux2.draw_timesteps(scheduler, 4000, torch.Generator().manual_seed(0),
                                           size=(side, side)) / 1000).median())
               for side in (32, 64, 128)]
    assert 0.55 < medians[0] < medians[1] < medians[2] < 0.8, medians
    plain = torch.sigmoid(torch.randn(4000, generator=torch.Generator().manual_seed(0)))
    assert_close(flux2.draw_timesteps(scheduler, 4000, torch.Generator().manual_seed(0),
                                      size=(128, 128)) / 1000,
                 flow.time_shift(plain, compute_empirical_mu(64 * 64, 200)))


def test_a_training_step_is_the_flow_matching_loss(base):
    # The loop's step, and its loss by hand: sigma logit-normal, shifted for 8x8 latents (16
    # patches) as the sampler shifts them at many steps, the straight line, the velocity.
    loss, data, latents, noise, generator = flow_step(base, flux2)
    sigma = torch.sigmoid(torch.randn(1, generator=generator))
    mu = compute_empirical_mu(4 * 4, 200)
    sigma = torch.e ** mu / (torch.e ** mu + 1 / sigma - 1)
    noisy = (1 - sigma) * latents + sigma * noise
    with torch.no_grad():
        pred = flux2.denoise(base.transformer, noisy, sigma * 1000, data.prompt_emb)
    assert loss == pytest.approx(float(((pred - (noise - latents)) ** 2).mean()), rel=1e-5)
    # The same loss in the pipeline's packed layout (the layouts are permutations of each other)
    packed = [P._pack_latents(P._patchify_latents(x)) for x in (pred, noise - latents)]
    assert loss == pytest.approx(float(((packed[0] - packed[1]) ** 2).mean()), rel=1e-5)


def test_full_fine_tune_trains_the_transformer_not_qwen3_nor_the_vae(tmp_path, photos, base):
    out, lines = train_tiny(tmp_path, photos, "full", **dict(
        FLUX2, learning_rate=1e-3, save_sample_prompt="a photo of sks ball", n_save_sample=1,
        save_infer_steps=2))
    trained = load(out)
    assert not same_weights(trained.transformer, base.transformer)
    assert same_weights(trained.text_encoder, base.text_encoder)
    assert same_weights(trained.vae, base.vae)  # its batch-norm statistics included
    record = json.loads((out / "training.json").read_text())
    assert record["family"] == "flux2" and len(record["history"]) == 4
    # Qwen3 cannot train: the run says so (and cached its embeddings)
    assert record["config"]["train_text_encoder"] is False
    # The guidance left unset is the distilled [klein]'s 1, for class images and samples alike.
    assert record["config"]["class_guidance_scale"] == record["config"]["save_guidance_scale"] \
        == 1.0
    assert "FLUX.2 [klein] defaults for what was not set: class_guidance_scale 1, " \
           "save_guidance_scale 1" in lines
    assert len(record["dataset"]["class"]["used"]) == 2  # drawn by the flow model
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "Flux2KleinPipeline" and index["is_distilled"] is True
    assert check_model(str(out)) == "flux2"  # the folder is a base model the trainer takes
    # The reloaded pipeline conditions as the base does (tokenizer, template, pad id, Qwen3)
    assert trained.tokenizer.chat_template == base.tokenizer.chat_template
    assert trained.text_encoder.config.pad_token_id == base.tokenizer.pad_token_id
    got, want = probe(trained), probe(base)
    assert torch.equal(got[0], want[0]) and (got[2] - want[2]).abs().max() > 1e-3
    image = trained(prompt="a photo of sks ball", num_inference_steps=2, height=64, width=64,
                    generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    (sample,) = (out / "samples").glob("*.png")
    assert Image.open(sample).size == (64, 64)
    # A [klein] folder whose Qwen3 config names no pad id (Qwen3-4B's does not) loads with the
    # tokenizer's, which encode_text masks by
    config = json.loads((out / "text_encoder" / "config.json").read_text())
    del config["pad_token_id"]
    (out / "text_encoder" / "config.json").write_text(json.dumps(config))
    assert load(out).text_encoder.config.pad_token_id is None
    assert load_pipeline(str(out), "cpu").text_encoder.config.pad_token_id == \
        base.tokenizer.pad_token_id


def test_lora_reloads_to_the_trained_outputs(tmp_path, photos, base):
    out, _ = train_tiny(tmp_path, photos, "lora", **dict(
        FLUX2, use_lora=True, lora_rank=4, learning_rate=1e-3, output_format="diffusers,lora",
        aspect_buckets=True, prior_source="class_images+base_model",
        prior_prompts="a ball in the snow"))
    lora = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    names = {k.split(".lora_")[0] for k in lora}
    assert {"transformer.transformer_blocks.0.attn.to_q",
            "transformer.transformer_blocks.0.attn.to_add_out",
            "transformer.transformer_blocks.0.ff.linear_in",
            "transformer.transformer_blocks.0.ff_context.linear_out",
            "transformer.single_transformer_blocks.1.attn.to_qkv_mlp_proj"} <= names
    assert all(k.startswith("transformer.") for k in lora)  # Qwen3 has no adapters
    record = json.loads((out / "training.json").read_text())
    assert set(record["files"]) >= {"lora/pytorch_lora_weights.safetensors"}
    assert not (out / "lora.safetensors").exists()  # no kohya layout for FLUX.2
    tuned = load(out)  # the folder holds the adapters merged
    trained, before = probe(tuned), probe(base)
    assert torch.equal(trained[0], before[0])
    assert (trained[2] - before[2]).abs().max() > 1e-3
    pipe = copy.deepcopy(base)
    pipe.load_lora_weights(str(out / "lora"))
    assert_close(probe(pipe), trained)


def test_resume_is_bit_identical(tmp_path, photos):
    settings = dict(FLUX2, use_ema=True, offset_noise=0.1, flip_p=0.5,
                    gradient_checkpointing=True, prior_source="base_model",
                    prior_prompts="a ball in the snow")
    check_resume(tmp_path, photos, settings,
                 "transformer/diffusion_pytorch_model.safetensors")


def test_the_offline_qwen_tokenizer_is_qwen3s_in_kind(base):
    tok = base.tokenizer
    assert type(tok).__name__ == "Qwen2Tokenizer"  # transformers 5's Qwen2TokenizerFast
    text = flux2.prompt_text(tok, "a photo of sks dog on the beach")
    assert text == ("<|im_start|>user\na photo of sks dog on the beach<|im_end|>\n"
                    "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    tokens = tok.convert_ids_to_tokens(tok(text).input_ids)
    assert tokens[:7] == ["<|im_start|>", "u", "s", "e", "r", "\u010a", "a"]
    assert tokens[7:12] == ["\u0120photo", "\u0120of", "\u0120sks", "\u0120dog", "\u0120on"]
    assert tokens[-6:] == ["<think>", "\u010a", "\u010a", "</think>", "\u010a", "\u010a"]
    assert (tok.pad_token, tok.eos_token) == ("<|endoftext|>", "<|im_end|>")
    for any_text in ("Ünïcode, émoji 🐶!", "a <|endoftext|> b"):
        assert tok.decode(tok(any_text).input_ids) == any_text


@torch.no_grad()
def test_random_flux2_klein_is_klein_4b_sized_on_the_meta_device():
    from train.models import build_builtin

    pipe = build_builtin("random-flux2-klein", "meta")
    sizes = [sum(p.numel() for p in getattr(pipe, part).parameters()) / 1e9
             for part in ("transformer", "text_encoder", "vae")]
    assert sizes == pytest.approx([3.88, 4.02, 0.084], abs=0.005), sizes
    # Qwen3-4B's 2560-wide states, three of them per token; a 1024 px image's 4096 patches
    ids = torch.zeros(1, 512, dtype=torch.long, device="meta")
    states, _ = flux2.encode_text([pipe.text_encoder], [ids])
    assert states.shape == (1, 512, 7680)
    out = flux2.denoise(pipe.transformer, torch.zeros(1, 32, 128, 128, device="meta"),
                        torch.zeros(1, device="meta"), states)
    assert out.shape == (1, 32, 128, 128)


def test_the_generator_draws_at_sides_of_16_and_refuses_a_negative_prompt(base):
    from train.generate import GenerateConfig, draw

    lines = []
    settings = dict(prompt="a photo of sks ball", width=72, height=64, num_inference_steps=2,
                    seed=3)
    (image,) = draw(base, GenerateConfig(**settings), log=lines.append)
    assert image.size == (64, 64)  # 72 is not a multiple of 16: rounded down
    assert "2 FlowMatchEulerDiscrete steps, guidance 1" in lines[0], lines
    with pytest.raises(UserError, match=r"FLUX.2 \[klein\] takes no negative prompt"):
        draw(base, GenerateConfig(**settings, negative_prompt="blurry"), log=lines.append)


@pytest.mark.parametrize("setting, message", [
    (dict(resolution=72), r"FLUX.2 \[klein\] needs a resolution that is a multiple of 16"),
    (dict(output_format="diffusers,single_file"),
     r"FLUX.2 \[klein\] has no single-file output: set output_format to diffusers and/or lora"),
    (dict(save_sample_negative_prompt="blurry"), r"FLUX.2 \[klein\] takes no negative prompt"),
])
def test_what_flux2_cannot_take_is_refused_before_loading(tmp_path, photos, setting, message):
    config = TrainConfig(**dict(FLUX2, instance_data=str(photos), output=str(tmp_path / "o.tar"),
                                instance_prompt="a photo of sks ball",
                                class_prompt="a photo of a ball", **setting))
    with pytest.raises(UserError, match=message):
        run(config, log=lambda line: None)
