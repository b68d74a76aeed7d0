"""Subject- and prompt-fidelity metrics of the DreamBooth paper, and the feature models they use.

    python -m train.metrics a.png b.png --dino tiny --clip tiny   # DINO and CLIP-I of two images

The metrics are cosine similarities between image (and text) features:

  DINO    mean cosine of DINO ViT-S/16 features (the CLS token) over every (generated, real)
          image pair: does the subject look like the photos?
  CLIP-I  the same with CLIP image features.
  CLIP-T  mean cosine between each generated image's CLIP features and its prompt's: does the
          image show what the prompt asked for?
  PRES    DINO between images of the plain class prompt and the real photos: how much the
          class as a whole now looks like the subject (lower is better: a low value means the
          model still draws other dogs when asked for "a dog").
  DIV     1 - mean DINO cosine between images of one prompt, averaged over prompts: how much
          the images of one prompt differ (0 when identical).

Feature models are transformers models read from local folders: DINO a `ViTModel`
(facebook/dino-vits16), CLIP a `CLIPModel` (openai/clip-vit-base-patch32), as
script/download-weights saves them. Built-in names, built in code with random weights fixed by a
seed: `tiny` (toy widths, seconds on a CPU: CI runs the whole evaluation with it) and `random`
(the real ViT-S/16 and ViT-B/32 architectures: speed and memory of the real models). Images are
prepared as each model's `preprocessor_config.json` says (resize, centre crop, mean and std),
with PIL and numpy: torchvision is never needed.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .config import DEFAULT_CLIP, DEFAULT_DINO
from .errors import UserError
from .tokenizers import build_tokenizer

FEATURE_BUILTINS = ["tiny", "random"]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


# --- Metrics on features ------------------------------------------------------------------------

def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[n, m] cosine similarities between the rows of `a` [n, d] and of `b` [m, d]."""
    a = torch.nn.functional.normalize(a.double(), dim=-1)
    b = torch.nn.functional.normalize(b.double(), dim=-1)
    return a @ b.T


def cross_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine over every pair (row of a, row of b): DINO, CLIP-I and PRES."""
    return float(cosine_matrix(a, b).mean())


def self_similarity(a: torch.Tensor) -> float:
    """Mean cosine over distinct pairs of rows of `a` (needs at least two): the paper's "real
    images" reference (photo against the other photos), and the basis of DIV."""
    n = len(a)
    if n < 2:
        raise ValueError("self_similarity needs at least two feature vectors")
    sims = cosine_matrix(a, a)
    return float((sims.sum() - sims.diagonal().sum()) / (n * (n - 1)))


def paired_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine of row i of `a` with row i of `b`: CLIP-T (image i with its prompt)."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"paired_similarity needs as many rows in both ({a.shape[0]} and "
                         f"{b.shape[0]})")
    a = torch.nn.functional.normalize(a.double(), dim=-1)
    b = torch.nn.functional.normalize(b.double(), dim=-1)
    return float((a * b).sum(-1).mean())


def diversity(groups: list[torch.Tensor]) -> float:
    """DIV: 1 - mean cosine between distinct images of the same prompt, averaged over the
    prompts (groups of features) that have two images or more."""
    scores = [1.0 - self_similarity(g) for g in groups if len(g) >= 2]
    if not scores:
        raise ValueError("diversity needs a prompt with at least two images")
    return float(np.mean(scores))


# --- Feature models -----------------------------------------------------------------------------

@dataclass
class FeatureModels:
    """DINO and CLIP with their preprocessing (the preprocessor_config.json of each), and where
    they came from (a folder or a built-in name), for the report."""
    dino: torch.nn.Module        # transformers ViTModel
    dino_prep: dict
    clip: torch.nn.Module        # transformers CLIPModel
    clip_prep: dict
    tokenizer: object            # CLIPTokenizer of the CLIP model
    sources: dict                # {"dino": ..., "clip": ...}


def check_feature_models(dino: str, clip: str) -> None:
    """Raise UserError unless both are built-in names or folders holding a model (cheap: run
    before any model loads)."""
    for name, source in (("dino", dino), ("clip", clip)):
        if source not in FEATURE_BUILTINS and not (Path(source) / "config.json").is_file():
            raise UserError(
                f"{name} feature model {source!r} not found: run script/download-weights "
                f"--eval to fetch DINO and CLIP into weights/, or pass a folder holding a "
                f"transformers model (config.json), or a built-in name "
                f"({', '.join(FEATURE_BUILTINS)})")


