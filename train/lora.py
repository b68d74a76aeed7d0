"""LoRA for DreamBooth: add adapters, save them for diffusers and for AUTOMATIC1111/ComfyUI,
extract one from a full fine-tune, merge adapters back into plain weights.

Training with adapters (the base weights stay frozen; only the returned parameters train):

    params = add_lora(pipe.unet, rank=8, alpha=8, kind="unet")
    params += add_lora(pipe.text_encoder, rank=8, alpha=8, kind="text_encoder")  # optional
    ... train `params`, unwrap the models from accelerate ...
    save_lora(pipe, folder, torch.float16)   # folder/lora/pytorch_lora_weights.safetensors
                                             # folder/lora.safetensors (kohya layout)
    (SDXL: the same, with add_lora(pipe.text_encoder_2, ..., kind="text_encoder_2") too)
    merge_lora(pipe)                         # plain full-weight pipeline, for save_pipeline

Loading what save_lora wrote, anywhere:
    diffusers   pipe.load_lora_weights(folder / "lora")
                pipe.load_lora_weights(folder, weight_name="lora.safetensors")  # kohya file too
                                                                  # (not SD 3.x: see below)
    A1111/Forge copy lora.safetensors to models/Lora, prompt with <lora:lora:1>
    ComfyUI     copy lora.safetensors to models/loras, use a LoraLoader node

From a full fine-tune (no adapters trained), a LoRA of a chosen rank:
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}   # before training
    ... full fine-tune ...
    lora = extract_lora(base, pipe.unet, rank=32, kind="unet")
    lora |= extract_lora(base_te, pipe.text_encoder, rank=32, kind="text_encoder")
    save_kohya(lora, path, torch.float16, base_model_version="sd_v1", rank=32, alpha=32)
    (SDXL: pass family="sdxl" to extract_lora, for kohya's SDXL names; see kohya_names)
    extraction_error(base, pipe.unet, lora, "unet", noisy, timesteps, states)  # 0 = exact
    save_extracted(pipe, {"unet": base, "text_encoder": base_te}, 32, folder)
        # what extract_lora=32 writes: SD 1.x/2.x/SDXL the kohya file (resnets too); SD 3.x and
        # FLUX ({"transformer": ..., CLIPs}) save_lora's two files, a trained LoRA's modules

Targets (UNET_TARGETS, TEXT_TARGETS) are those of kohya's sd-scripts LoRA, the one A1111 and
ComfyUI users know: every Linear and 1x1 conv inside the UNet's transformer blocks (attention
q/k/v/out, the GEGLU feed-forward, proj_in/proj_out) and the text encoder's attention and MLP.
diffusers' own train_dreambooth_lora adapts only the attention (q/k/v/out): fewer parameters,
but the feed-forward (about half of a transformer block's weights) then cannot change at all.
proj_in/proj_out are 1x1 Conv2d in SD 1.x and Linear in SD 2.x and SDXL (use_linear_projection):
peft adapts both kinds under the same name, and the kohya layout gives a conv's lora_down and
lora_up 4-D shapes. The resnets' 3x3 convs (kohya's optional "conv_dim", LoCon) are left out of
training; extract_lora can cover them (UNET_RESNET_TARGETS).

kohya names SD 1.x/2.x modules after diffusers' module paths, but SDXL's UNet modules after the
original SGM UNet (`input_blocks.4.1.…`), the one its sd-scripts trains SDXL on; `kohya_names`
maps them with single_file's table, which diffusers' load_lora_weights maps back. SD 3.x's and
FLUX's transformers likewise after their original models (Stability AI's `joint_blocks.…`, Black
Forest Labs' `double_blocks.…`), whose modules fuse diffusers' q, k and v (and a FLUX single
block's MLP input) into one: `original_layers` fuses their LoRA exactly, by transformer_file's
rules. ComfyUI and Forge name a LoRA module after the model's own weight key, so this is the
one layout both read for them (Forge reads no diffusers-named SD 3.x LoRA); diffusers reads it
for FLUX.1 (its converter assumes FLUX.1's widths), not for SD 3.x (0.42 has no kohya SD3
reader): there, `lora/`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from . import families
from .single_file import unet_table
from .transformer_file import RULES, swap_halves

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out",
                "ff.net.0.proj", "ff.net.2")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
# The rest of the UNet's weights, for a LoCon-style extraction (3x3 convs, time embedding).
UNET_RESNET_TARGETS = ("conv1", "conv2", "conv_shortcut", "time_emb_proj",
                       "downsamplers.0.conv", "upsamplers.0.conv")
# A transformer's (SD 3.x, FLUX): in the double-stream blocks, the image and text streams'
# attention and feed-forward; in FLUX's single-stream blocks, q/k/v and the MLP's input
# (proj_mlp; their proj_out, which carries both attention and MLP out, stays frozen, as in
# diffusers' FLUX trainer). diffusers' SD3 trainer adapts the attention only; the feed-forward
# is kept for the reason given above. FLUX.2 names its feed-forward linear_in/linear_out and
# fuses a single block's q/k/v and MLP input into to_qkv_mlp_proj (its to_out stays frozen, as
# FLUX.1's proj_out); no other family has those names.
TRANSFORMER_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                       "add_v_proj", "to_add_out", "ff.net.0.proj", "ff.net.2",
                       "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp",
                       "ff.linear_in", "ff.linear_out", "ff_context.linear_in",
                       "ff_context.linear_out", "to_qkv_mlp_proj")
TARGETS = {"unet": UNET_TARGETS, "transformer": TRANSFORMER_TARGETS,
           "text_encoder": TEXT_TARGETS, "text_encoder_2": TEXT_TARGETS}
LORA_CONFIG_KEYS = ("r", "lora_alpha", "target_modules", "init_lora_weights", "rank_pattern",
                    "alpha_pattern")
ADAPTER = "default"  # peft's adapter name; add_adapter without a name uses it


def add_lora(model: nn.Module, rank: int, alpha: float, kind: str) -> list[nn.Parameter]:
    """Inject LoRA adapters into a UNet (`kind="unet"`) or a CLIP text encoder
    (`kind="text_encoder"` or SDXL's "text_encoder_2": CLIPTextModel or
    CLIPTextModelWithProjection, both get TEXT_TARGETS), freeze every other
    weight, and return the trainable LoRA parameters (in fp32, whatever the base dtype).

    The applied change is alpha/rank · B @ A; B starts at zero, so the model is unchanged until
    the first step. Call before accelerator.prepare."""
    from peft import LoraConfig

    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                 target_modules=list(TARGETS[kind])))
    params = [p for p in model.parameters() if p.requires_grad]
    # Adapters are trained in fp32 even when the frozen base was cast to fp16/bf16 to save
    # memory: fp16 parameters cannot take an optimizer step (and GradScaler refuses them).
    for p in params:
        p.data = p.data.float()
    return params


def save_lora(pipe, folder: Path, dtype: torch.dtype = torch.float16) -> dict[str, Path]:
    """Write the pipeline's LoRA adapters (those of add_lora: peft adapter "default") in `dtype`:
      "diffusers": folder/lora/pytorch_lora_weights.safetensors, via the pipeline class's
                   save_lora_weights, with the adapter config in its metadata (so alpha ≠ rank
                   survives); read by pipe.load_lora_weights(folder / "lora").
      "kohya":     folder/lora.safetensors, the layout AUTOMATIC1111/Forge and ComfyUI read (for
                   SDXL with kohya's SDXL names: see kohya_names; for SD 3.x and FLUX under
                   the original transformer's fused modules: original_layers).
    Returns {layout: path} for the files written. The models must be unwrapped from accelerate."""
    from peft.utils import get_peft_model_state_dict

    folder = Path(folder)
    kind = families.of(pipe)
    family = families.get(kind)
    denoiser = family.DENOISER
    kwargs = {}
    for name in (denoiser, *families.text_names(pipe)):
        model = getattr(pipe, name, None)
        if model is not None and ADAPTER in (getattr(model, "peft_config", None) or {}):
            # peft's own key names (lora_A/lora_B), which diffusers loads as they are. Not
            # diffusers' convert_state_dict_to_diffusers as its DreamBooth script does: that
            # renames only the attention keys, and with feed-forward and proj_in/out adapters
            # the mixed file loads with the attention LoRA silently dropped.
            state = diffusers_keys(model, get_peft_model_state_dict(model))
            kwargs[f"{name}_lora_layers"] = {k: v.to(dtype) for k, v in state.items()}
            # Only the fields that shape the adapter: a full peft 0.21 config has fields that
            # older peft (what diffusers 0.35 users have) refuses to instantiate.
            config = model.peft_config[ADAPTER].to_dict()
            kwargs[f"{name}_lora_adapter_metadata"] = {k: config[k] for k in LORA_CONFIG_KEYS}
    if f"{denoiser}_lora_layers" not in kwargs:
        raise ValueError(f"the pipeline's {denoiser} has no LoRA adapter (see add_lora)")
    written = save_diffusers_layout(pipe, kwargs, folder)
    if family.KOHYA is None:  # FLUX.2: no kohya layout yet
        return written
    lora = {}
    for name in (denoiser, *families.text_names(pipe)):
        lora |= kohya_state_dict(getattr(pipe, name), name, kind)
    config = getattr(pipe, denoiser).peft_config[ADAPTER]
    save_kohya(lora, folder / "lora.safetensors", dtype, kohya_version(pipe),
               config.r, config.lora_alpha,
               v_prediction=pipe.scheduler.config.get("prediction_type") == "v_prediction")
    written["kohya"] = folder / "lora.safetensors"
    return written


def diffusers_keys(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A model's LoRA state dict (peft's names) with the key names diffusers' layout gives
    them: transformers 5 dropped CLIPTextModel's `text_model.` level; transformers 4 (and
    diffusers with it) finds the adapters only under it, and 5 accepts both."""
    if type(model).__name__ != "CLIPTextModel":
        return state
    return {k if k.startswith("text_model.") else "text_model." + k: v for k, v in state.items()}


def save_diffusers_layout(pipe, kwargs: dict, folder: Path) -> dict[str, Path]:
    """Write a LoRA given as the pipeline class's save_lora_weights takes it (per part,
    `{part}_lora_layers` in peft's names and `{part}_lora_adapter_metadata`): "diffusers",
    folder/lora/pytorch_lora_weights.safetensors. Returns {layout: path}."""
    folder = Path(folder)
    type(pipe).save_lora_weights(folder / "lora", **kwargs)
    return {"diffusers": folder / "lora" / "pytorch_lora_weights.safetensors"}


def kohya_version(pipe) -> str:
    """kohya's ss_base_model_version for a pipeline: sd_v1, sd_v2, sdxl_base_v1-0, sd3 or
    flux1 (families' KOHYA)."""
    kind = families.of(pipe)
    return families.get(kind).KOHYA["versions"][kind]


def kohya_names(model: nn.Module, kind: str, family: str = "sd1") -> dict[str, str]:
    """kohya's LoRA name for the modules of a UNet (`kind="unet"`) or a CLIP text encoder
    (`"text_encoder"`, SDXL's `"text_encoder_2"`), by module path:

      SD 1.x/2.x  down_blocks.0.attentions.0.proj_in
                      → lora_unet_down_blocks_0_attentions_0_proj_in (diffusers' path)
                  encoder.layers.0.self_attn.q_proj
                      → lora_te_text_model_encoder_layers_0_self_attn_q_proj
      SDXL        down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q
                      → lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q (SGM path)
                  lora_te1_text_model_encoder_layers_0_… (CLIP-L), lora_te2_text_model_… (bigG)

    transformers 5's CLIPTextModel dropped `text_model.`; the kohya names keep it. The UNet's
    containers above the SGM blocks (`down_blocks`, `down_blocks.1`, …) have no SDXL name.
    `family` ("sd1", "sd2", "sdxl"; "sd3", "flux" for their CLIPs) chooses the naming
    (train/families: KOHYA). A transformer's modules have no name of their own: its LoRA is
    named after the original model's fused modules (kohya_layout, original_layers)."""
    naming = families.get(family).KOHYA
    prefix = naming["prefixes"][kind]
    paths = [name for name, _ in model.named_modules()]
    if kind != "unet":
        return {name: prefix + "text_model_" + name.removeprefix("text_model.").replace(".", "_")
                for name in paths}
    if not naming["original_unet_paths"]:
        return {name: prefix + name.replace(".", "_") for name in paths}
    table = unet_table(model.config)
    sgm = {name: sgm_path(name, table) for name in paths}
    return {name: prefix + path.replace(".", "_") for name, path in sgm.items() if path}


def sgm_path(module_name: str, table: list) -> str | None:
    """The original SGM UNet's path for a diffusers UNet module path, by single_file's
    `unet_table` (`down_blocks.1.resnets.0.conv1` → `input_blocks.4.0.in_layers.2`), or None
    for a module above the table's blocks."""
    path = module_name + "."
    src, dst, inner = next((row for row in table if path.startswith(row[0])), (None,) * 3)
    if src is None:
        return None
    rest = path[len(src):]
    name = next((name for name in inner if rest.startswith(name)), None)
    return (dst + (inner[name] + rest[len(name):] if name else rest)).rstrip(".")


def peft_layers(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """The model's peft LoRA adapters (add_lora's), by module path: (lora_A's weight, kohya's
    down [r, in]; lora_B's, up [out, r]; kohya's alpha, peft's scaling times r)."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, layer in model.named_modules():
        if isinstance(layer, LoraLayer) and ADAPTER in layer.lora_A:
            # peft's scaling is alpha/r (or alpha/sqrt(r) with rsLoRA): kohya's alpha is scaling·r.
            out[name] = (layer.lora_A[ADAPTER].weight.detach(),
                         layer.lora_B[ADAPTER].weight.detach(),
                         layer.scaling[ADAPTER] * layer.r[ADAPTER])
    return out


def kohya_state_dict(model: nn.Module, kind: str,
                     family: str = "sd1") -> dict[str, torch.Tensor]:
    """The model's peft LoRA adapters in kohya layout (kohya_layout)."""
    return kohya_layout(model, kind, family, peft_layers(model))


def kohya_layout(model: nn.Module, kind: str, family: str,
                 layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
                 ) -> dict[str, torch.Tensor]:
    """A LoRA of `model`'s modules (`layers`: module path -> (down, up, alpha), the change
    alpha / r · up @ down) in kohya's layout: per module `.lora_down.weight` [r, in] (a conv's
    [r, in, kh, kw]), `.lora_up.weight` [out, r] ([out, r, 1, 1]), `.alpha` (0-d), named by
    kohya_names; a transformer's (`kind="transformer"`: SD 3.x, FLUX) on the original model's
    modules (original_layers), named `lora_unet_` + the original path with `_` for `.`, as
    ComfyUI and Forge name them after the model's weight keys."""
    if not layers:  # e.g. T5, which never trains: it has no kohya prefix either
        return {}
    if kind == "transformer":
        prefix = families.get(family).KOHYA["prefixes"][kind]
        named = {prefix + path.replace(".", "_"): lora
                 for path, lora in original_layers(model, family, layers).items()}
    else:
        names = kohya_names(model, kind, family)
        named = {names[path]: lora for path, lora in layers.items()}
    out = {}
    for key, (down, up, alpha) in named.items():
        out[key + ".lora_down.weight"] = down
        out[key + ".lora_up.weight"] = up
        out[key + ".alpha"] = torch.tensor(float(alpha))
    return out


def original_layers(transformer: nn.Module, kind: str,
                    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
                    ) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """An SD 3.x or FLUX (`kind`) transformer's LoRA `layers` (diffusers module path ->
    (down, up, alpha)) on the modules of its original layout, by original module path, with
    transformer_file's rules (transformer_file.RULES):
    - a module the original fuses from several along its outputs (q, k, v -> `attn.qkv`; a
      FLUX single block's q, k, v and MLP input -> `linear1`) gets their LoRA exactly: down the
      parts' downs stacked [sum of ranks, in], up the block diagonal of the parts' ups, each
      times its alpha / r [sum of outs, sum of ranks], alpha the sum of ranks (scale 1); a
      part without LoRA adds rows of zeros to up and no rank;
    - a module that is one of diffusers' keeps its down, up and alpha;
    - where the original holds AdaLN's halves the other way round (`swap`), up's rows swap.
    A LoRA module that lands nowhere is an error. fp32 for the fused modules."""
    out, used = {}, set()
    for original, names, swap in RULES[kind](transformer.config):
        paths = [name.removesuffix(".weight") for name in names]
        if not original.endswith(".weight") or not any(path in layers for path in paths):
            continue
        if len(paths) == 1:
            down, up, alpha = layers[paths[0]]
        else:
            downs, ups = [], []
            for path in paths:
                if path in layers:
                    down, up, alpha = layers[path]
                    downs.append(down.float())
                    ups.append(up.float() * (float(alpha) / down.shape[0]))
                else:  # no LoRA on this part: its rows stay the base's
                    ups.append(torch.zeros(transformer.get_submodule(path).out_features, 0))
            down = torch.cat(downs)
            up = torch.block_diag(*[u.to(down.device) for u in ups])
            alpha = down.shape[0]
        out[original.removesuffix(".weight")] = (down, swap_halves(up) if swap else up, alpha)
        used.update(path for path in paths if path in layers)
    left = sorted(set(layers) - used)
    if left:
        raise ValueError(f"{len(left)} LoRA modules have no place in the original layout, "
                         f"e.g. {left[0]}")
    return out


def save_kohya(lora: dict[str, torch.Tensor], path: Path, dtype: torch.dtype,
               base_model_version: str, rank: int, alpha: float,
               v_prediction: bool = False) -> Path:
    """Write a kohya-layout state dict as safetensors in `dtype`, with kohya's metadata (A1111
    shows it; ComfyUI reads only the `.alpha` tensors, never the metadata)."""
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                "ss_network_alpha": str(alpha), "ss_base_model_version": base_model_version,
                "ss_v2": str(base_model_version.startswith("sd_v2")),
                "ss_v_parameterization": str(v_prediction)}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to("cpu", dtype).contiguous() for k, v in lora.items()},
              str(path), metadata=metadata)
    return Path(path)


