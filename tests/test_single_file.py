"""Single-file checkpoints: tiny SD 1.x, 2.x and XL exports load back exactly with diffusers' own
`from_single_file`, in fp32 and fp16; a single file is a base model; bad files are refused."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from train import UserError
from train.families import of as family
from train.models import build_builtin, check_model, load_pipeline
from train.single_file import save_single_file, single_file_state_dict

FAMILIES = {"tiny": "sd1", "tiny-sd2": "sd2", "tiny-sdxl": "sdxl"}


def weighted(pipe) -> dict:
    """The pipeline's modules that a single file holds."""
    names = ("unet", "vae", "text_encoder", "text_encoder_2")
    return {n: getattr(pipe, n) for n in names if getattr(pipe, n, None) is not None}


@pytest.fixture(scope="module", params=list(FAMILIES))
def exported(request, tmp_path_factory):
    """(name, pipeline, its diffusers folder, its fp32 single file); the folder was saved before
    every weight was shifted by 1, so a loader that read the folder's weights instead of the
    file's fails the comparisons."""
    name = request.param
    tmp = tmp_path_factory.mktemp(name)
    pipe = build_builtin(name)
    pipe.save_pretrained(tmp / "folder")
    with torch.no_grad():
        for module in weighted(pipe).values():
            for param in module.parameters():
                param.add_(1.0)
    save_single_file(pipe, tmp / "model.safetensors", torch.float32)
    return name, pipe, tmp / "folder", tmp / "model.safetensors"


def test_every_tensor_round_trips_through_diffusers_from_single_file(exported):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    name, pipe, folder, path = exported
    cls = StableDiffusionXLPipeline if FAMILIES[name] == "sdxl" else StableDiffusionPipeline
    loaded = cls.from_single_file(str(path), config=str(folder), local_files_only=True)
    for attr, module in weighted(pipe).items():
        want, got = module.state_dict(), getattr(loaded, attr).state_dict()
        assert got.keys() == want.keys(), attr
        assert [k for k in want if not torch.equal(got[k], want[k])] == [], attr
    # Nothing extra in the file: one name per tensor, except that OpenCLIP (the gelu encoders)
    # fuses q, k and v weights and biases into one in_proj weight and bias, 6 into 2 per layer.
    fused = sum(4 * m.config.num_hidden_layers for a, m in weighted(pipe).items()
                if a.startswith("text_encoder") and m.config.hidden_act == "gelu")
    with safe_open(path, framework="pt") as f:
        assert len(f.keys()) == sum(len(m.state_dict()) for m in weighted(pipe).values()) - fused
        assert f.metadata()["family"] == FAMILIES[name]


def test_fp16_export_is_the_fp16_cast(exported, tmp_path):
    name, pipe, _, _ = exported
    save_single_file(pipe, tmp_path / "half.safetensors", torch.float16)
    half, full = load_file(tmp_path / "half.safetensors"), single_file_state_dict(pipe)
    assert half.keys() == full.keys()
    assert {v.dtype for v in half.values()} == {torch.float16}
    assert [k for k, v in half.items() if not torch.equal(v, full[k].half())] == []


def test_single_file_and_folder_load_as_base_models(exported):
    name, pipe, folder, path = exported
    assert check_model(str(path), str(folder)) == FAMILIES[name]
    from_file = load_pipeline(str(path), "cpu", config_folder=str(folder))
    from_folder = load_pipeline(str(folder), "cpu")
    for loaded in (from_file, from_folder):
        assert type(loaded) is type(pipe) and family(loaded) == FAMILIES[name]
        assert loaded.unet.dtype == torch.float32
    # The file's (shifted) weights, not the config folder's.
    assert torch.equal(from_file.unet.conv_in.weight, pipe.unet.conv_in.weight)
    assert not torch.equal(from_folder.unet.conv_in.weight, pipe.unet.conv_in.weight)


