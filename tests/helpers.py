"""Shared test helpers: archives and images built in code, fast settings for the `tiny` model, a
tiny run of the recipe. Tests import them (`from helpers import ...`); fixtures live in
conftest.py.

Run the suite with `script/test` (sets up .venv, then pytest), or `pytest` inside the venv.
"""

from __future__ import annotations

import io
import json
import re
import sys
import tarfile
import warnings
import zipfile
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore", category=DeprecationWarning)

from train import families  # noqa: E402


# Settings that make a full run take seconds on the tiny model.
FAST = dict(model="tiny", resolution=64, num_class_images=2, class_infer_steps=2,
            sample_batch_size=2, max_train_steps=4, learning_rate=1e-4)


def image_bytes(color=(200, 40, 40), size=(64, 48), fmt="JPEG", mode="RGB", exif=None) -> bytes:
    image = Image.new(mode, size, color)
    buffer = io.BytesIO()
    kwargs = {"exif": exif} if exif is not None else {}
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, payload in members.items():
            archive.writestr(name, payload)
    return path


def untar(tar_path: Path, dest: Path) -> Path:
    with tarfile.open(tar_path) as tar:
        tar.extractall(dest, filter="data")
    return dest


def read_training_json(folder: Path) -> dict:
    return json.loads((folder / "training.json").read_text())


def train_tiny(tmp_path, photos_zip, name="run", **overrides):
    """Run the recipe on the tiny model; returns (untarred output folder, log lines)."""
    lines = []
    settings = dict(FAST, instance_data=str(photos_zip), instance_prompt="a photo of sks ball",
                    class_prompt="a photo of a ball", output=str(tmp_path / f"{name}.tar"),
                    work_dir=str(tmp_path / f"{name}-work"))
    from train import TrainConfig, run

    config = TrainConfig(**{**settings, **overrides})
    tar = run(config, log=lines.append)
    assert list((tmp_path / f"{name}-work").iterdir()) == [], "work directory left behind"
    return untar(tar, tmp_path / name), lines


def unet_weights(folder) -> dict:
    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


def same_weights(a, b) -> bool:
    """Whether two modules (or two state dicts) hold exactly the same tensors."""
    a, b = (x if isinstance(x, dict) else x.state_dict() for x in (a, b))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def assert_close(a, b, tol: float = 1e-5) -> None:
    """Two tensors, or two sequences of tensors, equal within `tol` (relative and absolute)."""
    if isinstance(a, torch.Tensor):
        a, b = [a], [b]
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


@torch.no_grad()
def probe(pipe, prompt: str = "a photo of sks ball"):
    """What a pipeline's trainable parts compute on fixed inputs, for any family: (text states,
    pooled embedding or None, denoiser output) for `prompt` padded to its full length (77
    tokens; T5's as the family says), a fixed noisy latent at timestep 500 and (SDXL) fixed
    time ids."""
    from train.data import prompt_texts, tokenize

    family = families.get(families.of(pipe))
    ids = [tokenize(tokenizer, prompt_texts(family, tokenizer, [prompt]),
                    family.TEXT_LENGTHS.get(name))[0]
           for (_, name), tokenizer in zip(family.TEXT, families.tokenizers(pipe))]
    states, pooled = family.encode_text(families.text_encoders(pipe), ids)
    denoiser = families.denoiser(pipe)
    latent = torch.randn(1, pipe.vae.config.latent_channels, 8, 8,
                         generator=torch.Generator().manual_seed(1))
    time_ids = torch.tensor([[48.0, 64, 0, 8, 64, 64]]) if family.TIME_IDS else None
    out = family.denoise(denoiser, latent, torch.tensor([500]), states, pooled, time_ids)
    return states, pooled, out


def flow_step(pipe, family, seed: int = 7):
    """One step of the real training loop (learning rate 0: nothing moves) on one red photo of
    a flow-matching family's `pipe`, prompts cached. Returns the step's instance loss, the
    cached data, the latent and noise the loop drew, and the loop's generator replayed up to
    its timestep draw, for a test to finish the loss by hand."""
    import copy
    from types import SimpleNamespace

    from accelerate import Accelerator

    from train import TrainConfig
    from train.data import draw_batch, prepare
    from train.intake import Example
    from train.loop import LoopState, Training, train

    pipe = copy.deepcopy(pipe)
    image = Image.new("RGB", (64, 64), (200, 40, 40))
    encoders = families.text_encoders(pipe)
    data = prepare(family, pipe.vae, encoders, families.tokenizers(pipe),
                   [Example("a.png", "a photo of sks ball", (64, 64), image)], [], 64,
                   center_crop=True, cache_embeddings=True, seed=0)
    optimizer = torch.optim.SGD(pipe.transformer.parameters(), lr=0.0)
    training = Training(pipe.transformer, encoders, optimizer,
                        torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
                        family.training_scheduler(pipe.scheduler.config),
                        list(pipe.transformer.parameters()), {}, None, None,
                        denoiser_name="transformer")
    config = TrainConfig(instance_data="x", instance_prompt="a photo of sks ball",
                         with_prior_preservation=False, train_batch_size=1)
    state = train(Accelerator(cpu=True), family, training, data, LoopState.start(seed),
                  SimpleNamespace(steps=1, log_every=1), config, until=1, log=lambda line: None)
    generator = torch.Generator().manual_seed(seed)  # the loop's draws, replayed
    draw_batch(data, [], generator, batch_size=1)
    sample_noise = torch.randn(data.inst_mean[0].shape, generator=generator)
    noise = torch.randn(data.inst_mean[0].shape, generator=generator)
    latents = data.inst_mean[0] + data.inst_std[0] * sample_noise
    return state.history[0]["instance_loss"], data, latents, noise, generator


