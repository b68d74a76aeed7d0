"""Base models: load a diffusers folder, or build a built-in model in code.

Built-in names (no download, random weights fixed by a seed):
  tiny         Stable Diffusion 1.5's block layout at toy widths; builds in about a second,
               trains at tens of steps per second on a CPU. For trials and tests.
  random-sd15  The full-size SD 1.5 architecture (860 M UNet, CLIP-L text encoder, full VAE).
               Speed and memory are those of the real model: for GPU benchmarks.

    python -c "from train.models import load_pipeline; print(load_pipeline('tiny', 'cpu'))"

Both use a small offline CLIP-style BPE tokenizer (byte-level alphabet plus whole-word merges
for common prompt words); it is the only part diffusers would otherwise download.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import UserError

BUILTIN = ("tiny", "random-sd15")
TOKENIZER_WORDS = (
    "a an the photo picture image of in on at with and wearing sks zwx ohwx person man woman "
    "dog cat toy bag backpack can clock bowl shoe glasses plushie vase sneaker teapot boot car "
    "red green blue yellow white black beach snow city forest background style painting").split()


def load_pipeline(model: str, device: torch.device | str):
    """A StableDiffusionPipeline in fp32 on `device`, safety checker off, from local files only."""
    from diffusers import StableDiffusionPipeline

    check_model(model)
    if model in BUILTIN:
        pipe = build_builtin(model, device)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(
            model, torch_dtype=torch.float32, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False, local_files_only=True)
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_model(model: str) -> None:
    """Refuse a model that cannot load, in a millisecond and before anything is imported."""
    if model in BUILTIN:
        return
    path = Path(model)
    if not path.exists():
        raise UserError(
            f"model {model!r} not found: run script/download-weights to fetch Stable "
            f"Diffusion 1.5 into weights/, or pass a diffusers folder or a built-in name "
            f"({', '.join(BUILTIN)})")
    index = path / "model_index.json"
    if not index.is_file():
        raise UserError(f"model {model!r} is not a diffusers folder (no model_index.json); "
                        f"single-file checkpoints are not supported yet")
    try:
        kind = json.loads(index.read_text()).get("_class_name")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise UserError(f"model {model!r}: model_index.json is not valid JSON ({e})") from None
    if kind != "StableDiffusionPipeline":
        raise UserError(f"model {model!r} is a {kind}; only Stable Diffusion 1.x/2.x "
                        f"(StableDiffusionPipeline) models are supported")


def build_builtin(name: str, device: torch.device | str = "cpu"):
    """Build `tiny` or `random-sd15` in code, with weights fixed by seed 0."""
    from diffusers import (AutoencoderKL, PNDMScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_cfg, vae_cfg, text_cfg = (TINY if name == "tiny" else SD15)
    tokenizer = build_tokenizer()
    text_cfg = dict(text_cfg, bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if name == "tiny":
        text_cfg["vocab_size"] = len(tokenizer)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    # SD 1.5's own scheduler settings; training uses DDPM with the same betas.
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1,
                              set_alpha_to_one=False)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def build_tokenizer():
    """A CLIPTokenizer built offline: CLIP's byte alphabet, each byte also as a word end
    (`x</w>`), and merges that make each of TOKENIZER_WORDS one token. Any text tokenizes."""
    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    vocab = {ch: i for i, ch in enumerate(alphabet + [ch + "</w>" for ch in alphabet])}
    merges: list[tuple[str, str]] = []
    for word in TOKENIZER_WORDS:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            symbols = [pair[0] + pair[1]] + symbols[2:]
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _byte_alphabet() -> list[str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b if b in printable else next(extra)) for b in range(256)]


# (UNet, VAE, CLIP text) configs. `tiny` keeps SD 1.5's four down and four up blocks and two
# layers per block so that exporters keyed on that layout can be tested on it.
TINY = (
    dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
         block_out_channels=(32, 32, 64, 64), norm_num_groups=8, cross_attention_dim=32,
         attention_head_dim=4,
         down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
         up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
    dict(sample_size=128, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
         block_out_channels=(16, 32, 32, 32), norm_num_groups=8, scaling_factor=0.18215,
         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
    dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
         max_position_embeddings=77, projection_dim=32, hidden_act="quick_gelu"),
)
SD15 = (
    dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
         block_out_channels=(320, 640, 1280, 1280), norm_num_groups=32, cross_attention_dim=768,
         attention_head_dim=8,
         down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
         up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
    dict(sample_size=512, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
         block_out_channels=(128, 256, 512, 512), norm_num_groups=32, scaling_factor=0.18215,
         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
    dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
         num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
         hidden_act="quick_gelu"),
)
