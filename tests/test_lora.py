"""LoRA: adapters train, both saved layouts reload to the same outputs (diffusers and kohya, the
latter also applied by hand as A1111/ComfyUI do), extraction from a full fine-tune, merging.

    .venv/bin/python -m pytest tests/test_lora.py -q
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from train.lora import (TEXT_TARGETS, UNET_RESNET_TARGETS, UNET_TARGETS, add_lora, apply_kohya,
                        extract_lora, extraction_error, merge_lora, save_kohya, save_lora)
from helpers import assert_close, probe
from train.models import build_builtin

PROMPT = "a photo of sks dog"
RANK, ALPHA = 4, 2.0  # alpha ≠ rank: a loader that drops alpha gives a 2x too strong LoRA


@pytest.fixture(scope="module")
def base_pipe():
    return build_builtin("tiny")


@pytest.fixture(scope="module")
def base_probe(base_pipe):
    return probe(base_pipe, PROMPT)


def fresh(base_pipe):
    return copy.deepcopy(base_pipe)


def differs(a, b):
    assert (a - b).abs().max() > 1e-2


@pytest.fixture(scope="module")
def trained(base_pipe, tmp_path_factory):
    """A tiny pipeline with UNet and text-encoder LoRA after a few Adam steps, saved in fp32."""
    pipe = fresh(base_pipe)
    params = add_lora(pipe.unet, RANK, ALPHA, "unet")
    params += add_lora(pipe.text_encoder, RANK, ALPHA, "text_encoder")
    optimizer = torch.optim.Adam(params, lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, pipe.tokenizer.vocab_size, (1, 8), generator=gen)
    noisy, target = torch.randn(2, 1, 4, 8, 8, generator=gen)
    for _ in range(3):
        pred = pipe.unet(noisy, torch.tensor([900]), pipe.text_encoder(ids)[0]).sample
        F.mse_loss(pred, target).backward()
        optimizer.step()
        optimizer.zero_grad()
    folder = tmp_path_factory.mktemp("lora")
    files = save_lora(pipe, folder, torch.float32)
    return pipe, params, probe(pipe, PROMPT), files


def test_add_lora_trains_only_the_adapters(base_pipe, base_probe, trained):
    pipe, params, (states, _, out), _ = trained
    named = [*pipe.unet.named_parameters(), *pipe.text_encoder.named_parameters()]
    trainable = {n for n, p in named if p.requires_grad}
    assert len(trainable) == len(params) and all(".lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in params)
    # Covered: attention, feed-forward, 1x1-conv proj_in/out in the UNet; attention, mlp in CLIP.
    for name in ("attn2.to_out.0", "ff.net.2", "proj_in", "self_attn.v_proj", "mlp.fc1"):
        assert any(f"{name}.lora_B" in n for n in trainable), name
    base_weights = {**base_pipe.unet.state_dict(), **base_pipe.text_encoder.state_dict()}
    for name, value in [*pipe.unet.state_dict().items(), *pipe.text_encoder.state_dict().items()]:
        if "lora_" not in name:
            assert torch.equal(value, base_weights[name.replace(".base_layer", "")]), name
    differs(states, base_probe[0])
    differs(out, base_probe[2])


def test_diffusers_layout_reloads_with_load_lora_weights(base_pipe, trained):
    _, _, (states, _, out), files = trained
    pipe = fresh(base_pipe)
    pipe.load_lora_weights(files["diffusers"].parent)
    got_states, _, got_out = probe(pipe, PROMPT)
    assert_close(got_states, states)
    assert_close(got_out, out)
    merge_lora(pipe)  # loaded adapters (named default_0 by diffusers) merge as well
    assert not any("lora" in k for k in pipe.unet.state_dict())
    assert_close(probe(pipe, PROMPT)[2], out)


def test_kohya_layout_loads_in_diffusers_and_by_hand(base_pipe, trained):
    _, _, (states, _, out), files = trained
    pipe = fresh(base_pipe)
    pipe.load_lora_weights(files["kohya"].parent, weight_name=files["kohya"].name)
    got_states, _, got_out = probe(pipe, PROMPT)
    assert_close(got_states, states)
    assert_close(got_out, out)
    # As AUTOMATIC1111 and ComfyUI apply it: W += alpha/r · up @ down, no diffusers involved.
    pipe = fresh(base_pipe)
    lora = load_file(files["kohya"])
    assert apply_kohya(pipe.unet, lora, "unet") == 16 * 12  # 16 transformer blocks
    assert apply_kohya(pipe.text_encoder, lora, "text_encoder") == 2 * 6  # 2 CLIP layers
    got_states, _, got_out = probe(pipe, PROMPT)
    assert_close(got_states, states)
    assert_close(got_out, out)


def test_kohya_file_follows_the_webui_layout(base_pipe, trained, tmp_path):
    pipe, _, _, files = trained
    lora = load_file(files["kohya"])
    key = re.compile(r"^(lora_unet|lora_te_text_model_encoder_layers_\d+)_\w+"
                     r"\.(lora_down\.weight|lora_up\.weight|alpha)$")
    assert all(key.match(k) for k in lora), [k for k in lora if not key.match(k)][:3]
    names = {k.split(".")[0] for k in lora}
    assert {f"lora_te_text_model_encoder_layers_1_{m}" for m in
            ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj",
             "mlp_fc1", "mlp_fc2")} <= names
    modules = {"lora_unet_" + n.replace(".", "_"): m for n, m in base_pipe.unet.named_modules()}
    modules |= {"lora_te_text_model_" + n.replace(".", "_"): m
                for n, m in base_pipe.text_encoder.named_modules()}
    for name in names:
        weight = modules[name].weight
        down, up = lora[f"{name}.lora_down.weight"], lora[f"{name}.lora_up.weight"]
        if weight.dim() == 4:  # SD 1.x proj_in/proj_out: 1x1 convs
            assert down.shape == (RANK, weight.shape[1], 1, 1), name
            assert up.shape == (weight.shape[0], RANK, 1, 1), name
        else:
            assert down.shape == (RANK, weight.shape[1]) and up.shape == (weight.shape[0], RANK)
        assert lora[f"{name}.alpha"].shape == () and lora[f"{name}.alpha"].item() == ALPHA
    assert "lora_unet_down_blocks_0_attentions_0_proj_in" in names
    with safe_open(files["kohya"], "pt") as f:
        meta = f.metadata()
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == (str(RANK), str(ALPHA))
    assert meta["ss_base_model_version"] == "sd_v1"
    half = save_lora(pipe, tmp_path, torch.float16)
    assert {v.dtype for v in load_file(half["kohya"]).values()} == {torch.float16}
    assert {v.dtype for v in load_file(half["diffusers"]).values()} == {torch.float16}


def test_merge_lora_leaves_plain_modules_with_the_same_outputs(base_pipe, base_probe):
    from peft.tuners.tuners_utils import BaseTunerLayer

    pipe = fresh(base_pipe)
    params = add_lora(pipe.unet, RANK, ALPHA, "unet")
    params += add_lora(pipe.text_encoder, RANK, ALPHA, "text_encoder")
    with torch.no_grad():
        for p in params:  # lora_B starts at zero: give the adapters an effect
            p.normal_(0, 0.05)
    states, _, out = probe(pipe, PROMPT)
    merge_lora(pipe)
    for model in (pipe.unet, pipe.text_encoder):
        assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
        assert not hasattr(model, "peft_config")
    assert pipe.unet.state_dict().keys() == base_pipe.unet.state_dict().keys()
    assert pipe.text_encoder.state_dict().keys() == base_pipe.text_encoder.state_dict().keys()
    got_states, _, got_out = probe(pipe, PROMPT)
    assert_close(got_states, states)
    assert_close(got_out, out)
    differs(got_out, base_probe[2])


def test_extract_lora_recovers_a_low_rank_fine_tune(base_pipe, tmp_path):
    """A 'full fine-tune' that moved every covered UNet layer (3x3 resnet convs included) and
    the text encoder's attention by a known rank-2 delta, except the mid block."""
    targets = UNET_TARGETS + UNET_RESNET_TARGETS
    tuned = fresh(base_pipe)
    base_unet = {k: v.clone() for k, v in tuned.unet.state_dict().items()}
    base_te = {k: v.clone() for k, v in tuned.text_encoder.state_dict().items()}
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, module in [*tuned.unet.named_modules(), *tuned.text_encoder.named_modules()]:
            if (isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and "mid_block" not in name
                    and name.endswith(targets + TEXT_TARGETS)):
                w = module.weight
                delta = torch.randn(w.shape[0], 2, generator=gen) @ torch.randn(
                    2, w[0].numel(), generator=gen)
                w += 0.02 * delta.reshape(w.shape)
    lora = extract_lora(base_unet, tuned.unet, 2, "unet", targets)
    lora |= extract_lora(base_te, tuned.text_encoder, 2, "text_encoder")
    assert not any("mid_block" in k for k in lora)  # zero difference: skipped
    conv = lora["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"]
    assert conv.shape == (2, 32, 3, 3)
    assert lora["lora_unet_down_blocks_0_resnets_0_conv1.alpha"].item() == 2.0

    # Rank 2 reproduces the weights and outputs almost exactly, through load_lora_weights too.
    approx = fresh(base_pipe)
    apply_kohya(approx.unet, lora, "unet")
    apply_kohya(approx.text_encoder, lora, "text_encoder")
    approx_weights = approx.unet.state_dict()
    for name, want in tuned.unet.state_dict().items():
        torch.testing.assert_close(approx_weights[name], want, rtol=0, atol=1e-5, msg=name)
    states, _, out = probe(tuned, PROMPT)
    path = save_kohya(lora, tmp_path / "extracted.safetensors", torch.float32, "sd_v1", 2, 2)
    loaded = fresh(base_pipe)
    loaded.load_lora_weights(tmp_path, weight_name=path.name)
    got_states, _, got_out = probe(loaded, PROMPT)
    torch.testing.assert_close(got_states, states, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_out, out, rtol=1e-4, atol=1e-4)

    # The output error measure (relative to the fine-tune's change): ~0 at rank 2, not at 1.
    inputs = (torch.randn(1, 4, 8, 8, generator=gen), torch.tensor([500]), states)
    assert extraction_error(base_unet, tuned.unet, lora, "unet", *inputs) < 1e-3
    rank1 = extract_lora(base_unet, tuned.unet, 1, "unet", targets)
    assert extraction_error(base_unet, tuned.unet, rank1, "unet", *inputs) > 0.05