@torch.no_grad()
def low_rank_deltas(base: dict[str, torch.Tensor], tuned: nn.Module, rank: int,
                    targets: tuple[str, ...]) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """A fine-tune's change of each covered Linear/Conv2d of `tuned` (those `targets` names,
    as peft matches them) at `rank`, one module at a time: (module path, down, up), up @ down
    the truncated SVD of (tuned weight - base[path + ".weight"]). down is [r, in] (a conv's
    [r, in, kh, kw]), up [out, r] ([out, r, 1, 1]): the shapes of kohya's lora_down / lora_up
    and of peft's lora_A / lora_B. Convs (1x1 and 3x3) are flattened to [out, in·kh·kw].
    Modules whose difference is exactly zero are skipped; a rank above min(out, in·kh·kw) is
    clipped to it (r = down.shape[0]). Runs in fp32 on the module's device; the tensors are
    fp32 there."""
    for name, module in tuned.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or not _matches(name, targets):
            continue
        weight = module.weight.float()
        delta = weight - base[name + ".weight"].to(weight.device, torch.float32)
        if not delta.any():
            continue
        flat = delta.flatten(1)
        r = min(rank, *flat.shape)
        u, s, vh = torch.linalg.svd(flat, full_matrices=False)
        # The singular values are split evenly between up and down: both get the same
        # magnitude, which keeps an fp16 copy of either away from overflow and underflow.
        root = s[:r].sqrt()
        up, down = u[:, :r] * root, root[:, None] * vh[:r]
        if delta.dim() == 4:
            up, down = up[:, :, None, None], down.reshape(r, *delta.shape[1:])
        yield name, down.contiguous(), up.contiguous()


