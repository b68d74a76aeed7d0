"""The tarball describes itself: which file each tool takes, and a model card (README.md with
the YAML front matter the Hugging Face Hub reads), so that uploading the untarred folder to the
Hub shows a proper page.

    uses = file_uses(["model_index.json", "lora.safetensors"])   # -> training.json "files"
    (out / "README.md").write_text(model_card(config, kind, uses, samples, base_model))
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .config import TrainConfig
from .families import FAMILY_NAMES

# What each output file is, and which tools take it, from where. ComfyUI (v0.3.64) reads the
# kohya-layout lora.safetensors but not all of diffusers' own LoRA layout: it skips the UNet
# attention keys of lora/pytorch_lora_weights.safetensors and reads the rest at half scale (and
# SD 3.x's and FLUX's without their alpha / r), so that file is for diffusers only. diffusers
# 0.42 has no reader of an SD 3.x kohya LoRA: there, lora/.
USES = {
    "model_index.json": (
        "the diffusers folder (model_index.json and its component folders)",
        [("diffusers", 'DiffusionPipeline.from_pretrained("this folder")')]),
    "model.safetensors": (
        "the whole model in one file, in the original Stable Diffusion key layout",
        [("AUTOMATIC1111 / Forge", "models/Stable-diffusion/"),
         ("ComfyUI", "models/checkpoints/ (Load Checkpoint)"),
         ("diffusers", 'StableDiffusionPipeline.from_single_file("model.safetensors")')]),
    "transformer.safetensors": (
        "the transformer alone, in its original key layout (Stability AI's for SD 3.5, Black "
        "Forest Labs' for FLUX.1), to use with the base model's text encoders and VAE",
        [("ComfyUI", "models/diffusion_models/ (Load Diffusion Model)"),
         ("diffusers", 'SD3Transformer2DModel / FluxTransformer2DModel.from_single_file('
                       '"transformer.safetensors", config=BASE_FOLDER, subfolder="transformer")')]),
    "lora.safetensors": (
        "LoRA in the kohya/webui layout",
        [("AUTOMATIC1111 / Forge", "models/Lora/, then <lora:lora:1> in the prompt"),
         ("ComfyUI", "models/loras/ (Load LoRA)"),
         ("diffusers", 'pipe.load_lora_weights("this folder", '
                       'weight_name="lora.safetensors") (SD 3.x: lora/ instead)')]),
    "lora/pytorch_lora_weights.safetensors": (
        "LoRA in diffusers' own layout (not for ComfyUI or AUTOMATIC1111)",
        [("diffusers", 'pipe.load_lora_weights("this folder/lora")')]),
}
# The base model's license, by family (Stable Diffusion 1.x is CreativeML Open RAIL-M; 2.x and
# XL are CreativeML Open RAIL++-M; 3.5 is Stability AI's Community License and FLUX.1 [dev] its
# own non-commercial license, both "other" on the Hub with their names beside; FLUX.2 [klein]
# is Apache 2.0 at 4B and non-commercial at 9B, which the family does not tell apart: "other").
LICENSES = {"sd1": "creativeml-openrail-m", "sd2": "openrail++", "sdxl": "openrail++",
            "sd3": "other", "flux": "other", "flux2": "other"}
LICENSE_NAMES = {"sd3": "stabilityai-ai-community", "flux": "flux-1-dev-non-commercial-license"}
HUB_TAGS = {"sd1": "stable-diffusion", "sd2": "stable-diffusion", "sdxl": "stable-diffusion-xl",
            "sd3": "stable-diffusion-3", "flux": "flux", "flux2": "flux"}


def file_uses(written: list[str]) -> dict[str, dict]:
    """training.json's "files": for each file the export wrote, what it is and which tools
    take it (tool -> where or how)."""
    return {name: {"what": USES[name][0], "for": dict(USES[name][1])}
            for name in written if name in USES}


def base_model_id(model: str) -> str | None:
    """The Hub id of the base model, when known: script/download-weights records it in the
    folder's source.json; a built-in or a folder of unknown origin has none."""
    source = Path(model) / "source.json"
    try:
        name = json.loads(source.read_text()).get("model")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", name) else None


def model_card(config: TrainConfig, kind: str, uses: dict[str, dict], samples: list[str],
               base_model: str | None) -> str:
    """README.md for the untarred folder: front matter for the Hub, then what it is, its
    trigger, and which file goes where."""
    tags = ["text-to-image", HUB_TAGS[kind], "diffusers", "dreambooth", "cog-dreambooth"]
    if "lora.safetensors" in uses:
        tags.append("lora")
    front = {"license": LICENSES[kind], "library_name": "diffusers", "tags": tags,
             "instance_prompt": config.instance_prompt}
    if kind in LICENSE_NAMES:
        front["license_name"] = LICENSE_NAMES[kind]
    if base_model:
        front["base_model"] = base_model
    if samples and config.save_sample_prompt:
        front["widget"] = [{"text": config.save_sample_prompt, "output": {"url": path}}
                           for path in samples[:4]]
    # JSON is YAML: every value is quoted, whatever a prompt holds.
    lines = ["---", *(f"{key}: {json.dumps(value)}" for key, value in front.items()), "---", ""]
    base = base_model or f"the {FAMILY_NAMES[kind]} model `{config.model}`"
    lines += [f"# DreamBooth: {config.instance_prompt}", "",
              f"{'LoRA adapters for' if config.use_lora else 'A fine-tune of'} {base}, trained "
              f"with DreamBooth by cog-dreambooth on photos of one subject. Put the trigger, "
              f"`{config.instance_prompt}`, in your prompt to draw it.", ""]
    if config.with_prior_preservation and config.class_prompt:
        lines += [f"Trained with prior preservation on `{config.class_prompt}`, so the rest of "
                  f"the class keeps its look.", ""]
    lines += ["## Which file goes where", "", "| file | what it is | tool | where or how |",
              "|---|---|---|---|"]
    for name, use in uses.items():
        for tool, where in use["for"].items():
            lines.append(f"| `{name}` | {use['what']} | {tool} | `{where}` |")
    lines.append("")
    if samples:
        lines += ["## Samples", "", f"`{config.save_sample_prompt}`:", ""]
        lines += [f"![sample]({path})" for path in samples[:4]] + [""]
    lines += ["Every setting, the loss per step and the photos trained on are in "
              "`training.json`.", ""]
    return "\n".join(lines)