def load_feature_models(dino: str, clip: str, device: torch.device | str = "cpu"
                        ) -> FeatureModels:
    """Feature models from local folders (as script/download-weights writes them) or built-in
    names (tiny, random), in fp32 on `device`, in eval mode."""
    from transformers import CLIPModel, CLIPTokenizer, ViTModel

    check_feature_models(dino, clip)
    built = {}
    if dino in FEATURE_BUILTINS or clip in FEATURE_BUILTINS:
        built = {name: build_feature_models(name) for name in {dino, clip} & set(FEATURE_BUILTINS)}
    if dino in built:
        dino_model, dino_prep = built[dino].dino, built[dino].dino_prep
    else:
        # No pooling layer: DINO's feature is the CLS token after the final layer norm.
        dino_model = ViTModel.from_pretrained(dino, add_pooling_layer=False,
                                              local_files_only=True, dtype=torch.float32)
        dino_prep = _read_prep(Path(dino))
    if clip in built:
        clip_model, clip_prep, tokenizer = (built[clip].clip, built[clip].clip_prep,
                                            built[clip].tokenizer)
    else:
        clip_model = CLIPModel.from_pretrained(clip, local_files_only=True, dtype=torch.float32)
        clip_prep = _read_prep(Path(clip))
        tokenizer = CLIPTokenizer.from_pretrained(clip, local_files_only=True)
    return FeatureModels(dino_model.to(device).eval(), dino_prep, clip_model.to(device).eval(),
                         clip_prep, tokenizer, {"dino": dino, "clip": clip})


def _read_prep(folder: Path) -> dict:
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        raise UserError(f"feature model {str(folder)!r} has no preprocessor_config.json: it says "
                        f"how images are resized and normalised; save the model with its image "
                        f"processor (script/download-weights does)")
    return json.loads(path.read_text())


def build_feature_models(name: str, device: torch.device | str = "cpu") -> FeatureModels:
    """A built-in pair of feature models, weights fixed by seed 0: `tiny` (toy widths, 32 px
    input) or `random` (DINO ViT-S/16 and CLIP ViT-B/32 at their real sizes)."""
    from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

    if name not in FEATURE_BUILTINS:
        raise ValueError(f"built-in feature models are {', '.join(FEATURE_BUILTINS)} "
                         f"(got {name!r})")
    tokenizer = build_tokenizer()
    dino_cfg, vision_cfg, text_cfg, side, projection = FEATURE_CONFIGS[name]
    text_cfg = dict(text_cfg, vocab_size=max(text_cfg.get("vocab_size", 0), len(tokenizer)),
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        dino = ViTModel(ViTConfig(**dino_cfg), add_pooling_layer=False)
        clip = CLIPModel(CLIPConfig(text_config=text_cfg, vision_config=vision_cfg,
                                    projection_dim=projection))
    # As the real models' processors say: DINO squashes to a square, CLIP resizes the short
    # side and crops the centre (resample 2 is bilinear, 3 bicubic).
    dino_prep = {"do_resize": True, "size": {"height": side, "width": side}, "resample": 2,
                 "do_center_crop": False, "image_mean": IMAGENET_MEAN,
                 "image_std": IMAGENET_STD}
    clip_prep = {"do_resize": True, "size": {"shortest_edge": side}, "resample": 3,
                 "do_center_crop": True, "crop_size": {"height": side, "width": side},
                 "image_mean": CLIP_MEAN, "image_std": CLIP_STD}
    return FeatureModels(dino.eval(), dino_prep, clip.eval(), clip_prep, tokenizer,
                         {"dino": name, "clip": name})


def save_feature_models(models: FeatureModels, dino_folder: Path, clip_folder: Path) -> None:
    """Write both models as folders that load_feature_models reads (as the downloads are)."""
    for model, prep, folder in ((models.dino, models.dino_prep, Path(dino_folder)),
                                (models.clip, models.clip_prep, Path(clip_folder))):
        model.save_pretrained(folder, safe_serialization=True)
        (folder / "preprocessor_config.json").write_text(json.dumps(prep, indent=2) + "\n")
    models.tokenizer.save_pretrained(clip_folder)


# (DINO ViT, CLIP vision, CLIP text, input side, CLIP projection width) per built-in.
TINY_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                image_size=32, patch_size=8)
FEATURE_CONFIGS = {
    "tiny": (TINY_VIT, TINY_VIT, dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=77),
             32, 16),
    "random": (dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                    intermediate_size=1536, image_size=224, patch_size=16),
               dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=3072, image_size=224, patch_size=32),
               dict(vocab_size=49408, hidden_size=512, num_hidden_layers=12,
                    num_attention_heads=8, intermediate_size=2048, max_position_embeddings=77),
               224, 512),
}


