"""Outputs load outside the pinned stack: in transformers 4 + an older diffusers, as they are.

Most of the AUTOMATIC1111/ComfyUI world and many services still run transformers 4, which reads
a diffusers folder differently from transformers 5. The fast test checks
the layout `save_pipeline` writes and that the pinned stack reloads it exactly; the others load
the same folders in a separate venv with transformers 4.57 + diffusers 0.35 and compare what both
stacks compute. That venv is built once per session (about 25 s) and cached under
.venv/compat-tf4/<hash of the pins>; delete that folder to rebuild it.

    pytest tests/test_compat.py --durations=5
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import FAST, ROOT, untar
from train.export import save_pipeline
from train.models import build_builtin
from train.tokenizers import build_tokenizer

# The older stack. torch stays at the pinned CPU wheel (constraints.txt); peft (with accelerate)
# is what diffusers 0.35's load_lora_weights needs.
PINS = ("torch==2.13.0", "transformers==4.57.6", "diffusers==0.35.2", "safetensors==0.8.0",
        "peft==0.17.1", "accelerate==1.10.1")
# pip messages that mean the packages are unreachable (no registry), the one reason to skip.
NO_REGISTRY = ("No matching distribution found", "Could not find a version",
               "Failed to establish a new connection", "Temporary failure in name resolution",
               "Network is unreachable", "ProxyError")
PROMPT = "a photo of sks dog, wearing a RED hat!!"

# Run by both stacks (the tf4 venv as a script, the pinned one through runpy), so both compute
# with the same code; it uses only APIs that transformers 4 and 5 and diffusers 0.35 and 0.42 share.
PROBE = '''
import json, sys
import torch
from diffusers import DiffusionPipeline


@torch.no_grad()
def probe(folder, inputs, prompt, generate=False, extra="-"):
    """`extra`: "single=FILE" loads a single file (configs from folder), "lora=PATH" adds a
    LoRA to the folder's pipeline."""
    kind, _, path = extra.partition("=")
    if kind == "single":
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_single_file(path, config=folder,
                                                        local_files_only=True)
    else:
        pipe = DiffusionPipeline.from_pretrained(folder)  # plain, as a user of that stack would
    if kind == "lora":  # offline, diffusers 0.35 wants a folder and the file's name in it
        import os

        if os.path.isdir(path):
            pipe.load_lora_weights(path, weight_name="pytorch_lora_weights.safetensors")
        else:
            pipe.load_lora_weights(os.path.dirname(path), weight_name=os.path.basename(path))
    pipe.set_progress_bar_config(disable=True)
    out = {}
    for name in ("tokenizer", "tokenizer_2"):
        if getattr(pipe, name, None) is not None:
            out[name] = torch.tensor(getattr(pipe, name)(prompt).input_ids)
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:
            result = getattr(pipe, name)(inputs["input_ids"], output_hidden_states=True)
            out[name] = result[0]
            out[name + ".pooled"] = result[1]  # pooler output, or SDXL's projected text_embeds
            out[name + ".penultimate"] = result.hidden_states[-2]  # what SDXL conditions on
    added = ({"added_cond_kwargs": {"text_embeds": inputs["text_embeds"],
                                    "time_ids": inputs["time_ids"]}}
             if "time_ids" in inputs else {})
    out["unet"] = pipe.unet(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"],
                            **added).sample
    if generate:
        out["image"] = pipe(prompt, num_inference_steps=2, height=64, width=64, output_type="pt",
                            generator=torch.Generator().manual_seed(0)).images
    return out


if __name__ == "__main__":
    import diffusers, transformers
    from safetensors.torch import load_file, save_file

    folder, inputs, output, generate = sys.argv[1:5]
    out = probe(folder, load_file(inputs), sys.argv[5], generate == "generate", sys.argv[6])
    save_file({k: v.contiguous() for k, v in out.items()}, output)
    print(json.dumps({"transformers": transformers.__version__,
                      "diffusers": diffusers.__version__}))
