"""Pretrain `toy`: a Stable-Diffusion-shaped model of the toy world (toy/world.py).

    nice -n 10 python -m toy.pretrain                    # all stages, writes toy/model/
    python -m toy.pretrain --stage vae --work /tmp/toy    # one stage (vae, vae-crop,
                                                                # diffusion, save)
    python -m toy.pretrain --stage diffusion --work W2 --set init=W/pipeline steps=1500
                                                                # go on training a saved one

Same family as Stable Diffusion 1.x, at toy sizes: an AutoencoderKL (64 px images to 4 x 16 x 16
latents), a CLIPTextModel with an offline CLIP-style tokenizer whose words are
the world's (plus rare identifiers such as `sks`), a UNet2DConditionModel with cross-attention,
and SD 1.5's noise schedule with a DDIM sampler. Trained in stages, on world images drawn fresh
from a seed:

  vae        the autoencoder alone (reconstruction + a tiny KL term) on whole images, half of
             them scenes and half world.collage() (shapes on shapes, which no caption
             describes: the autoencoder must draw more than the captioned world, as SD's does)
  vae-crop   the same on 32 px crops of them (4x cheaper a step; colours and edges settle)
  diffusion  text encoder and UNet together on cached latents, epsilon prediction with Min-SNR
             weighting, 10 % caption dropout (for classifier-free guidance), offset noise (flat
             backgrounds need their mean colour learned), EMA weights exported

then `save` writes the diffusers folder in fp16 (toy/model/, a few MB, committed) with the
project's own exporter, so `--model toy` works offline. Every setting is in SETTINGS below; the
run's numbers (stage times, loss history) go into toy/model/pretraining.json. HELD_OUT
combinations of the world are never drawn for the diffusion stage. On a 2-core CPU the whole
run takes about 28 minutes (QUALITY.md has the command that made the shipped model and what
it scores).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from train.quiet import quiet_libraries

from . import world

TOY_FOLDER = Path(__file__).resolve().parent / "model"
WORDS = ("a photo of on background " + " ".join(world.SHAPES) + " " + " ".join(world.COLOURS)
         + " sks zwx ohwx").split()
MAX_TOKENS = 16  # the longest world caption is 11 tokens with start and end

SETTINGS = dict(
    seed=0,
    threads=2,            # these machines' 2 cores; use 1 when another job shares them (more
                          # threads than free cores is many times slower)
    # vae stage
    vae_steps=400, vae_batch=16, vae_lr=2e-3, kl_weight=1e-6,
    vae_collage=0.5,      # share of each batch that is world.collage(), not a scene
    # then on random 32 px crops of scenes: 4x cheaper a step, the colours and edges settle
    vae_crop_steps=400, vae_crop_batch=32, vae_crop_lr=1e-3, vae_crop=32,
    # diffusion stage
    images=10000,         # scenes whose latents are cached (each seen ~10 times)
    steps=3000, batch=32, lr=1e-3, warmup=100, caption_dropout=0.1, offset_noise=0.1,
    ema_decay=0.999, grad_clip=1.0,
    snr_gamma=5.0,        # Min-SNR loss weighting (Hang et al. 2023); 0 turns it off
    init="",              # a pipeline folder to go on training from, instead of fresh weights
)
# 4x down, not SD's 8x: an 8x toy autoencoder (16-64 channels) had not learned colours after
# 700 steps, this one reconstructs in a few hundred. Groups of 4-8 channels in GroupNorm: with
# one channel per group (16 groups of 16) the norm erases each channel's mean, i.e. the colour.
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
           block_out_channels=(32, 64, 64), norm_num_groups=8, sample_size=world.SIZE,
           down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
# Three levels (16, 8, 4 px of latent); cross-attention on the two coarser ones only, which keeps
# a step at ~0.3 s for a batch of 32 on 2 free cores (attention at every level: 2.8x that).
UNET = dict(sample_size=world.SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64, 128), norm_num_groups=16, cross_attention_dim=64,
            attention_head_dim=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
CLIP = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS, projection_dim=64, hidden_act="quick_gelu")
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 num_train_timesteps=1000, steps_offset=1, clip_sample=False,
                 set_alpha_to_one=False)


def tokenizer():
    """The toy's tokenizer: the project's offline CLIP-style BPE with the world's words whole."""
    from train.models import build_tokenizer

    tok = build_tokenizer(words=WORDS)
    tok.model_max_length = MAX_TOKENS
    return tok


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [n, h, w, 3] -> float [n, 3, h, w] in [-1, 1], as diffusers' VAEs take them."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def train_vae(settings: dict, log=print, vae=None, crop: bool = False):
    """Train the autoencoder from scratch on whole scenes, or (`crop`) go on training `vae` on
    random crops of them."""
    from diffusers import AutoencoderKL

    torch.manual_seed(settings["seed"] + crop)
    rng = np.random.default_rng(settings["seed"] + crop)
    if vae is not None:
        return _fit_vae(vae.train(), settings, rng, crop, log)
    vae = AutoencoderKL(**VAE)
    with torch.no_grad():
        # Start with a near-deterministic posterior (log-variance -10). At the default 0 the
        # sampling noise (std 1) drowns the latents (std ~0.2 at first) and the autoencoder
        # hardly learns in a few hundred steps; the trainer samples latents from this
        # posterior too, so its variance must stay small.
        n = VAE["latent_channels"]
        vae.quant_conv.weight[n:] = 0
        vae.quant_conv.bias[n:] = -10.0
    return _fit_vae(vae, settings, rng, False, log)