# --- Images to features -------------------------------------------------------------------------

def _side_pair(value, default=None) -> tuple[int, int] | None:
    if value is None:
        return default
    if isinstance(value, int):
        return value, value
    return value["height"], value["width"]


def preprocess(images: list[Image.Image], prep: dict) -> torch.Tensor:
    """[n, 3, h, w] float32 pixels as a transformers image processor with `prep` (its
    preprocessor_config.json) makes them: resize (the short side to `size.shortest_edge`, or to
    exactly `size.height` x `size.width`), centre crop to `crop_size`, scale to [0, 1], normalise
    with `image_mean` and `image_std`. PIL and numpy only."""
    resample = Image.Resampling(prep.get("resample", 3))
    size, crop = prep.get("size"), prep.get("crop_size")
    center_crop = prep.get("do_center_crop", crop is not None)
    mean = np.asarray(prep.get("image_mean", IMAGENET_MEAN), dtype=np.float32)
    std = np.asarray(prep.get("image_std", IMAGENET_STD), dtype=np.float32)
    out = []
    for image in images:
        image = image.convert("RGB")
        if prep.get("do_resize", True) and size is not None:
            # An int size is the short side when a crop follows (CLIP's old configs), else a square.
            short = (size.get("shortest_edge") if isinstance(size, dict)
                     else size if center_crop else None)
            if short:
                w, h = image.size
                scale = short / min(w, h)
                target = (max(short, round(w * scale)), max(short, round(h * scale)))
            else:
                height, width = _side_pair(size)
                target = (width, height)
            if target != image.size:
                image = image.resize(target, resample)
        if center_crop and crop is not None:
            height, width = _side_pair(crop)
            left, top = (image.width - width) // 2, (image.height - height) // 2
            image = image.crop((left, top, left + width, top + height))
        pixels = np.asarray(image, dtype=np.float32) * prep.get("rescale_factor", 1 / 255)
        if prep.get("do_normalize", True):
            pixels = (pixels - mean) / std
        out.append(torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))))
    return torch.stack(out)


@torch.no_grad()
def dino_features(models: FeatureModels, images: list[Image.Image],
                  batch_size: int = 16) -> torch.Tensor:
    """[n, d] DINO features: the CLS token of the last layer (after its layer norm), float32 on
    the CPU."""
    device = next(models.dino.parameters()).device
    chunks = []
    for start in range(0, len(images), batch_size):
        pixels = preprocess(images[start:start + batch_size], models.dino_prep).to(device)
        chunks.append(models.dino(pixel_values=pixels).last_hidden_state[:, 0].float().cpu())
    return torch.cat(chunks)


@torch.no_grad()
def clip_image_features(models: FeatureModels, images: list[Image.Image],
                        batch_size: int = 16) -> torch.Tensor:
    """[n, d] CLIP image embeddings (the projected pooled output), float32 on the CPU."""
    device = next(models.clip.parameters()).device
    chunks = []
    for start in range(0, len(images), batch_size):
        pixels = preprocess(images[start:start + batch_size], models.clip_prep).to(device)
        chunks.append(models.clip.get_image_features(pixel_values=pixels).pooler_output
                      .float().cpu())
    return torch.cat(chunks)


@torch.no_grad()
def clip_text_features(models: FeatureModels, prompts: list[str]) -> torch.Tensor:
    """[n, d] CLIP text embeddings of `prompts` (truncated to CLIP's 77 tokens)."""
    device = next(models.clip.parameters()).device
    tokens = models.tokenizer(prompts, padding=True, truncation=True,
                              max_length=models.tokenizer.model_max_length, return_tensors="pt")
    out = models.clip.get_text_features(input_ids=tokens.input_ids.to(device),
                                        attention_mask=tokens.attention_mask.to(device))
    return out.pooler_output.float().cpu()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m train.metrics",
                                     description="DINO and CLIP-I similarity of two images.")
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--dino", default=DEFAULT_DINO,
                        help="DINO folder or built-in name (tiny, random)")
    parser.add_argument("--clip", default=DEFAULT_CLIP,
                        help="CLIP folder or built-in name (tiny, random)")
    args = parser.parse_args()
    try:
        models = load_feature_models(args.dino, args.clip)
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
    pair = [Image.open(p).convert("RGB") for p in (args.a, args.b)]
    print(f"DINO {cross_similarity(*dino_features(models, pair).split(1)):.4f}  "
          f"CLIP-I {cross_similarity(*clip_image_features(models, pair).split(1)):.4f}")