# Names and shapes that AUTOMATIC1111 and ComfyUI look up and diffusers' loader is lenient about
# (it takes an upsampler from output_blocks.N.1 or .2, VAE attention as linear or 1x1 conv).
LANDMARKS = {
    "tiny": {"model.diffusion_model.output_blocks.2.1.conv.weight": (64, 64, 3, 3),
             "model.diffusion_model.output_blocks.8.2.conv.weight": (32, 32, 3, 3),
             "first_stage_model.encoder.mid.attn_1.q.weight": (32, 32, 1, 1)},
    "tiny-sd2": {"cond_stage_model.model.positional_embedding": (77, 32),
                 "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight": (96, 32),
                 "model.diffusion_model.input_blocks.1.1.proj_in.weight": (32, 32)},
    "tiny-sdxl": {
        "model.diffusion_model.label_emb.0.0.weight": (128, 80),
        "model.diffusion_model.input_blocks.7.1.transformer_blocks.1.attn2.to_k.weight": (64, 96),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (64, 64, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (64, 64, 3, 3),
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (32,),
        "conditioner.embedders.1.model.text_projection": (64, 32),
        "first_stage_model.decoder.mid.attn_1.proj_out.weight": (32, 32, 1, 1)},
}


def test_exports_use_the_original_names(exported):
    name, _, _, path = exported
    with safe_open(path, framework="pt") as f:
        assert {k: tuple(f.get_slice(k).get_shape()) for k in LANDMARKS[name]} == LANDMARKS[name]


def test_full_size_sd15_export_has_the_original_names_and_shapes():
    sd = single_file_state_dict(build_builtin("random-sd15", "meta"))  # shapes only
    counts = {}
    for key in sd:
        counts[key.split(".")[0]] = counts.get(key.split(".")[0], 0) + 1
    assert counts == {"model": 686, "first_stage_model": 248, "cond_stage_model": 196}
    shapes = {  # as in SD 1.5's own v1-5 checkpoint
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        "model.diffusion_model.input_blocks.9.0.op.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,),
    }
    assert {k: tuple(sd[k].shape) for k in shapes} == shapes


def test_unmerged_lora_layers_are_refused_not_misnamed():
    from peft import LoraConfig

    pipe = build_builtin("tiny")
    pipe.unet.add_adapter(LoraConfig(r=2, target_modules=["to_q"]))
    with pytest.raises(ValueError, match="unet has LoRA layers; merge them first"):
        single_file_state_dict(pipe)


def keys_file(path, *prefixes):
    """A .safetensors file with one small tensor under each prefix: check_model reads names only."""
    save_file({p + "weight": torch.zeros(1) for p in prefixes}, str(path))
    return str(path)


def diffusers_folder(path, pipeline, text_act="quick_gelu", linear_projection=False):
    """The configs check_model reads from a diffusers folder."""
    for sub, config in {".": {"_class_name": pipeline},
                        "text_encoder": {"hidden_act": text_act},
                        "unet": {"use_linear_projection": linear_projection}}.items():
        (path / sub).mkdir(parents=True, exist_ok=True)
        name = "model_index.json" if sub == "." else "config.json"
        (path / sub / name).write_text(json.dumps(config))
    return str(path)


SD1 = ("model.diffusion_model.", "cond_stage_model.transformer.text_model.")
SD2 = ("model.diffusion_model.", "cond_stage_model.model.")
SDXL = ("model.diffusion_model.", "conditioner.embedders.0.transformer.text_model.",
        "conditioner.embedders.1.model.")


@pytest.mark.parametrize("prefixes, kind", [(SD1, "sd1"), (SD2, "sd2"), (SDXL, "sdxl")])
def test_a_files_family_comes_from_its_key_names(tmp_path, prefixes, kind):
    folders = {"sd1": diffusers_folder(tmp_path / "sd1", "StableDiffusionPipeline"),
               "sd2": diffusers_folder(tmp_path / "sd2", "StableDiffusionPipeline", "gelu", True),
               "sdxl": diffusers_folder(tmp_path / "xl", "StableDiffusionXLPipeline", "quick_gelu")}
    assert check_model(keys_file(tmp_path / "m.safetensors", *prefixes), folders[kind]) == kind


@pytest.mark.parametrize("text_act, linear_projection, kind", [
    ("quick_gelu", False, "sd1"), ("gelu", False, "sd2"), ("quick_gelu", True, "sd2")])
def test_a_folder_is_sd2_by_its_text_encoder_or_its_unet(tmp_path, text_act, linear_projection,
                                                         kind):
    folder = diffusers_folder(tmp_path, "StableDiffusionPipeline", text_act, linear_projection)
    assert check_model(folder) == kind


def refused(model, match, config_folder=None):
    with pytest.raises(UserError, match=match) as error:
        check_model(str(model), config_folder)
    assert "\n" not in str(error.value)


def test_check_model_refuses_bad_single_files(tmp_path):
    sd1 = keys_file(tmp_path / "sd1.safetensors", *SD1)
    xl_folder = diffusers_folder(tmp_path / "xl", "StableDiffusionXLPipeline")
    refused(tmp_path / "missing.safetensors", "not found: run script/download-weights")
    torch.save({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "model.ckpt")
    refused(tmp_path / "model.ckpt", r"pickle checkpoint.*convert it to \.safetensors")
    (tmp_path / "notes.txt").write_text("hello")
    refused(tmp_path / "notes.txt", "neither a diffusers folder nor a .safetensors checkpoint")
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 16)
    refused(tmp_path / "broken.safetensors", "not a readable .safetensors file")
    for name, prefixes in {"lora": ("lora_unet_down_blocks_0.",),
                           "unet-only": ("model.diffusion_model.",),
                           "refiner": ("model.diffusion_model.", "conditioner.embedders.0.model.")
                           }.items():
        refused(keys_file(tmp_path / f"{name}.safetensors", *prefixes),
                "is not a Stable Diffusion checkpoint")
    refused(sd1, "single-file SD 1.x checkpoint and needs a config folder")
    refused(sd1, "is an SD 1.x checkpoint but config folder .* is SDXL", xl_folder)
    refused(sd1, "config folder .* not found", str(tmp_path / "nowhere"))
    refused(sd1, "config folder .* is a PixArtSigmaPipeline",
            diffusers_folder(tmp_path / "pixart", "PixArtSigmaPipeline"))


@pytest.mark.parametrize("spoil, reason", [
    ("shape", "conv_in.weight expected shape torch.Size([32, 4, 3, 3]), but got torch.Size([3])"),
    ("missing", "some of its weights are missing"),
])
def test_a_single_file_whose_names_pass_but_contents_do_not_fit_is_one_line(tmp_path, spoil,
                                                                           reason):
    """The key names say SD 1.x (check_model passes it in milliseconds); the tensors do not fit
    its architecture. diffusers' ValueError (wrong shape), or torch's NotImplementedError (a
    weight left on the meta device), becomes one line."""
    from safetensors.torch import load_file, save_file

    from train import UserError

    pipe = build_builtin("tiny")
    pipe.save_pretrained(tmp_path / "folder")
    save_single_file(pipe, tmp_path / "good.safetensors", torch.float32)
    tensors = load_file(tmp_path / "good.safetensors")
    if spoil == "shape":
        tensors["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(3)
    else:
        del tensors["model.diffusion_model.out.2.weight"]
    save_file(tensors, tmp_path / "bad.safetensors")
    assert check_model(str(tmp_path / "bad.safetensors"), str(tmp_path / "folder")) == "sd1"
    with pytest.raises(UserError) as refused:
        load_pipeline(str(tmp_path / "bad.safetensors"), "cpu", str(tmp_path / "folder"))
    assert f"does not fit the SD 1.x architecture its names claim ({reason})" in str(refused.value)