def test_extract_lora_full_rank_is_exact_and_rank_is_clipped(base_pipe):
    tuned = fresh(base_pipe).unet
    base = {k: v.clone() for k, v in tuned.state_dict().items()}
    name = "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"  # Linear 128 -> 32
    conv = "down_blocks.0.attentions.0.proj_in"  # 1x1 conv 32 -> 32
    with torch.no_grad():
        for module in (tuned.get_submodule(name), tuned.get_submodule(conv)):
            module.weight += 0.05 * torch.randn_like(module.weight)  # full rank
    lora = extract_lora(base, tuned, 1000, "unet")
    assert len(lora) == 6
    key = "lora_unet_" + name.replace(".", "_")
    assert lora[f"{key}.lora_down.weight"].shape == (32, 128)  # clipped to min(out, in)
    assert lora[f"{key}.alpha"].item() == 32
    approx = fresh(base_pipe).unet
    apply_kohya(approx, lora, "unet")
    for n in (name, conv):
        torch.testing.assert_close(approx.get_submodule(n).weight,
                                   tuned.get_submodule(n).weight, rtol=0, atol=1e-5)


def test_sdxl_pipeline_gets_both_layouts(base_pipe, tmp_path):
    """An SDXL layout other than tiny-sdxl's (one layer per block, two levels): the kohya file's
    SGM block numbers follow the UNet's config, and diffusers maps them back."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(0)
    te_cfg = base_pipe.text_encoder.config
    # SDXL's layout at toy widths, as in diffusers' own tests; the second encoder has a
    # projection (CLIPTextModelWithProjection keeps transformers' `text_model.` level).
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64)
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**te_cfg.to_dict()))
    pipe = StableDiffusionXLPipeline(
        vae=base_pipe.vae, text_encoder=copy.deepcopy(base_pipe.text_encoder), text_encoder_2=te2,
        tokenizer=base_pipe.tokenizer, tokenizer_2=base_pipe.tokenizer, unet=unet,
        scheduler=base_pipe.scheduler)
    reload = copy.deepcopy(pipe)
    params = add_lora(pipe.unet, RANK, ALPHA, "unet")
    params += add_lora(pipe.text_encoder_2, RANK, ALPHA, "text_encoder_2")
    assert any("proj_in.lora_A" in n for n, _ in pipe.unet.named_parameters())  # Linear here
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.05)
    files = save_lora(pipe, tmp_path, torch.float32)
    assert set(files) == {"diffusers", "kohya"}
    names = {k.split(".")[0] for k in load_file(files["kohya"])}
    assert "lora_unet_input_blocks_3_1_proj_in" in names  # down_blocks.1.attentions.0
    assert "lora_unet_output_blocks_1_1_proj_out" in names  # up_blocks.0.attentions.1
    assert any(n.startswith("lora_te2_text_model_encoder_layers_") for n in names)
    ids = torch.arange(10)[None]
    states = torch.randn(1, 10, 64, generator=torch.Generator().manual_seed(3))
    added = {"text_embeds": torch.randn(1, 32, generator=torch.Generator().manual_seed(4)),
             "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))

    @torch.no_grad()
    def outputs(p):
        return (p.text_encoder_2(ids)[0],
                p.unet(latent, torch.tensor([500]), states, added_cond_kwargs=added).sample)

    want = outputs(pipe)
    for source in (dict(pretrained_model_name_or_path_or_dict=files["diffusers"].parent),
                   dict(pretrained_model_name_or_path_or_dict=tmp_path,
                        weight_name=files["kohya"].name)):
        loaded = copy.deepcopy(reload)
        loaded.load_lora_weights(**source)
        for got, expected in zip(outputs(loaded), want):
            assert_close(got, expected)