KOHYA_KEY = re.compile(r"lora_(unet|te1|te2)_\w+\.(lora_down\.weight|lora_up\.weight|alpha)")


def apply_kohya_file(original: dict, lora: dict, prefix: str = "") -> dict:
    """`original` (weights in the original layout: transformer_file's) with the `lora_unet_`
    modules of a kohya-layout LoRA applied as ComfyUI and Forge apply one: each module found by
    its name in a map made from the weights' own keys (`lora_unet_` + the key without `prefix`
    and `.weight`, `.` -> `_`), its weight + alpha / rank · up @ down (rank: down's rows; alpha
    the rank when absent). fp32; a module that maps to no weight is a KeyError."""
    names = {"lora_unet_" + key[len(prefix):-len(".weight")].replace(".", "_"): key
             for key in original if key.endswith(".weight")}
    out = {key: value.float() for key, value in original.items()}
    for module in {key.split(".")[0] for key in lora if key.startswith("lora_unet_")}:
        down = lora[module + ".lora_down.weight"].float()
        up = lora[module + ".lora_up.weight"].float()
        alpha = float(lora.get(module + ".alpha", down.shape[0]))
        key = names[module]
        out[key] = out[key] + alpha / down.shape[0] * (up @ down)
    return out


def check_kohya_file(folder: Path, base, tuned, tol: float = 1e-5) -> dict:
    """A transformer family's (SD 3.x, FLUX) `folder/lora.safetensors`: every key a kohya
    `lora_unet_*` / `lora_te1_*` / `lora_te2_*` with `.lora_down.weight`, `.lora_up.weight` and
    `.alpha`; applied as ComfyUI and Forge apply it (apply_kohya_file) to the base's
    transformer.safetensors (save_transformer_file), it gives `tuned`'s (the weights the LoRA
    stands for: a trained LoRA merged), and applied to the base's CLIPs (lora.apply_kohya, as
    the webuis do) `tuned`'s CLIPs, each within `tol`. Returns the file's tensors."""
    import copy

    from train import lora as lora_module
    from train.transformer_file import PREFIX, save_transformer_file

    kind = families.of(base)
    lora = load_file(folder / "lora.safetensors")
    assert lora and all(KOHYA_KEY.fullmatch(key) for key in lora), \
        [key for key in lora if not KOHYA_KEY.fullmatch(key)][:3]
    modules = {key.split(".")[0] for key in lora}
    assert all(f"{m}.{s}" in lora for m in modules
               for s in ("lora_down.weight", "lora_up.weight", "alpha"))
    files = folder / "original"
    files.mkdir(exist_ok=True)
    for name, pipe in (("base", base), ("tuned", tuned)):
        save_transformer_file(pipe, files / f"{name}.safetensors", torch.float32)
    want = load_file(files / "tuned.safetensors")
    got = apply_kohya_file(load_file(files / "base.safetensors"), lora, PREFIX[kind])
    assert got.keys() == want.keys()
    assert_close([got[k] for k in want], list(want.values()), tol=tol)
    for name in families.text_names(base):
        prefix = families.get(kind).KOHYA["prefixes"].get(name)
        if prefix and any(key.startswith(prefix) for key in lora):
            model = copy.deepcopy(getattr(base, name))
            lora_module.apply_kohya(model, lora, name, family=kind)
            want = getattr(tuned, name).state_dict()
            got = model.state_dict()
            assert_close([got[k] for k in want], list(want.values()), tol=tol)
    return lora


