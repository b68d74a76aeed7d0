"""Cog predictor: the DreamBooth trainer as a Cog model (`cog predict`, Replicate, the HTTP API).

    cog predict -i instance_data=@dog.zip -i instance_prompt="a photo of sks dog" \
        -i class_prompt="a photo of a dog"

    # the same over HTTP, without Docker (docs/http.md, "The same server without Docker"):
    BASE_MODEL=tiny COG_PREDICT_TYPE_STUB=predict.py:Predictor python -m cog.server.http

No ML lives here: predict() hands a TrainConfig to train.run, which returns the tarball. The
inputs are TrainConfig's settings with their defaults, bounds, choices and descriptions, written
out as literals by script/schema, because cog builds its schema by parsing this file without
running it (tests check they agree with TrainConfig and with .cog/openapi_schema.json). The base
model is the folder script/download-weights fills, or whatever BASE_MODEL names (a diffusers
folder or a built-in name such as `tiny`). With more than one GPU visible (or NUM_PROCESSES set),
it trains on one process per GPU through torchrun (train/distributed.py). The `evaluate` input scores with the feature models
script/download-weights --eval puts in weights/, or those EVAL_DINO and EVAL_CLIP name.

A file input is taken only as the client sent it: a data: URI, or an http(s) URL that predict()
downloads itself, within MAX_DOWNLOAD_MIB and DOWNLOAD_TIMEOUT (environment variables of the
server), stopped at once by a cancel. Anything else (a path on the server, a folder, a file://
URL) is refused with one line, without looking at what it names: see client_file below.
"""

import os
import shutil
import stat
import tempfile
import urllib.parse
from typing import Optional

from cog import BasePredictor, Input, Path, URLPath

import train
from train.cli import to_argv
from train.config import field_type, fields
from train.download import fetch
from train.distributed import cuda_available, launch, process_count
from train.cleanup import remove, remove_leftovers
from train.models import check_model

SETTINGS = {f.name: f for f in fields()}
# The inputs that are files (cog.Path): a data: URI Cog decodes, or a URL predict() downloads.
FILES = ("instance_data", "class_data", "base_checkpoint", "resume")

# The file inputs of the prediction under way: (the Path convert returned, the URL predict()
# downloads into it, or None for a data: URI, copied there at once). Cog (coglet) hands predict() a URL or data: URI as
# the Path that URLPath.convert returned, in this process; it hands over any other string as it
# came, so a client could name a file of the server. Keeping the very objects convert made lets
# predict() tell the two apart without opening, or even stat()ing, anything the client named;
# a Cog that stopped calling convert would fail closed (every file refused), not open.
_fetched: list[tuple[Path, Optional[str]]] = []
# Where they are put: a folder of this process (remove_leftovers knows its name), emptied after
# every prediction whatever Cog does with its own copies.
_inputs = Path(tempfile.gettempdir()) / f"dreambooth-in-{os.getpid()}-files"
# Bounds on a download (Cog's own has none), set in the server's environment.
MAX_DOWNLOAD_MIB = int(os.environ.get("MAX_DOWNLOAD_MIB", 64 << 10))
DOWNLOAD_TIMEOUT = float(os.environ.get("DOWNLOAD_TIMEOUT", 3600))


def _convert(self: URLPath) -> Path:
    """Cog's URLPath.convert, which downloads before predict() starts, in a thread a cancel
    never reaches, with no deadline or size limit. Here a data: URI (decoded by Cog already) is
    copied out at once, and an http(s) URL only noted: predict() downloads it (client_file)."""
    if self._path is None:
        _inputs.mkdir(mode=0o700, exist_ok=True)
        if _inputs.is_symlink() or _inputs.stat().st_uid != os.getuid():
            raise RuntimeError(f"{_inputs} is not this server's folder")
        # Under the name the client gave it (the URL's, or file.zip for a data: URI), so that
        # errors name the file the client knows; a folder of its own keeps names apart.
        folder = tempfile.mkdtemp(dir=_inputs)
        name = os.path.join(folder, self.filename if self.filename.strip(".") else "file")
        url = self.source if urllib.parse.urlsplit(self.source).scheme in ("http",
                                                                         "https") else None
        try:
            with open(name, "xb") as dest:
                if url is None:
                    shutil.copyfileobj(self.fileobj, dest)
        except BaseException:
            remove(folder)
            raise
        self._path = Path(name)
        _fetched.append((self._path, url))
    return self._path


URLPath.convert = _convert