def extract_lora(base: dict[str, torch.Tensor], tuned: nn.Module, rank: int, kind: str,
                 targets: tuple[str, ...] | None = None,
                 family: str = "sd1") -> dict[str, torch.Tensor]:
    """A kohya-layout LoRA of `rank` from a full fine-tune (low_rank_deltas: per covered
    Linear/Conv2d, the truncated SVD of tuned - base; unchanged modules skipped, the rank
    clipped to the matrix's); alpha = the module's rank, so the scale is 1. fp32 tensors on
    the model's device (save_kohya casts). A transformer's (`kind="transformer"`, `family`
    "sd3" or "flux") lands on the original model's fused modules (kohya_layout).

    Covered by default: UNET_TARGETS (attention q/k/v/out, feed-forward, proj_in/proj_out) or
    TEXT_TARGETS (attention q/k/v/out, mlp fc1/fc2), as in add_lora; `kind` and `family` name
    the modules as kohya_names does (an SDXL pipeline's parts: family="sdxl"). Pass
    `targets=UNET_TARGETS + UNET_RESNET_TARGETS` to also cover the resnets (kohya's LoCon).
    diffusers' kohya reader (0.42) tells old from new text-encoder layouts by the presence of
    out_proj: a text-encoder LoRA whose out_proj layers were all skipped (unchanged) loads
    there without its attention part, or not at all; A1111 and ComfyUI read it fine."""
    targets = TARGETS[kind] if targets is None else targets
    return kohya_layout(tuned, kind, family, {
        name: (down, up, down.shape[0])
        for name, down, up in low_rank_deltas(base, tuned, rank, targets)})