def _fit_vae(vae, settings: dict, rng, crop: bool, log):
    key = "vae_crop_" if crop else "vae_"
    lr, steps, batch = settings[key + "lr"], settings[key + "steps"], settings[key + "batch"]
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        for group in opt.param_groups:  # cosine decay: sharper edges at the end
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        n_collage = int(batch * settings["vae_collage"])
        x = to_tensor(np.concatenate([
            world.render_array([world.random_scene(rng, held_out="any")
                                for _ in range(batch - n_collage)]),
            np.stack([np.asarray(world.collage(rng)) for _ in range(n_collage)])]))
        if crop:  # one random window per batch (the autoencoder is convolutional)
            size = settings["vae_crop"]
            top, left = rng.integers(0, world.SIZE - size + 1, 2)
            x = x[:, :, top:top + size, left:left + size]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        # L1 keeps edges sharp; the tiny KL keeps latents near unit scale and smooth.
        rec = (recon - x).abs().mean() + ((recon - x) ** 2).mean()
        kl = posterior.kl().mean() / x[0].numel()
        loss = rec + settings["kl_weight"] * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == 1:
            log(f"{key}{step}/{steps}  rec {rec.item():.4f}  kl {kl.item():.1f}  "
                f"{time.perf_counter() - start:.0f}s")
    return vae.eval()


def encode_world(vae, settings: dict, log=print):
    """Scenes for the diffusion stage, their latents (posterior means) and caption variants."""
    rng = np.random.default_rng(settings["seed"] + 1)
    scenes = [world.random_scene(rng) for _ in range(settings["images"])]  # HELD_OUT excluded
    latents = []
    with torch.no_grad():
        for i in range(0, len(scenes), 256):
            x = to_tensor(world.render_array(scenes[i:i + 256]))
            latents.append(vae.encode(x).latent_dist.mean)
    latents = torch.cat(latents)
    log(f"encoded {len(scenes)} scenes: latents {tuple(latents.shape[1:])}, "
        f"std {latents.std().item():.3f}")
    return scenes, latents


def caption_ids(tok, scenes) -> torch.Tensor:
    """Token ids [n, forms, MAX_TOKENS]: per scene its world.caption_forms(), padded to the full
    length as the pipeline pads prompts."""
    flat = [c for s in scenes for c in world.caption_forms(s)]
    unique = sorted(set(flat))
    ids = tok(unique, padding="max_length", max_length=MAX_TOKENS, truncation=True,
              return_tensors="pt").input_ids
    index = {c: i for i, c in enumerate(unique)}
    return ids[torch.tensor([index[c] for c in flat])].view(len(scenes), -1, MAX_TOKENS)


