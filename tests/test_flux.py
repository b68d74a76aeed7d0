"""FLUX.1 [dev] through the whole recipe, on the built-in tiny-flux at 64 px: packed latents and
their positions, the text conditioning and the transformer call (with the guidance input) are
FluxPipeline's own; the training timesteps are shifted by the image's size as the sampler
shifts them; a training step is the flow-matching loss; full fine-tuning and LoRA reload in
FluxPipeline and draw; a resume is bit-identical.

    .venv/bin/python -m pytest tests/test_flux.py -q
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from PIL import Image
from safetensors.torch import load_file

from helpers import (FAST, assert_close, check_extracted_lora, check_lora_files, check_resume,
                     flow_step, probe, same_weights, train_tiny)
from train import TrainConfig, run
from train.data import draw_batch, prepare, tokenize
from train.errors import UserError
from train.families import flow, flux
from train.intake import Example
from train.models import build_builtin, check_model

FLUX = dict(FAST, model="tiny-flux", save_precision="fp32")


@pytest.fixture(scope="module")
def base():
    return build_builtin("tiny-flux")


def load(folder):
    pipe = FluxPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_latents_are_packed_and_placed_as_the_pipeline_does():
    latents = torch.randn(2, 16, 8, 12, generator=torch.Generator().manual_seed(0))
    packed = flux.pack(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 16, 8, 12))
    assert packed.shape == (2, 4 * 6, 64)
    # token (row 1, column 2) holds channel 3's 2x2 patch at rows 2-3, columns 4-5
    assert torch.equal(packed[0, 1 * 6 + 2, 3 * 4:3 * 4 + 4], latents[0, 3, 2:4, 4:6].flatten())
    assert torch.equal(flux.unpack(packed, 8, 12), latents)
    ids = flux.image_ids(8, 12, "cpu", torch.float32)
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(2, 4, 6, "cpu", torch.float32))
    assert ids[1 * 6 + 2].tolist() == [0, 1, 2]


@torch.no_grad()
def test_cached_text_conditioning_is_the_pipelines(base):
    image = Image.new("RGB", (64, 64))
    photos = [Example(f"{i}.png", caption, (64, 64), image)
              for i, caption in enumerate(["a photo of sks ball", "a ball on the beach"])]
    data = prepare(flux, base.vae, [base.text_encoder, base.text_encoder_2],
                   [base.tokenizer, base.tokenizer_2], photos, [], 64, center_crop=True,
                   cache_embeddings=True, seed=0)
    assert [ids.shape[1] for ids in data.prompt_ids] == [77, 512]  # T5 at the pipeline's 512
    for p, caption in enumerate(sorted(ex.caption for ex in photos)):
        states, pooled, _ = base.encode_prompt(caption, caption)
        assert states.shape == (1, 512, 128) and pooled.shape == (1, 32)
        # Encoded in a batch of two here, of one there: equal to float rounding.
        assert_close((data.prompt_emb[p:p + 1], data.prompt_pooled[p:p + 1]), (states, pooled),
                     tol=1e-6)
    assert draw_batch(data, [], torch.Generator().manual_seed(0), batch_size=2).length is None


@torch.no_grad()
def test_denoise_is_the_pipelines_transformer_call_at_guidance_1(base):
    calls = []
    hook = base.transformer.register_forward_hook(
        lambda module, args, kwargs, out: calls.append((kwargs, out[0])), with_kwargs=True)
    try:  # a non-square image: rows and columns must not be swapped anywhere
        base("a photo of a ball", num_inference_steps=2, guidance_scale=flux.GUIDANCE,
             height=64, width=96, generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    kwargs, want = calls[-1]
    assert kwargs["guidance"].tolist() == [1.0]
    ids = [tokenize(tok, ["a photo of a ball"], flux.TEXT_LENGTHS.get(name))[0]
           for (_, name), tok in zip(flux.TEXT, [base.tokenizer, base.tokenizer_2])]
    states, pooled = flux.encode_text([base.text_encoder, base.text_encoder_2], ids)
    noisy = flux.unpack(kwargs["hidden_states"], 8, 12)
    got = flux.denoise(base.transformer, noisy, kwargs["timestep"] * 1000, states, pooled)
    assert torch.equal(flux.pack(got), want)


def test_timesteps_are_shifted_by_the_image_size_as_the_sampler_shifts_them(base):
    config = base.scheduler.config
    for tokens in (16, 256, 1024, 4096):  # 64 px, 256, 512, 1024 px
        assert flow.resolution_shift(config, tokens) == pytest.approx(calculate_shift(
            tokens, config.base_image_seq_len, config.max_image_seq_len, config.base_shift,
            config.max_shift))
    # The sampler's own shift of a grid of sigmas, at 1024 px
    sampler = copy.deepcopy(base.scheduler)
    grid = torch.linspace(1.0, 0.05, 20)
    mu = flow.resolution_shift(config, 4096)
    sampler.set_timesteps(sigmas=grid.tolist(), mu=mu)
    assert_close(sampler.sigmas[:-1], flow.time_shift(grid, mu))
    # Drawn logit-normally, then shifted: the median moves toward noise with the size.
    scheduler = flux.training_scheduler(config)
    medians = [float((flux.draw_timesteps(scheduler, 4000, torch.Generator().manual_seed(0),
                                          size=(side, side)) / 1000).median())
               for side in (32, 64, 128)]
    assert 0.55 < medians[0] < medians[1] < medians[2] < 0.8, medians
    plain = torch.sigmoid(torch.randn(4000, generator=torch.Generator().manual_seed(0)))
    assert_close(flux.draw_timesteps(scheduler, 4000, torch.Generator().manual_seed(0),
                                     size=(128, 128)) / 1000, flow.time_shift(plain, 1.15))


def test_a_training_step_is_the_flow_matching_loss(base):
    # The loop's step, and its loss by hand: sigma logit-normal, shifted for 8x8 latents (16
    # tokens) as the sampler shifts it, the straight line, the velocity.
    loss, data, latents, noise, generator = flow_step(base, flux)
    sigma = torch.sigmoid(torch.randn(1, generator=generator))
    mu = calculate_shift(4 * 4)
    sigma = torch.e ** mu / (torch.e ** mu + 1 / sigma - 1)
    noisy = (1 - sigma) * latents + sigma * noise
    with torch.no_grad():
        pred = flux.denoise(base.transformer, noisy, sigma * 1000, data.prompt_emb,
                            data.prompt_pooled)
    assert loss == pytest.approx(float(((pred - (noise - latents)) ** 2).mean()), rel=1e-5)


def test_full_fine_tune_trains_the_transformer_and_clip_not_t5(tmp_path, photos, base):
    out, lines = train_tiny(tmp_path, photos, "full", **dict(
        FLUX, learning_rate=1e-3, train_text_encoder=True, save_sample_prompt="a photo of sks ball",
        n_save_sample=1, save_infer_steps=2, output_format="diffusers,single_file"))
    trained = load(out)
    assert not same_weights(trained.transformer, base.transformer)
    assert not same_weights(trained.text_encoder, base.text_encoder)
    assert same_weights(trained.text_encoder_2, base.text_encoder_2)
    assert same_weights(trained.vae, base.vae)
    record = json.loads((out / "training.json").read_text())
    assert record["family"] == "flux" and len(record["history"]) == 4
    # The guidance left unset is FLUX.1's distilled 3.5, for class images and samples alike.
    assert record["config"]["class_guidance_scale"] == record["config"]["save_guidance_scale"] \
        == 3.5
    assert "FLUX.1 defaults for what was not set: class_guidance_scale 3.5, " \
           "save_guidance_scale 3.5" in lines
    assert len(record["dataset"]["class"]["used"]) == 2
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert check_model(str(out)) == "flux"  # the folder is a base model the trainer takes
    assert index["tokenizer_2"] == ["transformers", "T5TokenizerFast"]
    image = trained("a photo of sks ball", num_inference_steps=2, height=64, width=64,
                    generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    (sample,) = (out / "samples").glob("*.png")
    assert Image.open(sample).size == (64, 64)
    # The transformer alone in BFL's layout: q, k, v fused (and the single blocks' MLP input).
    original = load_file(out / "transformer.safetensors")
    tuned = trained.transformer.state_dict()
    assert torch.equal(original["double_blocks.0.img_attn.qkv.weight"], torch.cat(
        [tuned[f"transformer_blocks.0.attn.to_{q}.weight"] for q in "qkv"]))
    assert torch.equal(original["single_blocks.1.linear1.bias"], torch.cat(
        [tuned[f"single_transformer_blocks.1.attn.to_{q}.bias"] for q in "qkv"]
        + [tuned["single_transformer_blocks.1.proj_mlp.bias"]]))
    assert sum(t.numel() for t in original.values()) == sum(t.numel() for t in tuned.values())


def test_diffusers_reads_the_transformer_file_back_exactly(tmp_path):
    """diffusers' reader of BFL's layout splits a single block's linear1 at FLUX.1's own widths
    (3072 x 3 + 12288), so the check runs at that width: one block of each kind, 531 M
    parameters in bf16 (about 15 s)."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    from train.transformer_file import transformer_state_dict

    with torch.device("meta"):
        model = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
            attention_head_dim=128, num_attention_heads=24, joint_attention_dim=64,
            pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():  # each tensor its own values, its halves apart (AdaLN's swap shows)
        for k, p in enumerate(model.parameters()):
            p.fill_(k + 1)
            p[p.shape[0] // 2:] += 0.5
    model.save_config(tmp_path / "transformer")
    save_file({k: v.contiguous() for k, v in transformer_state_dict(model, "flux").items()},
              tmp_path / "transformer.safetensors")
    read = FluxTransformer2DModel.from_single_file(
        str(tmp_path / "transformer.safetensors"), config=str(tmp_path),
        subfolder="transformer", local_files_only=True, torch_dtype=torch.bfloat16)
    assert same_weights(read, model)


def test_lora_reloads_to_the_trained_outputs(tmp_path, photos, base):
    settings = dict(FLUX, use_lora=True, lora_rank=4, learning_rate=1e-3, train_text_encoder=True,
                    output_format="diffusers,lora", aspect_buckets=True,
                    prior_source="class_images+base_model", prior_prompts="a ball in the snow")
    out, _ = train_tiny(tmp_path, photos, "lora", **settings)
    lora = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    names = {k.split(".lora_")[0] for k in lora}
    assert {"transformer.transformer_blocks.0.attn.to_q",
            "transformer.transformer_blocks.0.ff_context.net.2",
            "transformer.single_transformer_blocks.1.attn.to_v",
            "transformer.single_transformer_blocks.1.proj_mlp"} <= names
    assert any(k.startswith("text_encoder.") for k in lora)
    assert not any(k.startswith("text_encoder_2.") for k in lora)
    tuned = load(out)  # the folder holds the adapters merged
    trained, before = probe(tuned), probe(base)
    for i in (1, 2):  # CLIP-L's pooled output, and the transformer
        assert (trained[i] - before[i]).abs().max() > 1e-3, i
    check_lora_files(out, base, tuned, trained)
    # kohya's FLUX names, BFL's modules: q/k/v fused, a single block's linear1 (q, k, v, MLP in)
    kohya = {k.split(".")[0] for k in load_file(out / "lora.safetensors")}
    assert {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_txt_mlp_2",
            "lora_unet_single_blocks_1_linear1",
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"} <= kohya


def test_diffusers_reads_the_kohya_lora_at_flux1s_width(tmp_path, base):
    """diffusers reads lora.safetensors (load_lora_weights(folder, weight_name=...)): every
    module it loads, of the transformer and of CLIP-L, carries the trained change, alpha / r ·
    B @ A. Its reader splits a single block's linear1 at FLUX.1's own widths (3 x 3072 +
    12288; at tiny-flux's it fails an assertion), so the check runs at that width: one block
    of each kind, fp32, its base weights left uninitialised (only the adapters are compared)."""
    import gc

    from diffusers import FluxTransformer2DModel
    from peft.tuners.lora import LoraLayer

    from train.lora import ADAPTER, add_lora, save_lora

    def pipeline():
        with torch.device("meta"):
            transformer = FluxTransformer2DModel(
                patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                attention_head_dim=128, num_attention_heads=24, joint_attention_dim=128,
                pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
        return FluxPipeline(transformer=transformer.to_empty(device="cpu"),
                            scheduler=base.scheduler, vae=base.vae,
                            text_encoder=copy.deepcopy(base.text_encoder),
                            tokenizer=base.tokenizer, text_encoder_2=base.text_encoder_2,
                            tokenizer_2=base.tokenizer_2)

    def changes(pipe, adapter):
        return {f"{part}.{path}": layer.scaling[adapter] * layer.lora_B[adapter].weight.float()
                @ layer.lora_A[adapter].weight.float()
                for part in ("transformer", "text_encoder")
                for path, layer in getattr(pipe, part).named_modules()
                if isinstance(layer, LoraLayer) and adapter in layer.lora_A}

    pipe, g = pipeline(), torch.Generator().manual_seed(0)
    for part in ("transformer", "text_encoder"):
        add_lora(getattr(pipe, part), 4, 16, part)
        for name, weight in getattr(pipe, part).named_parameters():
            if "lora_B" in name:
                weight.data = torch.randn(weight.shape, generator=g) * 0.01
    save_lora(pipe, tmp_path, torch.float32)
    want = changes(pipe, ADAPTER)
    del pipe
    gc.collect()
    pipe = pipeline()
    pipe.load_lora_weights(str(tmp_path), weight_name="lora.safetensors", adapter_name="kohya")
    got = changes(pipe, "kohya")
    assert got.keys() == want.keys() and len(want) == 16 + 12  # transformer, CLIP-L modules
    assert_close([got[k] for k in want], list(want.values()), tol=1e-6)


def test_a_lora_extracted_from_a_full_fine_tune_is_a_trained_loras_files(tmp_path, photos,
                                                                         base):
    # Rank 64: above every trained matrix's rank (CLIP-L's are 32 and 64 wide, the
    # transformer's 32 and 128).
    out, _ = train_tiny(tmp_path, photos, "extract", **dict(
        FLUX, learning_rate=1e-3, train_text_encoder=True, with_prior_preservation=False,
        extract_lora=64))
    check_extracted_lora(out, base, load(out), tmp_path)


def test_resume_is_bit_identical(tmp_path, photos):
    settings = dict(FLUX, use_ema=True, offset_noise=0.1, flip_p=0.5,
                    gradient_checkpointing=True, prior_source="base_model",
                    prior_prompts="a ball in the snow")
    check_resume(tmp_path, photos, settings,
                 "transformer/diffusion_pytorch_model.safetensors")


def test_what_flux_cannot_take_is_refused_before_loading(tmp_path, photos):
    config = TrainConfig(**dict(FLUX, instance_data=str(photos), output=str(tmp_path / "o.tar"),
                                instance_prompt="a photo of sks ball",
                                class_prompt="a photo of a ball", resolution=72))
    with pytest.raises(UserError, match="FLUX.1 needs a resolution that is a multiple of 16"):
        run(config, log=lambda line: None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_lora_on_a_gpu_keeps_its_base_in_bf16_and_t5_off_the_gpu_while_training(tmp_path,
                                                                                    photos):
    from train.recipe import load, text_encoders_parked

    settings = dict(FLUX, use_lora=True, mixed_precision="bf16", gradient_checkpointing=True,
                    save_sample_prompt="a photo of sks ball", n_save_sample=1, save_infer_steps=2)
    config = TrainConfig(**dict(settings, instance_data=str(photos), output="x.tar",
                                instance_prompt="a photo of sks ball"))
    model = load(config, None, log=lambda line: None)
    assert model.pipe.transformer.dtype == torch.bfloat16
    assert model.pipe.vae.dtype == torch.float32
    with text_encoders_parked(model, frozen=True):
        assert model.pipe.text_encoder_2.device.type == "cpu"
    assert model.pipe.text_encoder_2.device.type == "cuda"
    out, _ = train_tiny(tmp_path, photos, "gpu", **settings)
    record = json.loads((out / "training.json").read_text())
    assert record["mixed_precision"] == "bf16"
    assert all(h["loss"] is not None for h in record["history"])
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_evaluation_scores_a_flux_run_and_its_probe_follows_the_flow(tmp_path, photos):
    """The paper's evaluation and the denoising proxies on a FLUX run: the fidelity proxy is
    the velocity error on the photos, which training lowers."""
    out, _ = train_tiny(tmp_path, photos, "eval", **dict(
        FLUX, learning_rate=1e-3, max_train_steps=8, evaluate=True, eval_dino="tiny",
        eval_clip="tiny", eval_images_per_prompt=1, eval_prompts="a sks ball in the snow",
        save_infer_steps=2))
    report = json.loads((out / "evaluation.json").read_text())
    assert {"dino", "clip_i", "clip_t"} <= set(report["metrics"])
    fidelity = report["proxies"]["fidelity"]
    assert 0 < fidelity["error_ratio"] < 1.0, fidelity
    assert report["proxies"]["drift"]["prompt"] == "a photo of a ball"


def test_the_generator_draws_with_a_flux_lora_at_sides_of_16(tmp_path, photos):
    from train.generate import GenerateConfig
    from train.generate import run as generate

    train_tiny(tmp_path, photos, "lora", **dict(FLUX, use_lora=True, max_train_steps=2))
    lines = []
    written = generate(GenerateConfig(
        weights=str(tmp_path / "lora.tar"), model="tiny-flux", prompt="a photo of sks ball",
        width=72, height=64, num_inference_steps=2, num_outputs=1, seed=3,
        output=str(tmp_path / "images")), log=lines.append)
    with Image.open(written[0]) as image:
        assert image.size == (64, 64)  # 72 is not a multiple of 16: rounded down
    assert any("FlowMatchEulerDiscrete steps, guidance 3.5" in line for line in lines), lines


def test_a_4bit_base_holds_the_blocks_in_a_quarter_and_its_lora_trains_and_reloads(tmp_path,
                                                                                   photos,
                                                                                   base):
    from train.quantize import quantize_blocks

    model = copy.deepcopy(base.transformer)
    before = sum(p.numel() * p.element_size() for p in model.transformer_blocks.parameters())
    latent = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    states, pooled, want = probe(base)
    assert quantize_blocks(model, torch.float32) == 26  # 14 Linears a double block, 6 a single
    after = sum(p.numel() * p.element_size() for p in model.transformer_blocks.parameters())
    assert after < 0.2 * before  # 4 bits (plus a scale per 64) against fp32's 32
    with torch.no_grad():
        got = flux.denoise(model, latent, torch.tensor([500.0]), states, pooled)
        ref = flux.denoise(base.transformer, latent, torch.tensor([500.0]), states, pooled)
    assert float((got - ref).norm() / ref.norm()) < 0.1  # NF4's rounding, nothing worse

    out, lines = train_tiny(tmp_path, photos, "qlora", **dict(
        FLUX, use_lora=True, quantize_base="nf4", learning_rate=1e-3, lora_rank=4))
    assert "model: 26 layers of the transformer's blocks held in 4 bits (nf4)" in lines
    pipe = copy.deepcopy(base)  # the adapters load on the full-precision base
    pipe.load_lora_weights(str(out / "lora"))
    assert (probe(pipe)[2] - want).abs().max() > 1e-3
    for setting, message in ((dict(use_lora=False), "quantize_base .* set use_lora to true"),
                             (dict(output_format="diffusers"), "quantize_base writes the LoRA")):
        with pytest.raises(UserError, match=message):
            TrainConfig(**dict(FLUX, instance_data="x.zip", instance_prompt="a photo of sks ball",
                               class_prompt="a photo of a ball",
                               quantize_base="nf4", **dict(dict(use_lora=True), **setting)))