def extracted_peft(tuned: nn.Module, deltas: dict[str, tuple[torch.Tensor, torch.Tensor, int]],
                   rank: int, dtype: torch.dtype = torch.float32
                   ) -> tuple[dict[str, torch.Tensor], dict]:
    """A LoRA of `rank` extracted from a full fine-tune of `tuned` (a transformer, or a CLIP
    text encoder; `deltas`: module path -> (down, up, its rank), low_rank_deltas' at scale 1)
    as save_lora collects a trained adapter of add_lora's targets: (its layers in `dtype`,
    `{path}.lora_A.weight` [r, in] and `.lora_B.weight` [out, r], under diffusers_keys'
    names; its adapter config, for save_lora_weights' metadata). The config makes every
    module's scale 1: r = lora_alpha = `rank`, and a module clipped to a lower rank
    (low_rank_deltas) has that rank as both its rank_pattern and alpha_pattern;
    target_modules lists the modules extracted (a module the fine-tune left unchanged has no
    adapter). The patterns and targets are module paths without `text_model.`, which peft
    matches as suffixes under either transformers' CLIP."""
    layers, ranks = {}, {}
    for name, (down, up, _) in deltas.items():
        layers[f"{name}.lora_A.weight"] = down.to("cpu", dtype)
        layers[f"{name}.lora_B.weight"] = up.to("cpu", dtype)
        ranks[name.removeprefix("text_model.")] = down.shape[0]
    lower = {name: r for name, r in ranks.items() if r != rank}
    config = dict(r=rank, lora_alpha=rank, target_modules=sorted(ranks), init_lora_weights=True,
                  rank_pattern=lower, alpha_pattern=dict(lower))
    return diffusers_keys(tuned, layers), config


