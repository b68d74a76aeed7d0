"""Stable Diffusion 3.x through the whole recipe, on the built-in tiny-sd3 at 64 px: the text
conditioning and the transformer call are the pipeline's own (the same prompt alone: to the
bit); a training step is the flow-matching loss; full fine-tuning (with the CLIPs) and LoRA
reload in StableDiffusion3Pipeline and draw; a resume is bit-identical; what SD 3.x cannot
take is refused before the model loads.

    .venv/bin/python -m pytest tests/test_sd3.py -q
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from helpers import (FAST, assert_close, check_extracted_lora, check_lora_files, check_resume,
                     flow_step, probe, same_weights, train_tiny)
from train import TrainConfig, run
from train.data import draw_batch, encode_images, prepare, tokenize
from train.errors import UserError
from train.families import sd3
from train.intake import Example
from train.models import build_builtin, load_pipeline

SD3 = dict(FAST, model="tiny-sd3", save_precision="fp32")


@pytest.fixture(scope="module")
def base():
    return build_builtin("tiny-sd3")


@pytest.fixture(scope="module")
def full(tmp_path_factory, photos):
    """A full fine-tune of the transformer and both CLIPs, with class images and one sample."""
    settings = dict(SD3, learning_rate=1e-3, train_text_encoder=True,
                    output_format="diffusers,single_file",
                    save_sample_prompt="a photo of sks ball", n_save_sample=1, save_infer_steps=2)
    out, _ = train_tiny(tmp_path_factory.mktemp("full"), photos, "full", **settings)
    return out


def load(folder):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def test_cached_text_conditioning_is_the_pipelines(base):
    image = Image.new("RGB", (64, 64))
    photos = [Example(f"{i}.png", caption, (64, 64), image)
              for i, caption in enumerate(["a photo of sks ball", "a ball on the beach"])]
    data = prepare(sd3, base.vae, [base.text_encoder, base.text_encoder_2, base.text_encoder_3],
                   [base.tokenizer, base.tokenizer_2, base.tokenizer_3], photos, [], 64,
                   center_crop=True, cache_embeddings=True, seed=0)
    # CLIP at 77 tokens, T5 at the pipeline's 256: 77 + 256 states per prompt.
    assert [ids.shape[1] for ids in data.prompt_ids] == [77, 77, 256]
    for p, caption in enumerate(sorted(ex.caption for ex in photos)):
        states, _, pooled, _ = base.encode_prompt(caption, caption, caption,
                                                  do_classifier_free_guidance=False)
        assert states.shape == (1, 77 + 256, 128)
        # Encoded in a batch of two here, of one there: equal to float rounding.
        assert_close((data.prompt_emb[p:p + 1], data.prompt_pooled[p:p + 1]), (states, pooled),
                     tol=1e-6)
    # T5 sees its pads: even without pad_tokens a batch keeps every token.
    batch = draw_batch(data, [], torch.Generator().manual_seed(0), batch_size=2)
    assert batch.length is None


@torch.no_grad()
def test_denoise_is_the_pipelines_transformer_call(base):
    calls = []
    hook = base.transformer.register_forward_hook(
        lambda module, args, kwargs, out: calls.append((kwargs, out[0])), with_kwargs=True)
    try:
        base("a photo of a ball", num_inference_steps=2, guidance_scale=1.0, height=64,
             width=64, generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    kwargs, want = calls[-1]
    ids = [tokenize(tok, ["a photo of a ball"], sd3.TEXT_LENGTHS.get(name))[0]
           for (_, name), tok in zip(sd3.TEXT, [base.tokenizer, base.tokenizer_2,
                                                base.tokenizer_3])]
    states, pooled = sd3.encode_text([base.text_encoder, base.text_encoder_2,
                                      base.text_encoder_3], ids)
    got = sd3.denoise(base.transformer, kwargs["hidden_states"], kwargs["timestep"], states,
                      pooled)
    assert torch.equal(got, want)


def test_the_vae_latents_carry_sd3s_shift(base):
    # The transformer's latents are (VAE latent - 0.0609) * 1.5305, as the pipeline decodes
    # them (latents / scaling_factor + shift_factor).
    image = Image.new("RGB", (64, 64), (200, 40, 40))
    means, _ = encode_images(base.vae, [Example("a.png", "x", (64, 64), image)], 64,
                             center_crop=True, seed=0)
    with torch.no_grad():
        pixels = torch.full((1, 3, 64, 64), 0.0)
        pixels[:, 0], pixels[:, 1], pixels[:, 2] = 200 / 127.5 - 1, 40 / 127.5 - 1, 40 / 127.5 - 1
        mean = base.vae.encode(pixels).latent_dist.mean
    assert means[0].shape == (1, 16, 8, 8)
    assert_close(means[0], (mean - 0.0609) * 1.5305)


def test_a_training_step_is_the_flow_matching_loss(base):
    # The loop's step, and its loss by hand: sigma = t / 1000 (t drawn logit-normally from the
    # shifted table), the straight line between the latent and the noise, the velocity.
    loss, data, latents, noise, generator = flow_step(base, sd3)
    u = torch.sigmoid(torch.randn(1, generator=generator))
    t = sd3.training_scheduler(base.scheduler.config).timesteps[(u * 1000).long()]
    sigma = float(t) / 1000
    noisy = (1 - sigma) * latents + sigma * noise
    with torch.no_grad():
        pred = sd3.denoise(base.transformer, noisy, t, data.prompt_emb, data.prompt_pooled)
    assert loss == pytest.approx(float(((pred - (noise - latents)) ** 2).mean()), rel=1e-5)


def test_full_fine_tune_trains_the_transformer_and_clips_not_t5(full, base):
    trained = load(full)
    for part in ("transformer", "text_encoder", "text_encoder_2"):
        assert not same_weights(getattr(trained, part), getattr(base, part)), part
    assert same_weights(trained.text_encoder_3, base.text_encoder_3)
    assert same_weights(trained.vae, base.vae)
    record = json.loads((full / "training.json").read_text())
    assert record["family"] == "sd3" and len(record["history"]) == 4
    assert len(record["dataset"]["class"]["used"]) == 2  # class images, drawn by the flow model
    index = json.loads((full / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["tokenizer_3"] == ["transformers", "T5TokenizerFast"]
    image = trained("a photo of sks ball", num_inference_steps=2, height=64, width=64,
                    generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    (sample,) = (full / "samples").glob("*.png")
    assert Image.open(sample).size == (64, 64)
    # The trained folder is itself a base model the trainer loads.
    assert type(load_pipeline(str(full), "cpu")).__name__ == "StableDiffusion3Pipeline"


def test_the_transformer_file_is_stabilitys_layout_and_diffusers_reads_it_back(full):
    from diffusers import SD3Transformer2DModel

    with safe_open(full / "transformer.safetensors", "pt") as f:
        keys = set(f.keys())
    assert {"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight",
            "model.diffusion_model.joint_blocks.1.context_block.adaLN_modulation.1.weight",
            "model.diffusion_model.final_layer.linear.weight"} <= keys
    read = SD3Transformer2DModel.from_single_file(
        str(full / "transformer.safetensors"), config=str(full), subfolder="transformer",
        local_files_only=True)
    assert same_weights(read, load(full).transformer)


def test_the_generator_puts_a_transformer_file_on_its_base_model(full, tmp_path, base):
    import shutil

    from train.trained import load_full

    only = tmp_path / "only"  # a tarball of the transformer alone
    only.mkdir()
    for name in ("transformer.safetensors", "training.json"):
        shutil.copy(full / name, only / name)
    pipe = load_full(only, "tiny-sd3", "cpu", "weights", configs=tmp_path / "configs")
    assert same_weights(pipe.transformer, load(full).transformer)
    assert same_weights(pipe.text_encoder_3, base.text_encoder_3)
    with pytest.raises(UserError, match="holds a transformer for SD 3.x, and this server's "
                                        "base model is FLUX.1"):
        load_full(only, "tiny-flux", "cpu", "weights", configs=tmp_path / "flux-configs")


def test_lora_reloads_to_the_trained_outputs(tmp_path, photos, base):
    settings = dict(SD3, use_lora=True, lora_rank=4, learning_rate=1e-3, train_text_encoder=True,
                    output_format="diffusers,lora", prior_source="class_images+base_model",
                    prior_prompts="a ball in the snow")
    out, _ = train_tiny(tmp_path, photos, "lora", **settings)
    lora = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    # The transformer's attention and feed-forward in both streams, and both CLIPs.
    names = {k.split(".lora_")[0] for k in lora}
    assert {"transformer.transformer_blocks.0.attn.to_q", "transformer.transformer_blocks.0.attn"
            ".add_k_proj", "transformer.transformer_blocks.0.ff_context.net.2",
            "transformer.transformer_blocks.1.ff.net.0.proj"} <= names
    assert any(k.startswith("text_encoder.") for k in lora)
    assert any(k.startswith("text_encoder_2.") for k in lora)
    assert not any(k.startswith("text_encoder_3.") for k in lora)
    tuned = load(out)  # the folder holds the adapters merged
    trained, before = probe(tuned), probe(base)
    for i in (0, 2):
        assert (trained[i] - before[i]).abs().max() > 1e-3, i
    check_lora_files(out, base, tuned, trained)
    # kohya's SD3 names, Stability's modules (q/k/v fused), CLIP-L and bigG as te1 and te2
    kohya = {k.split(".")[0] for k in load_file(out / "lora.safetensors")}
    assert {"lora_unet_joint_blocks_0_x_block_attn_qkv",
            "lora_unet_joint_blocks_0_context_block_mlp_fc2",
            "lora_unet_joint_blocks_1_context_block_attn_qkv",
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
            "lora_te2_text_model_encoder_layers_1_mlp_fc1"} <= kohya


def test_a_lora_lands_on_stabilitys_modules_rows_and_halves_included(base):
    """kohya_layout on the original layout, for LoRA modules a trained run does not have: one
    part of a fused qkv alone (the other parts' rows stay the base's), the AdaLN modulations
    whose halves the original holds the other way round (norm_out, the last block's
    norm1_context), a 1:1 module at alpha != r. Applied as ComfyUI and Forge apply it, it is
    the same change made to diffusers' weights. A module with no place there is refused."""
    import copy

    from helpers import apply_kohya_file
    from train.lora import kohya_layout
    from train.transformer_file import transformer_state_dict

    g = torch.Generator().manual_seed(0)
    model, layers = base.transformer, {}
    for path, rank, alpha in (("transformer_blocks.0.attn.to_k", 2, 2.0),
                              ("norm_out.linear", 3, 6.0),
                              ("transformer_blocks.1.norm1_context.linear", 2, 1.0),
                              ("transformer_blocks.0.ff.net.2", 4, 16.0)):
        linear = model.get_submodule(path)
        layers[path] = (torch.randn(rank, linear.in_features, generator=g),
                        torch.randn(linear.out_features, rank, generator=g), alpha)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        for path, (down, up, alpha) in layers.items():
            changed.get_submodule(path).weight += alpha / down.shape[0] * up @ down
    kohya = kohya_layout(model, "transformer", "sd3", layers)
    assert sorted({k.split(".")[0] for k in kohya}) == [
        "lora_unet_final_layer_adaLN_modulation_1", "lora_unet_joint_blocks_0_x_block_attn_qkv",
        "lora_unet_joint_blocks_0_x_block_mlp_fc2",
        "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1"]
    assert kohya["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight"].shape == (96, 2)
    got = apply_kohya_file(transformer_state_dict(model, "sd3"), kohya, "model.diffusion_model.")
    want = transformer_state_dict(changed, "sd3")
    assert_close([got[k] for k in want], list(want.values()), tol=1e-5)
    with pytest.raises(ValueError, match="1 LoRA modules have no place in the original layout"):
        kohya_layout(model, "transformer", "sd3",
                     {**layers, "transformer_blocks.0.attn.to_z": layers["norm_out.linear"]})