def check_lora_files(out: Path, base, tuned, trained) -> None:
    """A transformer family's two LoRA files (rank 4, alpha 16), from a run whose output `out`
    also holds the pipeline with the LoRA merged, `tuned` (its probe: `trained`): diffusers'
    layout reloads on a copy of `base` to the `trained` outputs; the kohya layout
    (check_kohya_file) is that merged pipeline's change to the original layout's weights, each
    fused module's rank the sum of its parts' at scale 1, the others' 4 at alpha 16."""
    import copy

    pipe = copy.deepcopy(base)
    pipe.load_lora_weights(str(out / "lora"))
    assert_close(probe(pipe), trained)
    lora = check_kohya_file(out, base, tuned)
    for module in {key.split(".")[0] for key in lora}:
        rank, alpha = lora[module + ".lora_down.weight"].shape[0], float(lora[module + ".alpha"])
        fused = module.endswith(("_qkv", "_linear1"))
        assert (rank, alpha) == ((rank, rank) if fused else (4, 16.0)), (module, rank, alpha)
        assert rank == (16 if module.endswith("linear1") else 12 if fused else 4), module


def check_extracted_lora(out: Path, base, tuned, tmp_path: Path) -> None:
    """A transformer family's LoRA extracted (extract_lora, at a rank no changed matrix
    exceeds) from a full fine-tune of `base` and its CLIP text encoders, whose untarred output
    `out` holds the fine-tuned pipeline `tuned`:
    - its two files are a trained LoRA's (add_lora on the transformer and the CLIPs, then
      save_lora): the same keys in each layout;
    - diffusers' layout, loaded on a copy of `base` by diffusers, computes (probe: the CLIPs'
      states and pooled output, the transformer's output) what `base` does with its LoRA
      target modules' weights taken from `tuned`, to float rounding, which is nearer `tuned`
      than `base` is (the fine-tune moved biases, norms, embeddings and other layers too: no
      LoRA carries those); the kohya layout is those weights, on the original layout's fused
      modules and the CLIPs (check_kohya_file);
    - extracted at rank 2 instead, it misses more than at full rank, but still moves the base
      toward the fine-tune."""
    import copy

    from peft.tuners.tuners_utils import BaseTunerLayer

    from train import lora

    family = families.get(families.of(base))
    parts = [family.DENOISER] + [name for name in families.text_names(base)
                                 if name not in family.FROZEN_TEXT]
    trained = copy.deepcopy(base)  # a LoRA as the family trains one (untrained), for its names
    for part in parts:
        lora.add_lora(getattr(trained, part), 4, 4, part)
    lora.save_lora(trained, tmp_path / "trained", torch.float32)
    files = ("lora/pytorch_lora_weights.safetensors", "lora.safetensors")
    for name in files:
        assert load_file(out / name).keys() == load_file(tmp_path / "trained" / name).keys()
    assert set(files) <= set(read_training_json(out)["files"])

    reference = copy.deepcopy(base)  # what a LoRA of those modules can carry
    for part in parts:
        for path, module in getattr(trained, part).named_modules():
            if isinstance(module, BaseTunerLayer):
                getattr(reference, part).get_submodule(path).weight.data.copy_(
                    getattr(tuned, part).get_submodule(path).weight)

    def loaded(folder, **kwargs):
        pipe = copy.deepcopy(base)
        pipe.load_lora_weights(str(folder), **kwargs)
        return probe(pipe)

    want, before, fine_tune = probe(reference), probe(base), probe(tuned)
    full = loaded(out / "lora")
    assert_close(full, want, tol=1e-5)
    check_kohya_file(out, base, reference)

    weights = {part: getattr(base, part).state_dict() for part in parts}
    lora.save_extracted(tuned, weights, 2, tmp_path / "rank-2", torch.float32)
    low = loaded(tmp_path / "rank-2" / "lora")
    for i in (1, 2):  # CLIP's pooled output, the transformer's
        missed = [float((got[i] - want[i]).norm() / (before[i] - want[i]).norm())
                  for got in (full, low)]
        assert missed[0] < 1e-4 and 0.01 < missed[1] < 0.9, (i, missed)
        # The fine-tune itself: nearer it than the base (at these widths the layers no LoRA
        # covers are much of its effect on the transformer: the full-rank LoRA misses 0.6-0.8)
        assert (full[i] - fine_tune[i]).norm() < (before[i] - fine_tune[i]).norm(), i


def check_resume(tmp_path: Path, photos, settings: dict, weights: str) -> None:
    """A run resumed from its step-2 checkpoint ends with the `weights` file (a path in the
    output) bit-identical to the uninterrupted run's."""
    whole, _ = train_tiny(tmp_path, photos, "whole", **settings, checkpointing_steps=2)
    resumed, lines = train_tiny(tmp_path, photos, "resumed", **settings,
                                resume=str(tmp_path / "whole-checkpoints" / "step-000002"))
    assert any("from step 2" in line for line in lines)
    a, b = load_file(whole / weights), load_file(resumed / weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