def save_extracted(pipe, base_weights: dict[str, dict[str, torch.Tensor]], rank: int,
                   folder: Path, dtype: torch.dtype = torch.float16) -> dict[str, Path]:
    """extract_lora's files: a LoRA of `rank` extracted from the pipeline's full fine-tune,
    `base_weights` being the weights before training by pipeline attribute (optim.base_weights:
    the denoiser's, and the text encoders' that trained), written in `dtype` in the layouts
    save_lora gives a trained LoRA of the family:
      all               "kohya": folder/lora.safetensors (kohya_layout), every module at
                        scale 1; SD 1.x/2.x's and SDXL's UNet resnets included (kohya's LoCon):
                        a full fine-tune moves them too.
      SD 3.x, FLUX      and "diffusers": folder/lora/pytorch_lora_weights.safetensors,
                        add_lora's targets under a trained LoRA's names (extracted_peft).
    A LoRA carries only its targets' weight changes: the fine-tune's biases, norms, embeddings
    and other layers stay the base's. Returns {layout: path}."""
    folder = Path(folder)
    kind = families.of(pipe)
    flow = families.get(kind).DENOISER == "transformer"
    kohya = families.get(kind).KOHYA is not None  # FLUX.2: diffusers' layout only
    kwargs, lora = {}, {}
    for name, weights in base_weights.items():
        model = getattr(pipe, name)
        targets = UNET_TARGETS + UNET_RESNET_TARGETS if name == "unet" else TARGETS[name]
        # One SVD per module for both files; held in fp32 on the CPU until they are written.
        deltas = {path: (down.cpu(), up.cpu(), down.shape[0])
                  for path, down, up in low_rank_deltas(weights, model, rank, targets)}
        if kohya:
            lora |= kohya_layout(model, name, kind, deltas)
        if flow and deltas:  # a part the fine-tune left unchanged has no LoRA
            layers, config = extracted_peft(model, deltas, rank, dtype)
            kwargs[f"{name}_lora_layers"] = layers
            kwargs[f"{name}_lora_adapter_metadata"] = config
    written = save_diffusers_layout(pipe, kwargs, folder) if flow else {}
    if kohya:
        written["kohya"] = save_kohya(
            lora, folder / "lora.safetensors", dtype, kohya_version(pipe), rank, rank,
            v_prediction=pipe.scheduler.config.get("prediction_type") == "v_prediction")
    return written