def client_file(name: str, value) -> Optional[str]:
    """The local path of file input `name` if it came from the client for this prediction,
    downloaded now if it is a URL (bounded, and a cancel stops it); a UserError, the same
    whatever `value` names on the server, for anything else."""
    if value is None:
        return None
    urls = [url for path, url in _fetched if value is path]
    if not urls or not stat.S_ISREG(os.lstat(value).st_mode):
        raise train.UserError(f"{name}: send the file itself, as an http(s) URL or a data: URI; "
                              "the server does not read files by their path on the server")
    if urls[0]:
        try:
            fetch(urls[0], value, log=lambda line: print(f"{name}: {line}", flush=True),
                  max_bytes=MAX_DOWNLOAD_MIB << 20, timeout=DOWNLOAD_TIMEOUT,
                  user_agent=os.environ.get("COG_USER_AGENT"))
        except train.UserError as e:
            raise train.UserError(f"{name}: {e}") from None
    return str(value)


class Predictor(BasePredictor):
    def setup(self):
        """Find the base model (local files only) and a folder for outputs."""
        self.model = os.environ.get("BASE_MODEL", SETTINGS["model"].default)
        check_model(self.model)  # says to run script/download-weights when weights/ is missing
        # Checked only when a prediction asks for evaluate: most never need them.
        self.features = {name: os.environ.get(name.upper(), SETTINGS[name].default)
                         for name in ("eval_dino", "eval_clip")}
        # What a predecessor killed outright left (its output tarball, a run's work folder).
        for name in remove_leftovers(tempfile.gettempdir()):
            print(f"setup: removed {name}, left by a server that was stopped")
        self.outputs = tempfile.mkdtemp(prefix=f"dreambooth-out-{os.getpid()}-")
        self.processes, self.cuda = process_count(), cuda_available()

    def predict(
        self,
        # Written by script/schema from train.TrainConfig: change a setting there, run it.
        instance_prompt: str = Input(
            description="Prompt naming the subject with a rare identifier and its class, e.g. 'a photo of sks dog'"),
        class_prompt: Optional[str] = Input(
            default=None,
            description="Prompt for the subject's class without the identifier, e.g. 'a photo of a dog'; needed with prior preservation"),
        instance_data: Path = Input(description="ZIP of 3-20 photos of the subject"),
        class_data: Optional[Path] = Input(
            default=None,
            description="Optional ZIP of class images; they count toward num_class_images and the rest are generated"),
        num_class_images: int = Input(
            default=50, ge=0, le=10000,
            description="Class images for prior preservation; those missing from class_data are generated by the base model"),
        save_sample_prompt: Optional[str] = Input(
            default=None,
            description="If set, render sample images with this prompt into samples/ of the output"),
        save_sample_negative_prompt: Optional[str] = Input(
            default=None,
            description="Negative prompt for the sample images"),
        n_save_sample: int = Input(default=4, ge=1, le=100, description="Number of sample images"),
        save_guidance_scale: float = Input(
            default=7.5, ge=0.0, le=50.0,
            description="Classifier-free guidance scale for the sample images"),
        save_infer_steps: int = Input(
            default=50, ge=1, le=1000,
            description="Sampling steps for the sample images"),
        pad_tokens: bool = Input(
            default=False,
            description="Pad every prompt to the tokenizer's full length (77) instead of to the longest prompt in the batch"),
        with_prior_preservation: bool = Input(
            default=True,
            description="Also train on class images so the model keeps its idea of the class"),
        prior_loss_weight: float = Input(
            default=1.0, ge=0.0, le=1000.0,
            description="Weight of the class (prior-preservation) half of the loss"),
        seed: int = Input(
            default=1337, ge=0, le=4294967295,
            description="Seed for everything random: the same seed gives the same weights"),
        resolution: int = Input(
            default=512, ge=64, le=2048,
            description="Training resolution in pixels (images are resized, then cropped square); a multiple of 8"),
        center_crop: bool = Input(
            default=False,
            description="Crop the centre of each image; otherwise a random square crop, fixed per image by the seed"),
        train_text_encoder: bool = Input(
            default=True,
            description="Fine-tune the text encoder as well as the UNet"),
        train_batch_size: int = Input(
            default=1, ge=1, le=64,
            description="Instance images per step (as many class images are added)"),
        sample_batch_size: int = Input(
            default=4, ge=1, le=64,
            description="Images generated at once, for class images and samples"),
        num_train_epochs: int = Input(
            default=1, ge=1, le=100000,
            description="Passes over the data; used only when max_train_steps is 0"),
        max_train_steps: int = Input(
            default=2000, ge=0, le=1000000,
            description="Optimizer steps to train; overrides num_train_epochs (0 = train for num_train_epochs)"),
        gradient_accumulation_steps: int = Input(
            default=1, ge=1, le=1024,
            description="Batches whose gradients are averaged into each optimizer step"),
        gradient_checkpointing: bool = Input(
            default=False,
            description="Recompute activations in the backward pass: less memory, about 30% slower"),
        learning_rate: Optional[float] = Input(
            default=None, ge=0.0, le=1.0,
            description="Learning rate before scale_lr (default 1e-06, or 0.0001 with use_lora)"),
        scale_lr: bool = Input(
            default=False,
            description="Multiply the learning rate by train_batch_size x gradient_accumulation_steps"),
        lr_scheduler: str = Input(
            default="constant", choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"],
            description="Learning-rate schedule"),
        lr_warmup_steps: int = Input(
            default=0, ge=0, le=1000000,
            description="Steps of linear warm-up at the start of the schedule (with 'constant' too)"),
        use_8bit_adam: bool = Input(
            default=False,
            description="8-bit AdamW from bitsandbytes: optimizer state in a quarter of the memory"),
        adam_beta1: float = Input(default=0.9, ge=0.0, le=1.0, description="AdamW beta1"),
        adam_beta2: float = Input(default=0.999, ge=0.0, le=1.0, description="AdamW beta2"),
        adam_weight_decay: float = Input(
            default=0.01, ge=0.0, le=1.0,
            description="AdamW weight decay"),
        adam_epsilon: float = Input(default=1e-08, ge=0.0, le=1.0, description="AdamW epsilon"),
        max_grad_norm: float = Input(
            default=1.0, ge=0.0, le=1000.0,
            description="Clip the gradient norm to this value (0 = no clipping)"),
        class_infer_steps: int = Input(
            default=25, ge=1, le=1000,
            description="Sampling steps for each generated class image"),
        lr_num_cycles: int = Input(
            default=1, ge=1, le=1000,
            description="Hard restarts of the cosine_with_restarts schedule"),
        lr_power: float = Input(
            default=1.0, ge=0.0, le=10.0,
            description="Power of the polynomial schedule"),
        mixed_precision: str = Input(
            default="auto", choices=["auto", "no", "fp16", "bf16"],
            description="Precision of the forward pass on GPU: auto (bf16 where supported, else fp16), fp16, bf16 or no; always fp32 on CPU"),
        log_every: int = Input(
            default=0, ge=0, le=1000000,
            description="Print a progress line every this many steps (0 = about 50 lines per run)"),
        alpha_background: str = Input(
            default="white",
            description="Colour transparent areas of images are composited onto (a name or #rrggbb)"),
        flip_p: float = Input(
            default=0.0, ge=0.0, le=1.0,
            description="Probability of training on an image mirrored left-right (0 for faces and text, which are not symmetric)"),
        aspect_buckets: bool = Input(
            default=False,
            description="Train each photo at its own aspect ratio, in buckets of about resolution² pixels (sides multiples of 64), instead of cropping it square; class images stay square"),
        folder_captions: bool = Input(
            default=False,
            description="Caption by folders, JoePenna-style: a top folder names the subject, the next its class, the next a caption prefix (bingo/dog/a picture of/x.jpg -> 'a picture of bingo dog')"),
        concepts: Optional[str] = Input(
            default=None,
            description="Several subjects in one run: a JSON list of {instance_prompt, class_prompt, instance_data, class_data, num_class_images}, where instance_data and class_data name folders inside the instance_data and class_data archives; omitted prompts and counts default to the inputs above"),
        text_encoder_lr: Optional[float] = Input(
            default=None, ge=0.0, le=1.0,
            description="Learning rate of the text encoder (default: learning_rate)"),
        text_encoder_steps: int = Input(
            default=0, ge=0, le=1000000,
            description="Train the text encoder for the first N steps only, then freeze it (0 = every step)"),
        offset_noise: float = Input(
            default=0.0, ge=0.0, le=1.0,
            description="Offset noise: a per-channel constant added to the noise, so the model can learn very dark and very bright images (0.05-0.1 is usual; 0 = off)"),
        snr_gamma: float = Input(
            default=0.0, ge=0.0, le=1000.0,
            description="Min-SNR loss weighting with this gamma (5 is the paper's value; 0 = off): down-weights the easy low-noise timesteps"),
        use_ema: bool = Input(
            default=False,
            description="Export an exponential moving average of the UNet weights (smoother; holds a second copy of the UNet in memory)"),
        ema_decay: float = Input(
            default=0.9999, ge=0.0, le=1.0,
            description="Decay of the EMA (warmed up as (1+n)/(10+n) over the first steps)"),
        use_lora: bool = Input(
            default=False,
            description="Train LoRA adapters instead of every weight: a file of a few MB, less memory (the text encoder gets adapters too when train_text_encoder)"),
        lora_rank: int = Input(default=16, ge=1, le=1024, description="Rank of the LoRA adapters"),
        lora_alpha: float = Input(
            default=16.0, ge=0.0, le=10000.0,
            description="LoRA alpha: the adapters' output is scaled by lora_alpha / lora_rank"),
        output_format: str = Input(
            default="auto", choices=["auto", "diffusers", "single_file", "lora", "diffusers,single_file", "diffusers,lora", "single_file,lora", "diffusers,single_file,lora"],
            description="What to write: diffusers (a folder diffusers loads), single_file (one .safetensors that AUTOMATIC1111 and ComfyUI load), lora (LoRA files, in diffusers' and the kohya/webui layout); auto = diffusers, or lora with use_lora"),
        save_precision: str = Input(
            default="fp16", choices=["fp16", "bf16", "fp32"],
            description="Precision of the saved weights"),
        extract_lora: int = Input(
            default=0, ge=0, le=1024,
            description="Also write a LoRA of this rank extracted from the full fine-tune (0 = none)"),
        sample_every: int = Input(
            default=0, ge=0, le=1000000,
            description="Also render the sample images every N steps, into samples/step-N/ (0 = only at the end; needs save_sample_prompt)"),
        base_checkpoint: Optional[Path] = Input(
            default=None,
            description="A single-file .safetensors checkpoint to fine-tune (e.g. a community fine-tune of the base model); it must be of the base model's family, whose configs and tokenizer it uses"),
        resume: Optional[Path] = Input(
            default=None,
            description="Resume an interrupted run from a checkpoint: a checkpoint folder (or the folder of checkpoints: the latest one is taken), or a tarball of one"),
        evaluate: bool = Input(
            default=False,
            description="Score the trained model as the DreamBooth paper does (DINO, CLIP-I, CLIP-T, PRES, DIV on its 25 prompts, with the sample settings) and add evaluation.json and contact_sheet.png; each checkpoint is scored too and the best balanced one named. Needs the feature models of script/download-weights --eval"),
        eval_prompts: Optional[str] = Input(
            default=None,
            description="Your own evaluation prompts, one a line, identifier included (default: the paper's 25 for the subject's kind)"),
        eval_images_per_prompt: int = Input(
            default=4, ge=1, le=64,
            description="Images rendered per evaluation prompt (the paper: 4)"),
        class_scheduler: str = Input(
            default="dpm++", choices=["dpm++", "base", "ddim", "euler"],
            description="Sampler for the generated class images: dpm++ (DPM-Solver++, at least as accurate in 25 steps as the base model's own sampler in 50: half the time), base (the base model's own, e.g. PNDM for SD 1.5), ddim or euler"),
        # End of what script/schema writes.
    ) -> Path:
        """Train DreamBooth on the photos in instance_data; returns a tarball of weights."""
        inputs = {name: value for name, value in locals().items() if name in SETTINGS}
        try:
            return self.train(inputs)
        finally:
            for path in _inputs.glob("*"):  # the inputs, and any a failed or canceled
                remove(path)                # prediction before this one left
            _fetched.clear()

    def train(self, inputs: dict) -> Path:
        for name in FILES:
            inputs[name] = client_file(name, inputs[name])
        for name, value in inputs.items():
            # JSON has one number type: 3.0 passes the schema's "integer" (JSON Schema counts
            # it as one) and arrives as a float, which TrainConfig would refuse as not whole.
            if isinstance(value, float) and value.is_integer() \
                    and field_type(SETTINGS[name]) is int:
                inputs[name] = int(value)
        # Only the latest output is kept: Cog has delivered the previous one by now (inlined in
        # the response or PUT to the upload URL), so disk use stays at one tarball. A canceled
        # run leaves nothing else: train.run removes its work folder on any exit.
        remove(self.outputs)
        os.makedirs(self.outputs)
        output = os.path.join(self.outputs, "dreambooth-weights.tar")
        config = train.TrainConfig(**inputs, **self.features, model=self.model, output=output)
        if self.processes == 1:
            return Path(train.run(config))
        # Several GPUs: one training process each. Their output is printed here, where the
        # prediction's logs see it; a user mistake comes back as the same one-line error.
        status, errors = launch(self.processes, to_argv(config), cpu=not self.cuda)
        if status != 0 and errors:
            raise train.UserError(errors[-1].removeprefix("error: "))
        if status != 0:
            raise RuntimeError(f"training failed in one of its {self.processes} processes "
                               f"(exit status {status}); its log is above")
        return Path(output)
