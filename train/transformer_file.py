"""The transformer of SD 3.x or FLUX.1 as one `.safetensors` in its original key layout: what
Stability AI ships for SD 3.5 (`model.diffusion_model.joint_blocks.N.x_block...`) and Black
Forest Labs for FLUX.1 (`double_blocks.N.img_attn.qkv...`, no prefix). ComfyUI loads either as
a diffusion model (models/diffusion_models/, "Load Diffusion Model"); diffusers reads it with
`SD3Transformer2DModel.from_single_file` / `FluxTransformer2DModel.from_single_file`.

    python -c "from train.models import build_builtin; from train.transformer_file import \\
        save_transformer_file; save_transformer_file(build_builtin('tiny-sd3'), 't.safetensors')"

The original fuses what diffusers keeps apart: q, k and v into one `qkv` (and, in a FLUX
single-stream block, q, k, v and the MLP's input into one `linear1`), concatenated along the
output dimension; and its final AdaLN modulation (and SD 3.x's last context block's) holds
(shift, scale) where diffusers holds (scale, shift). Every tensor of the transformer gets exactly
one place; one left over is an error, not dropped.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from . import families

# The file's key prefix, per family: SD 3.5's files carry the original model's module path.
PREFIX = {"sd3": "model.diffusion_model.", "flux": ""}


def _linear(original: str, *names: str, swap: bool = False) -> list[tuple]:
    """Rules for one original Linear: its weight and bias from diffusers' `names` (fused along
    the outputs when several; halves swapped with `swap`)."""
    return [(f"{original}.{part}", [f"{n}.{part}" for n in names], swap)
            for part in ("weight", "bias")]


def _norm(original: str, name: str) -> list[tuple]:
    return [(original, [f"{name}.weight"], False)]


def sd3_rules(config) -> list[tuple]:
    """(original key, diffusers keys, swap halves) for an SD3Transformer2DModel."""
    rules = [("pos_embed", ["pos_embed.pos_embed"], False),
             *_linear("x_embedder.proj", "pos_embed.proj"),
             *_linear("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
             *_linear("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
             *_linear("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
             *_linear("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
             *_linear("context_embedder", "context_embedder"),
             *_linear("final_layer.linear", "proj_out"),
             *_linear("final_layer.adaLN_modulation.1", "norm_out.linear", swap=True)]
    dual = set(config.dual_attention_layers or ())
    for i in range(config.num_layers):
        x, c, d = f"joint_blocks.{i}.x_block", f"joint_blocks.{i}.context_block", \
            f"transformer_blocks.{i}"
        last = i == config.num_layers - 1  # its context stream ends there: no output side
        rules += [*_linear(f"{x}.attn.qkv", *(f"{d}.attn.to_{q}" for q in "qkv")),
                  *_linear(f"{x}.attn.proj", f"{d}.attn.to_out.0"),
                  *_linear(f"{x}.adaLN_modulation.1", f"{d}.norm1.linear"),
                  *_linear(f"{x}.mlp.fc1", f"{d}.ff.net.0.proj"),
                  *_linear(f"{x}.mlp.fc2", f"{d}.ff.net.2"),
                  *_linear(f"{c}.attn.qkv", *(f"{d}.attn.add_{q}_proj" for q in "qkv")),
                  *_linear(f"{c}.adaLN_modulation.1", f"{d}.norm1_context.linear", swap=last)]
        if not last:
            rules += [*_linear(f"{c}.attn.proj", f"{d}.attn.to_add_out"),
                      *_linear(f"{c}.mlp.fc1", f"{d}.ff_context.net.0.proj"),
                      *_linear(f"{c}.mlp.fc2", f"{d}.ff_context.net.2")]
        if config.qk_norm:
            rules += [*_norm(f"{x}.attn.ln_q.weight", f"{d}.attn.norm_q"),
                      *_norm(f"{x}.attn.ln_k.weight", f"{d}.attn.norm_k"),
                      *_norm(f"{c}.attn.ln_q.weight", f"{d}.attn.norm_added_q"),
                      *_norm(f"{c}.attn.ln_k.weight", f"{d}.attn.norm_added_k")]
        if i in dual:  # SD 3.5 Medium's second image-only attention
            rules += [*_linear(f"{x}.attn2.qkv", *(f"{d}.attn2.to_{q}" for q in "qkv")),
                      *_linear(f"{x}.attn2.proj", f"{d}.attn2.to_out.0"),
                      *_norm(f"{x}.attn2.ln_q.weight", f"{d}.attn2.norm_q"),
                      *_norm(f"{x}.attn2.ln_k.weight", f"{d}.attn2.norm_k")]
    return rules


def flux_rules(config) -> list[tuple]:
    """(original key, diffusers keys, swap halves) for a FluxTransformer2DModel."""
    embed = "time_text_embed"
    rules = [*_linear("time_in.in_layer", f"{embed}.timestep_embedder.linear_1"),
             *_linear("time_in.out_layer", f"{embed}.timestep_embedder.linear_2"),
             *_linear("vector_in.in_layer", f"{embed}.text_embedder.linear_1"),
             *_linear("vector_in.out_layer", f"{embed}.text_embedder.linear_2"),
             *_linear("txt_in", "context_embedder"), *_linear("img_in", "x_embedder"),
             *_linear("final_layer.linear", "proj_out"),
             *_linear("final_layer.adaLN_modulation.1", "norm_out.linear", swap=True)]
    if config.guidance_embeds:  # [dev]; [schnell] has none
        rules += [*_linear("guidance_in.in_layer", f"{embed}.guidance_embedder.linear_1"),
                  *_linear("guidance_in.out_layer", f"{embed}.guidance_embedder.linear_2")]
    for i in range(config.num_layers):
        o, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        rules += [*_linear(f"{o}.img_mod.lin", f"{d}.norm1.linear"),
                  *_linear(f"{o}.txt_mod.lin", f"{d}.norm1_context.linear"),
                  *_linear(f"{o}.img_attn.qkv", *(f"{d}.attn.to_{q}" for q in "qkv")),
                  *_linear(f"{o}.txt_attn.qkv", *(f"{d}.attn.add_{q}_proj" for q in "qkv")),
                  *_norm(f"{o}.img_attn.norm.query_norm.scale", f"{d}.attn.norm_q"),
                  *_norm(f"{o}.img_attn.norm.key_norm.scale", f"{d}.attn.norm_k"),
                  *_norm(f"{o}.txt_attn.norm.query_norm.scale", f"{d}.attn.norm_added_q"),
                  *_norm(f"{o}.txt_attn.norm.key_norm.scale", f"{d}.attn.norm_added_k"),
                  *_linear(f"{o}.img_attn.proj", f"{d}.attn.to_out.0"),
                  *_linear(f"{o}.txt_attn.proj", f"{d}.attn.to_add_out"),
                  *_linear(f"{o}.img_mlp.0", f"{d}.ff.net.0.proj"),
                  *_linear(f"{o}.img_mlp.2", f"{d}.ff.net.2"),
                  *_linear(f"{o}.txt_mlp.0", f"{d}.ff_context.net.0.proj"),
                  *_linear(f"{o}.txt_mlp.2", f"{d}.ff_context.net.2")]
    for i in range(config.num_single_layers):
        o, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        rules += [*_linear(f"{o}.modulation.lin", f"{d}.norm.linear"),
                  *_linear(f"{o}.linear1", *(f"{d}.attn.to_{q}" for q in "qkv"),
                           f"{d}.proj_mlp"),
                  *_linear(f"{o}.linear2", f"{d}.proj_out"),
                  *_norm(f"{o}.norm.query_norm.scale", f"{d}.attn.norm_q"),
                  *_norm(f"{o}.norm.key_norm.scale", f"{d}.attn.norm_k")]
    return rules


RULES = {"sd3": sd3_rules, "flux": flux_rules}


def swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """(a, b) -> (b, a) along the outputs: AdaLN's (scale, shift) <-> (shift, scale)."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first])


def transformer_state_dict(transformer, kind: str) -> dict[str, torch.Tensor]:
    """A transformer of family `kind` ("sd3", "flux") under its original single-file names."""
    state = transformer.state_dict()
    out, used = {}, set()
    for original, names, swap in RULES[kind](transformer.config):
        if not all(n in state for n in names):  # a Linear without a bias
            continue
        tensor = torch.cat([state[n] for n in names]) if len(names) > 1 else state[names[0]]
        out[PREFIX[kind] + original] = swap_halves(tensor) if swap else tensor
        used |= set(names)
    left = sorted(set(state) - used)
    if left:
        raise ValueError(f"{len(left)} transformer tensors have no place in the original "
                         f"layout, e.g. {left[0]}")
    return out


def save_transformer_file(pipe, path: str | Path, dtype: torch.dtype = torch.bfloat16) -> None:
    """Write the pipeline's transformer (transformer_state_dict) in `dtype` to `path`."""
    tensors = {k: v.detach().to("cpu", dtype).contiguous()
               for k, v in transformer_state_dict(pipe.transformer, families.of(pipe)).items()}
    save_file(tensors, str(path), metadata={"format": "pt", "family": families.of(pipe)})