def test_a_lora_extracted_from_a_full_fine_tune_is_a_trained_loras_files(tmp_path, photos,
                                                                         base):
    # Rank 64: the widest matrices that train are CLIP-G's (64); the transformer's are 32.
    out, _ = train_tiny(tmp_path, photos, "extract", **dict(
        SD3, learning_rate=1e-3, train_text_encoder=True, with_prior_preservation=False,
        extract_lora=64))
    check_extracted_lora(out, base, load(out), tmp_path)


def test_resume_is_bit_identical(tmp_path, photos):
    settings = dict(SD3, use_ema=True, offset_noise=0.1, flip_p=0.5,
                    gradient_checkpointing=True, prior_source="base_model",
                    prior_prompts="a ball in the snow")
    check_resume(tmp_path, photos, settings,
                 "transformer/diffusion_pytorch_model.safetensors")


@pytest.mark.parametrize("setting, message", [
    (dict(resolution=72), "SD 3.x needs a resolution that is a multiple of 16"),
    (dict(snr_gamma=5.0), "snr_gamma .* is a DDPM weighting"),
])
def test_what_sd3_cannot_take_is_refused_before_loading(tmp_path, photos, setting, message):
    config = TrainConfig(**dict(SD3, instance_data=str(photos), output=str(tmp_path / "o.tar"),
                                instance_prompt="a photo of sks ball",
                                class_prompt="a photo of a ball", **setting))
    with pytest.raises(UserError, match=message):
        run(config, log=lambda line: None)
    assert not (tmp_path / "o.tar").exists()