'''


@pytest.fixture(scope="session")
def tf4_python() -> Path:
    """The python of a venv with transformers 4 + diffusers 0.35, built once (cached by pins)."""
    cache = ROOT / ".venv" / "compat-tf4"
    venv = cache / hashlib.sha256(" ".join(PINS).encode()).hexdigest()[:12]
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent test session may be building it
        if (venv / "ready").exists():
            return venv / "bin" / "python"
        for old in cache.glob("[!.]*"):  # venvs of older pins, or a half-built one
            shutil.rmtree(old)
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        # This venv's pip installs into the new one (no pip bootstrap there). Compiling every
        # .pyc would triple the build; the modules the probe imports compile on first use.
        result = subprocess.run(
            [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
             "--quiet", "--no-compile", "-c", str(ROOT / "constraints.txt"), *PINS],
            capture_output=True, text=True)
        if result.returncode:
            shutil.rmtree(venv)
            reason = f"pip could not install {' '.join(PINS)}:\n{result.stderr[-3000:]}"
            if any(marker in result.stderr for marker in NO_REGISTRY):
                pytest.skip(f"no package registry for the transformers 4 venv; {reason}")
            pytest.fail(reason)
        (venv / "ready").touch()
        return venv / "bin" / "python"


def tiny_sd():
    """The tiny SD pipeline plus a feature extractor (transformers 5 makes it ...Pil)."""
    from transformers import CLIPImageProcessor

    pipe = build_builtin("tiny")
    pipe.register_modules(feature_extractor=CLIPImageProcessor(size=32, crop_size=32))
    return pipe


def tiny_sdxl():
    """SDXL's layout at toy widths: CLIPTextModel + CLIPTextModelWithProjection, two tokenizers,
    a UNet with text_time conditioning (cross-attention width = the two encoders' widths)."""
    from diffusers import (EulerDiscreteScheduler, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = build_tokenizer()
    text = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, projection_dim=32, vocab_size=len(tokenizer),
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 2), use_linear_projection=True,
            cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32)
        te1, te2 = CLIPTextModel(text), CLIPTextModelWithProjection(text)
    tiny = build_builtin("tiny")
    return StableDiffusionXLPipeline(
        vae=tiny.vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer,
        tokenizer_2=build_tokenizer(), unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(tiny.scheduler.config))


PIPELINES = {"sd": tiny_sd, "sdxl": tiny_sdxl}


def probe_inputs(pipe) -> dict:
    """Fixed inputs for the text encoders and the UNet, shaped for `pipe`."""
    g = torch.Generator().manual_seed(0)
    unet = pipe.unet.config
    inputs = {"input_ids": torch.randint(0, len(pipe.tokenizer), (2, 77), generator=g),
              "sample": torch.randn(2, 4, 8, 8, generator=g), "timestep": torch.tensor(321),
              "encoder_hidden_states": torch.randn(2, 77, unet.cross_attention_dim, generator=g)}
    if unet.addition_embed_type == "text_time":
        width = unet.projection_class_embeddings_input_dim - 6 * unet.addition_time_embed_dim
        inputs["text_embeds"] = torch.randn(2, width, generator=g)
        inputs["time_ids"] = torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)
    return inputs


def compare_stacks(folder: Path, inputs: dict, tf4_python: Path, tmp_path: Path,
                   generate: bool = False, extra: str = "-") -> dict:
    """Run PROBE on `folder` in the tf4 venv and in this stack; assert they agree."""
    script, inputs_path, output = tmp_path / "probe.py", tmp_path / "in.st", tmp_path / "out.st"
    script.write_text(PROBE)
    save_file(inputs, inputs_path)
    # Offline and with an empty HF cache, so that nothing can come from anywhere but `folder`.
    # The venv is installed without .pyc files; letting Python write them (where the
    # environment forbids it) makes the first probe compile what it imports, the next ones fast.
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONDONTWRITEBYTECODE")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run(
        [str(tf4_python), str(script), str(folder), str(inputs_path), str(output),
         "generate" if generate else "-", PROMPT, extra], env=env, capture_output=True,
        text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    stack = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stack["transformers"].startswith("4.") and stack["diffusers"].startswith("0.35."), stack
    theirs = load_file(output)
    ours = runpy.run_path(str(script))["probe"](str(folder), inputs, PROMPT, generate, extra)
    assert theirs.keys() == ours.keys()
    for name, value in ours.items():
        if name.startswith("tokenizer"):  # transformers 4's slow tokenizer read vocab/merges
            assert theirs[name].tolist() == value.tolist(), name
        else:
            # Both compute in fp32 from the same fp16 weights; the tolerance covers the two
            # stacks' different code paths. A missing prefix (random text encoder) or a wrong
            # vocabulary is off by order one.
            torch.testing.assert_close(theirs[name], value, rtol=1e-3, atol=1e-3, msg=name)
    return ours


@pytest.mark.parametrize("kind", PIPELINES)
def test_saved_folder_is_transformers4_shaped_and_reloads_exactly(kind, tmp_path):
    from diffusers import DiffusionPipeline

    pipe = PIPELINES[kind]()
    save_pipeline(pipe, tmp_path)  # fp16, cast in place: `pipe` now holds what was saved
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert not [v for v in index.values() if isinstance(v, list) and str(v[1]).endswith("Pil")]
    if kind == "sd":
        assert index["feature_extractor"] == ["transformers", "CLIPImageProcessor"]
    # transformers 4's key layout: CLIPTextModel and CLIPTextModelWithProjection both under
    # `text_model.` (the projection beside it).
    for name in ("text_encoder", "text_encoder_2")[:1 + (kind == "sdxl")]:
        keys = load_file(tmp_path / name / "model.safetensors").keys()
        assert {k.split(".")[0] for k in keys} == {"text_model"} | (
            {"text_projection"} if name == "text_encoder_2" else set())
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert config["dtype"] == "float32"  # see save_pipeline: fp32 beside an fp32 UNet
    for name in ("tokenizer", "tokenizer_2")[:1 + (kind == "sdxl")]:
        vocab = json.loads((tmp_path / name / "vocab.json").read_text())
        assert vocab == getattr(pipe, name).get_vocab()
        # transformers 4 skips the first line of merges.txt (a "#version" header).
        merges = (tmp_path / name / "merges.txt").read_text().splitlines()
        model = json.loads((tmp_path / name / "tokenizer.json").read_text())["model"]
        assert merges[0].startswith("#version") and len(merges) > 100
        assert merges[1:] == [" ".join(pair) for pair in model["merges"]]

    again = DiffusionPipeline.from_pretrained(tmp_path)
    for name, part in pipe.components.items():
        if isinstance(part, torch.nn.Module):
            saved, loaded = part.state_dict(), getattr(again, name).state_dict()
            assert saved.keys() == loaded.keys(), name
            for key, value in saved.items():
                assert torch.equal(value.float(), loaded[key].float()), f"{name}: {key}"
        elif hasattr(part, "backend_tokenizer"):
            assert getattr(again, name)(PROMPT).input_ids == part(PROMPT).input_ids


@pytest.mark.parametrize("kind", PIPELINES)
def test_transformers4_computes_what_the_pinned_stack_does(kind, tf4_python, tmp_path):
    pipe = PIPELINES[kind]()
    save_pipeline(pipe, tmp_path / "model")
    compare_stacks(tmp_path / "model", probe_inputs(pipe), tf4_python, tmp_path)


def test_transformers4_loads_and_generates_from_a_trained_tarball(tf4_python, tmp_path,
                                                                  photos_zip):
    from train import TrainConfig, run

    tar = run(TrainConfig(**dict(
        FAST, instance_data=str(photos_zip), instance_prompt="a photo of sks dog",
        class_prompt="a photo of a dog", output=str(tmp_path / "out.tar"),
        work_dir=str(tmp_path / "work"))), log=lambda _: None)
    ours = compare_stacks(untar(tar, tmp_path / "out"), probe_inputs(build_builtin("tiny")), tf4_python, tmp_path,
                          generate=True)
    assert ours["image"].shape == (1, 3, 64, 64) and ours["image"].std() > 0.01


def test_transformers4_reads_the_single_file_and_both_lora_layouts(tf4_python, tmp_path,
                                                                   photos_zip):
    from train import TrainConfig, run

    base = tmp_path / "base"
    save_pipeline(build_builtin("tiny"), base)
    tar = run(TrainConfig(**dict(
        FAST, instance_data=str(photos_zip), instance_prompt="a photo of sks dog",
        class_prompt="a photo of a dog", output=str(tmp_path / "out.tar"), use_lora=True,
        learning_rate=1e-2, output_format="diffusers,single_file,lora",
        work_dir=str(tmp_path / "work"))), log=lambda _: None)
    out = untar(tar, tmp_path / "out")
    inputs = probe_inputs(build_builtin("tiny"))
    plain = compare_stacks(base, inputs, tf4_python, tmp_path)
    merged = compare_stacks(out, inputs, tf4_python, tmp_path,
                            extra=f"single={out / 'model.safetensors'}")
    assert not torch.allclose(merged["unet"], plain["unet"], atol=1e-3)  # it trained
    for lora in (out / "lora", out / "lora.safetensors"):
        loaded = compare_stacks(base, inputs, tf4_python, tmp_path, extra=f"lora={lora}")
        # The LoRA on the base computes what the merged model does (fp16 files, so loosely).
        torch.testing.assert_close(loaded["unet"], merged["unet"], atol=5e-3, rtol=5e-2)
        torch.testing.assert_close(loaded["text_encoder"], merged["text_encoder"], atol=5e-3,
                                   rtol=5e-2)