@torch.no_grad()
def apply_kohya(model: nn.Module, lora: dict[str, torch.Tensor], kind: str,
                family: str = "sd1") -> int:
    """Add a kohya-layout LoRA's alpha/r · up @ down to a plain model's weights in place, as
    A1111 and ComfyUI do. Returns the number of modules changed; a LoRA key that matches no
    module of `model` (of this `kind`, named as kohya_names does) is an error."""
    names = kohya_names(model, kind, family)
    done = set()
    for name, module in model.named_modules():
        key = names.get(name)
        if key is None or key + ".lora_down.weight" not in lora or not hasattr(module, "weight"):
            continue
        down, up = lora[key + ".lora_down.weight"], lora[key + ".lora_up.weight"]
        scale = float(lora[key + ".alpha"]) / down.shape[0]
        delta = scale * (up.flatten(1).float() @ down.flatten(1).float())
        module.weight += delta.reshape(module.weight.shape).to(module.weight)
        done.add(key)
    prefix = families.get(family).KOHYA["prefixes"][kind]
    missing = {k.split(".")[0] for k in lora if k.startswith(prefix)} - done
    if missing:
        raise KeyError(f"{len(missing)} LoRA modules match nothing in the model, "
                       f"e.g. {sorted(missing)[0]}")
    return len(done)


