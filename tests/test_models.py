"""Base models: the built-in ones have the right shape, folders load, the download script works."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers import ROOT, FAST, read_training_json, untar
from train import TrainConfig, UserError, run
from train.families import of as family
from train.models import build_builtin, load_pipeline
from train.tokenizers import build_tokenizer


def test_random_sd15_is_sd15_sized():
    pipe = build_builtin("random-sd15", "meta")  # shapes only, no memory
    counts = {name: sum(p.numel() for p in getattr(pipe, name).parameters())
              for name in ("unet", "vae", "text_encoder")}
    assert counts == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}


def test_tiny_keeps_sd15_block_layout_and_is_seeded():
    a, b = build_builtin("tiny"), build_builtin("tiny")
    assert len(a.unet.down_blocks) == 4 and len(a.unet.up_blocks) == 4
    assert len(a.vae.encoder.down_blocks) == 4
    assert all(torch.equal(x, y) for x, y in zip(a.unet.parameters(), b.unet.parameters()))


def test_tiny_sd2_is_a_v_prediction_sd2_model():
    pipe = build_builtin("tiny-sd2")
    assert family(pipe) == "sd2"
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.unet.config.use_linear_projection and pipe.unet.config.upcast_attention
    assert pipe.text_encoder.config.hidden_act == "gelu" and pipe.tokenizer.pad_token == "!"
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 768
    assert len(pipe.unet.down_blocks) == 4 and len(pipe.unet.up_blocks) == 4


def test_tiny_sdxl_has_two_text_encoders_and_is_seeded():
    from diffusers import StableDiffusionXLPipeline

    a, b = build_builtin("tiny-sdxl"), build_builtin("tiny-sdxl")
    assert isinstance(a, StableDiffusionXLPipeline) and family(a) == "sdxl"
    assert type(a.text_encoder).__name__ == "CLIPTextModel"
    assert type(a.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert (a.text_encoder.config.hidden_act, a.text_encoder_2.config.hidden_act) == \
        ("quick_gelu", "gelu")
    assert a.tokenizer_2.pad_token == "!" and a.vae.config.force_upcast
    assert a.unet.config.cross_attention_dim == \
        a.text_encoder.config.hidden_size + a.text_encoder_2.config.hidden_size
    assert [type(block).__name__ for block in a.unet.down_blocks] == \
        ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        pairs = zip(getattr(a, name).state_dict().values(), getattr(b, name).state_dict().values())
        assert all(torch.equal(x, y) for x, y in pairs), name


@pytest.mark.parametrize("name", ["tiny-sd2", "tiny-sdxl"])
def test_new_builtins_generate(name):
    """Their conditioning widths fit together: SDXL's pooled and size embeddings included."""
    pipe = load_pipeline(name, "cpu")
    images = pipe("a photo of sks dog", height=64, width=64, num_inference_steps=1,
                  output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, 64, 64) and bool(images.isfinite().all())


def test_tokenizer_handles_any_text():
    tok = build_tokenizer()
    assert tok.model_max_length == 77
    ids = tok("a photo of sks dog").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["<|startoftext|>", "a</w>", "photo</w>", "of</w>",
                                              "sks</w>", "dog</w>", "<|endoftext|>"]
    assert tok.decode(tok("Ünïcode, émoji 🐶!").input_ids, skip_special_tokens=True) == \
        "ünïcode , émoji 🐶!"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    build_builtin("tiny").save_pretrained(folder)
    return folder


def test_a_v_prediction_folder_trains(tmp_path, tiny_folder, photos_zip):
    model = tmp_path / "v-model"
    shutil.copytree(tiny_folder, model)
    config_path = model / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(dict(config, prediction_type="v_prediction")))
    tar = run(TrainConfig(**dict(FAST, model=str(model)), instance_data=str(photos_zip),
                          instance_prompt="a photo of sks ball", with_prior_preservation=False,
                          output=str(tmp_path / "v.tar")), log=lambda _: None)
    out = untar(tar, tmp_path / "v")
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"
    assert len(read_training_json(out)["history"]) == FAST["max_train_steps"]


def test_folder_that_is_not_sd_is_refused(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "PixArtSigmaPipeline"}')
    with pytest.raises(UserError, match="is a PixArtSigmaPipeline; only Stable Diffusion"):
        load_pipeline(str(tmp_path), "cpu")
    (tmp_path / "model_index.json").write_text('{"_class_name": ')
    with pytest.raises(UserError, match="model_index.json is not valid JSON"):
        load_pipeline(str(tmp_path), "cpu")
    (tmp_path / "vae").mkdir()
    with pytest.raises(UserError, match="not a diffusers folder"):
        load_pipeline(str(tmp_path / "vae"), "cpu")


def spoil(folder, case: str) -> None:
    unet = folder / "unet"
    if case == "no weights":
        for weights in unet.glob("*.safetensors"):
            weights.unlink()
    elif case == "junk weights":
        for weights in unet.glob("*.safetensors"):
            weights.write_bytes(b"\x93" * 1000)
    elif case == "no tokenizer":
        shutil.rmtree(folder / "tokenizer")
    elif case == "wrong config":
        config = json.loads((unet / "config.json").read_text())
        (unet / "config.json").write_text(json.dumps(dict(config, block_out_channels=[8, 16])))
    elif case == "no pipeline":
        (folder / "model_index.json").write_text("[]")


@pytest.mark.parametrize("case, message", [
    ("no weights", "could not be loaded (Error no file named diffusion_pytorch_model.bin"),
    ("junk weights", "could not be loaded (Unable to load weights from checkpoint file"),
    # transformers would make up a tokenizer of two words for it, and training would go on.
    ("no tokenizer", "has no tokenizer/: pass a complete diffusers folder"),
    ("wrong config", "does not fit the SD 1.x architecture its names claim (Must provide the "
                     "same number of `block_out_channels`"),
    ("no pipeline", "its model_index.json names no pipeline (_class_name)"),
])
def test_a_damaged_model_folder_is_one_line(tmp_path, tiny_folder, case, message):
    """A diffusers folder missing a file or a part, or holding one that does not fit: one
    line that names the folder and what to pass, not diffusers' or transformers' traceback."""
    model = tmp_path / "model"
    shutil.copytree(tiny_folder, model)
    spoil(model, case)
    with pytest.raises(UserError) as refused:
        load_pipeline(str(model), "cpu")
    assert str(refused.value).startswith(f"model {str(model)!r}")
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_download_weights_swaps_in_the_vae(tmp_path, tiny_folder, venv_env):
    other_vae = tmp_path / "other-vae"
    vae = build_builtin("tiny").vae
    with torch.no_grad():
        vae.decoder.conv_out.bias.fill_(0.5)  # a VAE different from the model's own
    vae.save_pretrained(other_vae)
    dest = tmp_path / "weights"
    result = subprocess.run([sys.executable, str(ROOT / "script" / "download-weights"),
                             "--model", str(tiny_folder), "--vae", str(other_vae),
                             "--dest", str(dest)], env=dict(venv_env, HF_HUB_OFFLINE="1"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    # Where it came from, for the trained model's card (a local folder here: no Hub id).
    assert json.loads((dest / "source.json").read_text()) == {"model": str(tiny_folder),
                                                              "vae": str(other_vae)}
    pipe = load_pipeline(str(dest), "cpu")
    assert torch.all(pipe.vae.decoder.conv_out.bias == 0.5)
    assert pipe.safety_checker is None
    saved = load_file(dest / "unet" / "diffusion_pytorch_model.safetensors")
    assert saved["conv_in.weight"].dtype == torch.float32