def train_diffusion(vae, settings: dict, log=print):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(settings["seed"])
    tok = tokenizer()
    cache = Path(settings["work"]) / f"latents-{settings['images']}.pt"
    if cache.exists():  # encoding the scenes takes minutes; a continued run reuses them
        scenes, latents = torch.load(cache, weights_only=False)
    else:
        scenes, latents = encode_world(vae, settings, log)
        torch.save((scenes, latents), cache)
    scale = 1.0 / latents.std().item()
    latents = latents * scale
    ids = caption_ids(tok, scenes)
    empty = tok([""], padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, **CLIP))
    unet = UNet2DConditionModel(**UNET)
    if settings["init"]:  # go on from a saved pipeline (a fresh optimizer and schedule)
        text = CLIPTextModel.from_pretrained(Path(settings["init"]) / "text_encoder")
        unet = UNet2DConditionModel.from_pretrained(Path(settings["init"]) / "unet")
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=settings["lr"], weight_decay=0.01, fused=True)
    ema = [p.detach().clone() for p in params]
    noise_scheduler = DDPMScheduler.from_config(SCHEDULER)  # ignores DDIM-only keys
    alphas = noise_scheduler.alphas_cumprod
    snr_of = alphas / (1 - alphas)
    gen = torch.Generator().manual_seed(settings["seed"])
    form_p = torch.tensor(world.CAPTION_SHARES)
    steps, batch, start = settings["steps"], settings["batch"], time.perf_counter()
    history = []
    for step in range(1, steps + 1):
        warm = min(1.0, step / settings["warmup"])
        for group in opt.param_groups:
            group["lr"] = settings["lr"] * warm * (0.55 + 0.45 * math.cos(math.pi * step / steps))
        rows = torch.randint(0, len(scenes), (batch,), generator=gen)
        forms = torch.multinomial(form_p, batch, replacement=True, generator=gen)
        prompt = ids[rows, forms]
        drop = torch.rand(batch, generator=gen) < settings["caption_dropout"]
        prompt[drop] = empty[0]
        x0 = latents[rows]
        noise = torch.randn(x0.shape, generator=gen)
        noise += settings["offset_noise"] * torch.randn(x0.shape[:2] + (1, 1), generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), generator=gen)
        noisy = noise_scheduler.add_noise(x0, noise, t)
        pred = unet(noisy, t, text(prompt)[0]).sample
        loss = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
        if settings["snr_gamma"]:
            # Weigh each timestep by min(SNR, gamma) / SNR: the near-clean steps, which are
            # easy and would dominate, count less; the noisy ones that fix shape and colour more.
            snr = snr_of[t]
            loss = loss * snr.clamp(max=settings["snr_gamma"]) / snr
        loss = loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, settings["grad_clip"])
        opt.step()
        with torch.no_grad():
            rate = min(settings["ema_decay"], (1 + step) / (10 + step))
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - rate)
        if step % 50 == 0 or step == 1:
            elapsed = time.perf_counter() - start
            history.append({"step": step, "loss": round(loss.item(), 5),
                            "time": round(elapsed, 1)})
            log(f"diffusion {step}/{steps}  loss {loss.item():.4f}  {elapsed:.0f}s")
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    return text.eval(), unet.eval(), tok, scale, history


def build_pipeline(vae, text, unet, tok, scale: float):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    vae.register_to_config(scaling_factor=scale)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
        scheduler=DDIMScheduler(**SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m toy.pretrain",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=["all", "vae", "vae-crop", "diffusion", "save"],
                        default="all")
    parser.add_argument("--work", default="/tmp/toy-pretrain",
                        help="folder for the stages' intermediate weights")
    parser.add_argument("--out", default=str(TOY_FOLDER), help="diffusers folder to write")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. --set steps=100 images=2000")
    args = parser.parse_args(argv)
    settings = dict(SETTINGS, work=args.work)
    for item in args.set:
        key, value = item.split("=", 1)
        settings[key] = type(SETTINGS[key])(value)
    torch.set_num_threads(settings["threads"])
    quiet_libraries(loading=True)
    from diffusers import AutoencoderKL

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    record_path = work / "pretraining.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    record["settings"] = settings
    start = time.perf_counter()
    if args.stage in ("all", "vae"):
        vae = train_vae(settings)
        vae.save_pretrained(work / "vae")
        record["vae_seconds"] = round(time.perf_counter() - start, 1)
    if args.stage in ("all", "vae-crop"):
        t0 = time.perf_counter()
        vae = train_vae(settings, vae=AutoencoderKL.from_pretrained(work / "vae"), crop=True)
        vae.save_pretrained(work / "vae")
        record["vae_crop_seconds"] = round(time.perf_counter() - t0, 1)
    if args.stage in ("all", "diffusion"):
        t0 = time.perf_counter()
        vae = AutoencoderKL.from_pretrained(work / "vae")
        text, unet, tok, scale, history = train_diffusion(vae, settings)
        pipe = build_pipeline(vae, text, unet, tok, scale)
        pipe.save_pretrained(work / "pipeline")  # fp32, before the fp16 export
        record.update(diffusion_seconds=round(time.perf_counter() - t0, 1), history=history)
    if args.stage in ("all", "save"):
        from train.export import save_pipeline
        from train.models import load_pipeline

        pipe = load_pipeline(str(work / "pipeline"), "cpu")
        out = Path(args.out)
        save_pipeline(pipe, out, torch.float16)
        (out / "pretraining.json").write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {out}")
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