@torch.no_grad()
def extraction_error(base: dict[str, torch.Tensor], tuned: nn.Module,
                     lora: dict[str, torch.Tensor], kind: str, *inputs) -> float:
    """How much of the fine-tune's effect on the output a LoRA misses:
        |f_base+lora(x) - f_tuned(x)| / |f_tuned(x) - f_base(x)|   (0 = exact, 1 = no effect)
    on the model's first output for `inputs`, e.g. (noisy latents, timesteps, text states) for
    a UNet or (input_ids,) for a text encoder. Holds a second copy of the model meanwhile."""
    approx = copy.deepcopy(tuned).eval()
    approx.load_state_dict(base)
    original = approx(*inputs)[0].float()
    apply_kohya(approx, lora, kind)
    got = approx(*inputs)[0].float()
    want = tuned(*inputs)[0].float()
    return float((got - want).norm() / (want - original).norm())


def merge_lora(pipe) -> None:
    """Merge every peft LoRA adapter of the pipeline's UNet and text encoders into the base
    weights and replace the wrapped layers by the plain ones, in place: afterwards the pipeline
    holds ordinary nn.Linear/nn.Conv2d modules and no peft_config, so save_pretrained (and a
    single-file export) writes plain full weights with the LoRA baked in. Works for adapters
    added by add_lora and for ones loaded with load_lora_weights. diffusers'
    `pipe.fuse_lora(); pipe.unload_lora_weights()` gives the same result; this is the same
    thing spelt out with peft alone. Merge in the dtype you export in or higher: merging into
    fp16 weights rounds the sum to fp16."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name in (families.get(families.of(pipe)).DENOISER, *families.text_names(pipe)):
        model = getattr(pipe, name, None)
        if model is None:
            continue
        for module_name, layer in list(model.named_modules()):
            if isinstance(layer, BaseTunerLayer):
                layer.merge()
                parent, _, child = module_name.rpartition(".")
                setattr(model.get_submodule(parent), child, layer.get_base_layer())
        if hasattr(model, "peft_config"):
            del model.peft_config
        model._hf_peft_config_loaded = False


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    """peft's rule for a target name: the whole module path, or its dotted suffix."""
    return any(name == t or name.endswith("." + t) for t in targets)
