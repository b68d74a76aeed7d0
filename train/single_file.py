"""Single-file export: a pipeline as one original-layout Stable Diffusion `.safetensors` checkpoint.

AUTOMATIC1111, ComfyUI and diffusers' `from_single_file` load the layout of the original
(CompVis / Stability SGM) code, not diffusers' folders. This maps a pipeline's UNet, VAE and text
encoder(s) to it:

    sd1   model.diffusion_model.*  first_stage_model.*  cond_stage_model.transformer.text_model.*
    sd2   the same, but the OpenCLIP text encoder as cond_stage_model.model.* (fused q/k/v)
    sdxl  model.diffusion_model.*  first_stage_model.*  conditioner.embedders.0.transformer.
          text_model.* (CLIP-L)  conditioner.embedders.1.model.* (OpenCLIP bigG, text_projection)

    python -c "from train.models import build_builtin; from train.single_file import \\
        save_single_file; save_single_file(build_builtin('tiny'), 'tiny.safetensors')"

Every tensor gets exactly one name, and a tensor without one is an error rather than left out.
Load it back with `StableDiffusionPipeline.from_single_file(path, config=<diffusers folder>)`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from . import families

UNET = "model.diffusion_model."
VAE = "first_stage_model."

# Renames inside a block, applied to what follows the block's prefix.
UNET_RESNET = {"norm1.": "in_layers.0.", "conv1.": "in_layers.2.", "norm2.": "out_layers.0.",
               "conv2.": "out_layers.3.", "time_emb_proj.": "emb_layers.1.",
               "conv_shortcut.": "skip_connection."}
VAE_RESNET = {"conv_shortcut.": "nin_shortcut."}
VAE_ATTENTION = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.",
                 "to_out.0.": "proj_out."}
OPEN_CLIP_LAYER = {"layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.", "mlp.fc1.": "mlp.c_fc.",
                   "mlp.fc2.": "mlp.c_proj.", "self_attn.out_proj.": "attn.out_proj.",
                   "self_attn.in_proj_": "attn.in_proj_"}


def unet_table(config) -> list[tuple[str, str, dict]]:
    """(diffusers prefix, original prefix, inner renames) for a UNet2DConditionModel.

    The original numbers its blocks flatly: input_blocks.0 is conv_in, then per level one entry
    per layer (.0 resnet, .1 attention) and one for the downsampler; output_blocks has one entry
    per up layer, the upsampler riding on each level's last entry after resnet (and attention)."""
    n = config.layers_per_block
    table = [("time_embedding.linear_1.", "time_embed.0.", {}),
             ("time_embedding.linear_2.", "time_embed.2.", {}),
             ("add_embedding.linear_1.", "label_emb.0.0.", {}),  # SDXL's size/pooled conditioning
             ("add_embedding.linear_2.", "label_emb.0.2.", {}),
             ("conv_in.", "input_blocks.0.0.", {}),
             ("conv_norm_out.", "out.0.", {}),
             ("conv_out.", "out.2.", {}),
             ("mid_block.resnets.0.", "middle_block.0.", UNET_RESNET),
             ("mid_block.attentions.0.", "middle_block.1.", {}),
             ("mid_block.resnets.1.", "middle_block.2.", UNET_RESNET)]
    for i in range(len(config.down_block_types)):
        for j in range(n):
            k = 1 + i * (n + 1) + j
            table += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{k}.0.", UNET_RESNET),
                      (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{k}.1.", {})]
        table.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{k + 1}.0.op.", {}))
    for i, kind in enumerate(config.up_block_types):
        for j in range(n + 1):
            k = i * (n + 1) + j
            table += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{k}.0.", UNET_RESNET),
                      (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{k}.1.", {})]
        slot = 2 if kind.startswith("CrossAttn") else 1
        table.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{k}.{slot}.", {}))
    return table


def vae_table(config) -> list[tuple[str, str, dict]]:
    """The same for an AutoencoderKL; the original counts decoder levels from the bottom up."""
    levels, n = len(config.down_block_types), config.layers_per_block
    table = [(name, name, {}) for name in ("encoder.conv_in.", "encoder.conv_out.",
                                           "decoder.conv_in.", "decoder.conv_out.",
                                           "quant_conv.", "post_quant_conv.")]
    for part in ("encoder", "decoder"):
        table += [(f"{part}.conv_norm_out.", f"{part}.norm_out.", {}),
                  (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", VAE_RESNET),
                  (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", VAE_RESNET),
                  (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", VAE_ATTENTION)]
    for i in range(levels):
        up = levels - 1 - i
        table += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.",
                   VAE_RESNET) for j in range(n)]
        table += [(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{up}.block.{j}.",
                   VAE_RESNET) for j in range(n + 1)]
        table += [(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.", {}),
                  (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{up}.upsample.", {})]
    return table


def open_clip_table(config) -> list[tuple[str, str, dict]]:
    """OpenCLIP's names for a CLIP text model, once `open_clip_state_dict` has fused q/k/v."""
    return [("embeddings.token_embedding.", "token_embedding.", {}),
            ("embeddings.position_embedding.weight", "positional_embedding", {}),
            ("final_layer_norm.", "ln_final.", {}),
            ("text_projection.weight", "text_projection", {})] + [
        (f"encoder.layers.{i}.", f"transformer.resblocks.{i}.", OPEN_CLIP_LAYER)
        for i in range(config.num_hidden_layers)]


def rename(state_dict: dict, table, what: str) -> dict:
    """Swap each key's table prefix for the original one, then the inner name that follows."""
    out = {}
    for key, tensor in state_dict.items():
        src, dst, inner = next((row for row in table if key.startswith(row[0])), (None,) * 3)
        if src is None:
            raise ValueError(f"single-file export: no original name for {what} key {key!r}")
        if ".base_layer." in key or ".lora_" in key:  # would get a name no loader knows
            raise ValueError(f"single-file export: {what} has LoRA layers; merge them first")
        rest = key[len(src):]
        name = next((name for name in inner if rest.startswith(name)), None)
        out[dst + (inner[name] + rest[len(name):] if name else rest)] = tensor
    return out


def unet_state_dict(unet) -> dict:
    return rename(unet.state_dict(), unet_table(unet.config), "unet")


def vae_state_dict(vae) -> dict:
    out = rename(vae.state_dict(), vae_table(vae.config), "vae")
    # The original's mid-block attention uses 1x1 convolutions where diffusers has linear layers.
    for key, tensor in out.items():
        if ".mid.attn_1." in key and key.endswith("weight") and tensor.ndim == 2:
            out[key] = tensor[:, :, None, None]
    return out


def clip_state_dict(text_encoder) -> dict:
    # transformers 5 dropped the `text_model.` level that every single-file loader expects.
    return {k if k.startswith("text_model.") else "text_model." + k: v
            for k, v in text_encoder.state_dict().items()}


def open_clip_state_dict(text_encoder) -> dict:
    state = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    for i in range(text_encoder.config.num_hidden_layers):
        # OpenCLIP keeps q, k and v as one in_proj (nn.MultiheadAttention), stacked in that order.
        for part in ("weight", "bias"):
            names = [f"encoder.layers.{i}.self_attn.{x}_proj.{part}" for x in "qkv"]
            state[f"encoder.layers.{i}.self_attn.in_proj_{part}"] = torch.cat(
                [state.pop(name) for name in names])
    if "text_projection.weight" in state:  # OpenCLIP multiplies by it: x @ P, a Linear's W.T
        state["text_projection.weight"] = state["text_projection.weight"].T
    return rename(state, open_clip_table(text_encoder.config), "text encoder")


# Per family: (pipeline attribute, prefix in the file, conversion) for each text encoder; the
# families say where (train/families: SINGLE_FILE_TEXT), this module how.
CONVERSIONS = {"clip": clip_state_dict, "open_clip": open_clip_state_dict}
TEXT_ENCODERS = {kind: [(attr, prefix, CONVERSIONS[layout]) for attr, prefix, layout in rows]
                 for kind, rows in families.SINGLE_FILE_TEXT.items()}


def single_file_state_dict(pipe) -> dict[str, torch.Tensor]:
    """The pipeline's UNet, VAE and text encoder(s) under their original single-file names
    (the pipeline's own tensors, views of them, or fused q/k/v: nothing is cast)."""
    parts = [(UNET, unet_state_dict(pipe.unet)), (VAE, vae_state_dict(pipe.vae))]
    parts += [(prefix, convert(getattr(pipe, attr)))
              for attr, prefix, convert in TEXT_ENCODERS[families.of(pipe)]]
    return {prefix + key: tensor for prefix, state in parts for key, tensor in state.items()}


def save_single_file(pipe, path: str | Path, dtype: torch.dtype = torch.float16) -> None:
    """Write `single_file_state_dict(pipe)` in `dtype` to `path` (.safetensors), with the family
    ("sd1", "sd2", "sdxl") in the file's metadata."""
    tensors = {k: v.detach().to("cpu", dtype).contiguous()
               for k, v in single_file_state_dict(pipe).items()}
    save_file(tensors, str(path), metadata={"format": "pt", "family": families.of(pipe)})


def checkpoint_family(keys) -> str | None:
    """The family whose UNet and text-encoder prefixes all occur among a checkpoint's `keys`, or
    None (not a full SD 1.x/2.x/XL checkpoint: a UNet alone, a refiner, another model)."""
    keys = list(keys)
    for kind, encoders in TEXT_ENCODERS.items():
        prefixes = [UNET] + [prefix for _, prefix, _ in encoders]
        if all(any(key.startswith(p) for key in keys) for p in prefixes):
            return kind
    return None
