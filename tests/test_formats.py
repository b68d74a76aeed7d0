"""Output formats end to end: each format `train.run` writes is reloaded by the tool that reads it
(diffusers' from_pretrained, from_single_file, load_lora_weights), in the precision asked for;
LoRA training, LoRA extraction, SD 2.x and single-file base models through the whole recipe.
"""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from helpers import train_tiny, unet_weights
from train import TrainConfig, UserError
from train.models import build_builtin
from train.single_file import save_single_file


def tar_names(tmp_path, name) -> list[str]:
    import tarfile

    with tarfile.open(tmp_path / f"{name}.tar") as tar:
        return sorted(m.name for m in tar.getmembers() if m.isfile())


@torch.no_grad()
def unet_output(pipe, seed=0) -> torch.Tensor:
    """The UNet's prediction for fixed inputs, the prompt through the pipeline's text encoder."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    ids = pipe.tokenizer(["a photo of sks ball"], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    states = pipe.text_encoder(ids)[0]
    return pipe.unet(latents, torch.tensor([500]), states).sample


def test_single_file_and_folder_hold_the_same_trained_weights(tmp_path, photos_zip):
    from diffusers import StableDiffusionPipeline

    out, _ = train_tiny(tmp_path, photos_zip, "both", output_format="diffusers,single_file")
    assert "model.safetensors" in tar_names(tmp_path, "both")
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    single = StableDiffusionPipeline.from_single_file(
        out / "model.safetensors", config=str(out), local_files_only=True,
        torch_dtype=torch.float16, safety_checker=None)
    folder = unet_weights(out)
    assert all(torch.equal(single.unet.state_dict()[k], v) for k, v in folder.items())
    record = json.loads((out / "training.json").read_text())
    assert record["outputs"] == ["model.safetensors", "model_index.json"]


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_save_precision(tmp_path, photos_zip, precision, dtype):
    out, _ = train_tiny(tmp_path, photos_zip, precision, save_precision=precision,
                        max_train_steps=1)
    assert {v.dtype for v in unet_weights(out).values()} == {dtype}


def test_single_file_only_is_one_file(tmp_path, photos_zip):
    train_tiny(tmp_path, photos_zip, "single", output_format="single_file", max_train_steps=1)
    assert tar_names(tmp_path, "single") == ["README.md", "model.safetensors", "training.json"]


def test_lora_training_writes_small_files_that_reload(tmp_path, photos_zip):
    from diffusers import StableDiffusionPipeline

    out, lines = train_tiny(tmp_path, photos_zip, "lora", use_lora=True, lora_rank=4,
                            learning_rate=None, max_train_steps=6)
    assert any("lr 1.0e-04" in line for line in lines)  # LoRA's own default rate
    assert tar_names(tmp_path, "lora") == ["README.md", "lora.safetensors",
                                           "lora/pytorch_lora_weights.safetensors",
                                           "training.json"]
    kohya = load_file(out / "lora.safetensors")
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in kohya)
    base = build_builtin("tiny")
    before = unet_output(base)
    folder = tmp_path / "tiny"
    base.save_pretrained(folder)
    loaded = {}
    for name, source in (("diffusers", out / "lora"), ("kohya", out / "lora.safetensors")):
        pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
        pipe.load_lora_weights(str(source))
        loaded[name] = unet_output(pipe)
    assert not torch.allclose(loaded["diffusers"], before, atol=1e-4)  # the LoRA acts
    torch.testing.assert_close(loaded["kohya"], loaded["diffusers"], atol=2e-3, rtol=1e-2)


def front_matter(card: str) -> dict:
    import yaml

    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


@pytest.mark.parametrize("settings, files, tags", [
    (dict(output_format="diffusers,single_file", extract_lora=4),
     ["lora.safetensors", "model.safetensors", "model_index.json"], ["lora"]),
    (dict(use_lora=True), ["lora.safetensors", "lora/pytorch_lora_weights.safetensors"],
     ["lora"]),
    (dict(output_format="single_file", model="tiny-sdxl"), ["model.safetensors"], []),
])
def test_the_tarball_describes_itself(tmp_path, photos_zip, settings, files, tags):
    """README.md is a model card the Hugging Face Hub reads (front matter: license of the base's
    family, tags, the trigger, sample images that exist), and it and training.json say which
    tool takes which file; the diffusers-layout LoRA is for diffusers only."""
    out, _ = train_tiny(tmp_path, photos_zip, "card", max_train_steps=1,
                        save_sample_prompt="a photo of sks ball on the beach", n_save_sample=2,
                        save_infer_steps=2, **settings)
    card = (out / "README.md").read_text()
    front = front_matter(card)
    sdxl = settings.get("model") == "tiny-sdxl"
    assert front["license"] == ("openrail++" if sdxl else "creativeml-openrail-m")
    assert front["instance_prompt"] == "a photo of sks ball"
    assert "base_model" not in front  # a built-in: not on the Hub
    assert set(front["tags"]) >= {"text-to-image", "dreambooth",
                                  "stable-diffusion-xl" if sdxl else "stable-diffusion", *tags}
    assert [w["output"]["url"] for w in front["widget"]] == ["samples/sample-000.png",
                                                             "samples/sample-001.png"]
    assert all((out / w["output"]["url"]).is_file() for w in front["widget"])
    uses = json.loads((out / "training.json").read_text())["files"]
    assert sorted(uses) == files and all((out / name).is_file() for name in uses)
    for name, use in uses.items():
        for tool in use["for"]:
            assert f"| `{name}` | {use['what']} | {tool} |" in card
    if "lora/pytorch_lora_weights.safetensors" in uses:
        assert list(uses["lora/pytorch_lora_weights.safetensors"]["for"]) == ["diffusers"]
        assert set(uses["lora.safetensors"]["for"]) == {"AUTOMATIC1111 / Forge", "ComfyUI",
                                                        "diffusers"}


def test_the_card_names_a_hub_base_model_download_weights_recorded(tmp_path):
    from train.card import base_model_id

    hub_id = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    (tmp_path / "source.json").write_text(json.dumps({"model": hub_id}))
    assert base_model_id(str(tmp_path)) == hub_id
    (tmp_path / "source.json").write_text('{"model": "/home/me/models/sd15"}')  # a local folder
    assert base_model_id(str(tmp_path)) is None
    assert base_model_id("tiny") is None


def test_lora_merged_into_a_full_model(tmp_path, photos_zip):
    out, _ = train_tiny(tmp_path, photos_zip, "merged", use_lora=True, max_train_steps=2,
                        output_format="diffusers,lora", save_precision="fp32")
    base = build_builtin("tiny").unet.state_dict()
    merged = unet_weights(out)
    assert set(merged) == set(base)  # plain weights, no adapter names
    assert any(not torch.equal(merged[k], base[k]) for k in base)


def test_extract_lora_from_a_full_fine_tune(tmp_path, photos_zip):
    out, _ = train_tiny(tmp_path, photos_zip, "extract", extract_lora=8, max_train_steps=4,
                        learning_rate=1e-3)
    names = tar_names(tmp_path, "extract")
    assert "lora.safetensors" in names and "model_index.json" in names
    kohya = load_file(out / "lora.safetensors")
    assert max(v.shape[0] for k, v in kohya.items() if k.endswith("lora_down.weight")) <= 8
    assert any("_resnets_" in k for k in kohya)  # convolutions too, not only attention
    # Loaded on the base model, it carries part of the fine-tune: closer to it than the base.
    from diffusers import StableDiffusionPipeline

    folder = tmp_path / "tiny"
    build_builtin("tiny").save_pretrained(folder)
    tuned = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    base = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    want, before = unet_output(tuned), unet_output(base)
    base.load_lora_weights(str(out / "lora.safetensors"))
    assert (unet_output(base) - want).norm() < 0.9 * (before - want).norm()


def test_lora_format_needs_a_lora():
    with pytest.raises(UserError, match="output_format lora needs a LoRA"):
        TrainConfig(instance_data="x.zip", instance_prompt="a", class_prompt="b",
                    output_format="lora")


def test_sd2_trains_and_exports_a_single_file(tmp_path, photos_zip):
    from diffusers import StableDiffusionPipeline

    out, _ = train_tiny(tmp_path, photos_zip, "sd2", model="tiny-sd2",
                        output_format="diffusers,single_file", save_precision="fp32")
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"
    single = StableDiffusionPipeline.from_single_file(
        out / "model.safetensors", config=str(out), local_files_only=True, safety_checker=None)
    trained = unet_weights(out)
    assert all(torch.equal(single.unet.state_dict()[k], v) for k, v in trained.items())
    base = build_builtin("tiny-sd2").unet.state_dict()
    assert any(not torch.equal(trained[k], base[k]) for k in base)


def test_a_single_file_checkpoint_is_a_base_model(tmp_path, photos_zip):
    pipe = build_builtin("tiny")
    folder = tmp_path / "tiny"
    pipe.save_pretrained(folder)
    with torch.no_grad():  # a "community fine-tune": the file differs from the folder
        for p in pipe.unet.parameters():
            p.add_(0.01)
    # An upload may arrive without its suffix: it is recognised by its content.
    save_single_file(pipe, tmp_path / "custom-upload", torch.float32)
    out, lines = train_tiny(tmp_path, photos_zip, "custom", model=str(folder),
                            base_checkpoint=str(tmp_path / "custom-upload"),
                            max_train_steps=1, save_precision="fp32", learning_rate=0.0,
                            with_prior_preservation=False)
    assert any("custom-upload" in line for line in lines)
    expected = pipe.unet.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in unet_weights(out).items())


def test_untrained_parts_are_saved_as_they_were(tmp_path, photos_zip):
    out, _ = train_tiny(tmp_path, photos_zip, "frozen", train_text_encoder=False)
    base = build_builtin("tiny")
    for part, file in (("vae", "vae/diffusion_pytorch_model.safetensors"),
                       ("text_encoder", "text_encoder/model.safetensors")):
        saved = {k.removeprefix("text_model."): v for k, v in load_file(out / file).items()}
        expected = getattr(base, part).state_dict()
        assert all(torch.equal(saved[k], v.half()) for k, v in expected.items()
                   if k in saved), part
        assert len(saved) >= len(expected) - 1, part  # all but a buffer (position_ids)
