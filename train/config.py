"""TrainConfig: every setting of a DreamBooth run, its default, its one-line doc and its checks.

This dataclass is the single home of the defaults. The Cog inputs (predict.py) and the CLI flags
(`python -m train --help`) are derived from it, and a test checks they agree. Construct one in
Python and hand it to `train.run`:

    from train import TrainConfig, run
    run(TrainConfig(instance_data="dog.zip", instance_prompt="a photo of sks dog",
                    class_prompt="a photo of a dog", model="tiny", output="dog.tar"))

Bad values raise `UserError` with one line that says what is wrong and how to fix it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field

from PIL import ImageColor

from .errors import UserError

LR_SCHEDULERS = ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                 "constant_with_warmup"]
MIXED_PRECISION = ["auto", "no", "fp16", "bf16"]
# Samplers for the generated class images (train/sampling.py SAMPLERS); "base" is the model's own.
CLASS_SCHEDULERS = ["dpm++", "base", "ddim", "euler"]
# Where prior preservation's targets come from (train/prior.py).
PRIOR_SOURCES = ["class_images", "base_model", "class_images+base_model"]
# Any combination of the three formats, in one canonical order (Cog shows these as a menu).
QUANTIZE_CHOICES = ["no", "nf4"]
OUTPUT_FORMATS = ["auto", "diffusers", "single_file", "lora", "diffusers,single_file",
                  "diffusers,lora", "single_file,lora", "diffusers,single_file,lora"]
SAVE_PRECISIONS = ["fp16", "bf16", "fp32"]
# Some settings are unset (None) until the base model's family fills them in (families.settle,
# each family module's DEFAULTS): resolution, max_train_steps, the guidance scales, learning_rate.
MAX_CLASS_IMAGES = 10000  # for a run: num_class_images, or all its concepts' together
# Where script/download-weights --eval puts the evaluation's feature models.
DEFAULT_DINO, DEFAULT_CLIP = "weights/dino-vits16", "weights/clip-vit-base-patch32"
POLYNOMIAL_END_LR = 1e-7  # diffusers' default end of the polynomial schedule
# Text the user sends is bounded before anything parses it: any text setting (a path, the
# concepts JSON, eval_prompts) at most MAX_TEXT_CHARS, a prompt at most MAX_PROMPT_CHARS (the
# text encoders read 77 tokens, about 300 characters), eval_prompts at most MAX_EVAL_PROMPTS
# prompts (each renders eval_images_per_prompt images).
MAX_TEXT_CHARS, MAX_PROMPT_CHARS, MAX_EVAL_PROMPTS = 1 << 20, 1000, 200
PROMPTS = ("instance_prompt", "class_prompt", "save_sample_prompt", "save_sample_negative_prompt")


def setting(default, help: str, *, ge=None, le=None, choices=None, cog: bool = True):
    """A dataclass field carrying its doc, bounds and choices; `cog=False` keeps it CLI-only."""
    meta = {"help": help, "ge": ge, "le": le, "choices": choices, "cog": cog}
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # --- What to train on -------------------------------------------------------------------
    instance_data: str | None = setting(
        None, "ZIP of 3-20 photos of the subject; the CLI also takes a folder of images")
    instance_prompt: str = setting(
        "", "Prompt naming the subject with a rare identifier and its class, e.g. 'a photo of "
            "sks dog'")
    class_prompt: str | None = setting(
        None, "Prompt for the subject's class without the identifier, e.g. 'a photo of a dog'; "
              "needed with prior preservation")
    class_data: str | None = setting(
        None, "Optional ZIP of class images; they count toward num_class_images and the rest "
              "are generated")
    num_class_images: int = setting(
        50, "Class images for prior preservation; those missing from class_data are generated "
            "by the base model", ge=0, le=MAX_CLASS_IMAGES)
    with_prior_preservation: bool = setting(
        True, "Also train on class images so the model keeps its idea of the class")
    prior_loss_weight: float = setting(
        1.0, "Weight of the class (prior-preservation) half of the loss", ge=0.0, le=1000.0)
    prior_source: str = setting(
        "class_images", "Where prior preservation's targets come from: class_images (the "
                        "paper's: images of the class, generated before training, trained on "
                        "beside the photos) or base_model (no class images: the base model's own "
                        "prediction for the class prompt on each step's noisy photo, with the "
                        "LoRA switched off or from a frozen copy) or class_images+base_model "
                        "(class images of the class prompt, each also kept under one of "
                        "prior_prompts by the base model's prediction on it)",
        choices=PRIOR_SOURCES)
    prior_prompts: str | None = setting(
        None, "The class in other contexts for the prior, one prompt a line (e.g. 'a photo of "
              "a dog on the beach'): half the class images are generated from these, half from "
              "class_prompt; with base_model each photo, with class_images+base_model each "
              "class image, is also kept under one of them, drawn at random each step")
    context_loss_weight: float = setting(
        0.5, "With prior_source class_images+base_model: the weight of the class images' rows "
             "under prior_prompts (toward the base model's predictions), beside "
             "prior_loss_weight for the class images themselves", ge=0.0, le=1000.0)
    class_guidance_scale: float | None = setting(
        None, "Guidance scale for the generated class images (default: the family's: 7.5 for "
              "SD 1.x/2.x/XL, 4.5 for SD 3.x, 3.5 for FLUX.1's distilled "
              "guidance)", ge=0.0, le=50.0)
    class_infer_steps: int = setting(
        25, "Sampling steps for each generated class image", ge=1, le=1000)
    class_scheduler: str = setting(
        "dpm++", "Sampler for the generated class images: dpm++ (DPM-Solver++, at least as "
                 "accurate in 25 steps as the base model's own sampler in 50: half the time), "
                 "base (the base model's own, e.g. PNDM for SD 1.5), ddim or euler",
        choices=CLASS_SCHEDULERS)

    alpha_background: str = setting(
        "white", "Colour transparent areas of images are composited onto (a name or #rrggbb)")

    folder_captions: bool = setting(
        False, "Caption by folders, JoePenna-style: a top folder names the subject, the next "
               "its class, the next a caption prefix (bingo/dog/a picture of/x.jpg -> 'a picture "
               "of bingo dog')")
    concepts: str | None = setting(
        None, "Several subjects in one run: a JSON list of {instance_prompt, class_prompt, "
              "instance_data, class_data, num_class_images, prior_prompts (a list)}, where "
              "instance_data and class_data name folders inside the instance_data and "
              "class_data archives; omitted prompts and counts default to the inputs above")

    # --- Samples rendered with the trained model --------------------------------------------
    save_sample_prompt: str | None = setting(
        None, "If set, render sample images with this prompt into samples/ of the output")
    save_sample_negative_prompt: str | None = setting(
        None, "Negative prompt for the sample images")
    n_save_sample: int = setting(4, "Number of sample images", ge=1, le=100)
    save_guidance_scale: float | None = setting(
        None, "Guidance scale for the sample images (default: the family's, as "
              "class_guidance_scale)", ge=0.0, le=50.0)
    save_infer_steps: int = setting(50, "Sampling steps for the sample images", ge=1, le=1000)

    # --- Data -------------------------------------------------------------------------------
    resolution: int | None = setting(
        None, "Training resolution in pixels (images are resized, then cropped square); a "
              "multiple of 8 (16 for SD 3.x and FLUX.1; default: the family's: 512 for SD "
              "1.x/2.x, 1024 for SDXL, SD 3.x and FLUX.1)", ge=64, le=2048)
    center_crop: bool = setting(
        False, "Crop the centre of each image; otherwise a random square crop, fixed per image "
               "by the seed")
    flip_p: float = setting(
        0.0, "Probability of training on an image mirrored left-right (0 for faces and text, "
             "which are not symmetric)", ge=0.0, le=1.0)
    aspect_buckets: bool = setting(
        False, "Train each photo at its own aspect ratio, in buckets of about resolution² "
               "pixels (sides multiples of 64), instead of cropping it square; class images "
               "stay square")
    pad_tokens: bool = setting(
        False, "Pad every prompt to the tokenizer's full length (77) instead of to the longest "
               "prompt in the batch")

    # --- Training length and batch ----------------------------------------------------------
    train_batch_size: int = setting(
        1, "Instance images per step (as many class images are added)", ge=1, le=64)
    sample_batch_size: int = setting(
        4, "Images generated at once, for class images and samples", ge=1, le=64)
    num_train_epochs: int = setting(
        1, "Passes over the data; used only when max_train_steps is 0", ge=1, le=100000)
    max_train_steps: int | None = setting(
        None, "Optimizer steps to train; overrides num_train_epochs (0 = train for "
              "num_train_epochs; default: the family's: 2000 for SD 1.x/2.x/XL, 1000 for "
              "SD 3.x and FLUX.1)", ge=0, le=1000000)
    gradient_accumulation_steps: int = setting(
        1, "Batches whose gradients are averaged into each optimizer step", ge=1, le=1024)
    gradient_checkpointing: bool = setting(
        False, "Recompute activations in the backward pass: less memory, about 30% slower")

    # --- Model and optimizer ----------------------------------------------------------------
    base_checkpoint: str | None = setting(
        None, "A single-file .safetensors checkpoint to fine-tune (e.g. a community fine-tune "
              "of the base model); it must be of the base model's family, whose configs and "
              "tokenizer it uses")
    train_text_encoder: bool = setting(True, "Fine-tune the text encoder as well as the UNet")
    learning_rate: float | None = setting(
        None, "Learning rate before scale_lr (default: the family's: 1e-6 for a full fine-tune "
              "of SD 1.x/2.x/XL, 1e-5 for SD 3.x and FLUX.1; 1e-4 for any LoRA)",
        ge=0.0, le=1.0)
    text_encoder_lr: float | None = setting(
        None, "Learning rate of the text encoder (default: learning_rate)", ge=0.0, le=1.0)
    text_encoder_steps: int = setting(
        0, "Train the text encoder for the first N steps only, then freeze it (0 = every step)",
        ge=0, le=1000000)
    scale_lr: bool = setting(
        False, "Multiply the learning rate by train_batch_size x gradient_accumulation_steps")
    lr_scheduler: str = setting(
        "constant", "Learning-rate schedule", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = setting(
        0, "Steps of linear warm-up at the start of the schedule (with 'constant' too)",
        ge=0, le=1000000)
    lr_num_cycles: int = setting(
        1, "Hard restarts of the cosine_with_restarts schedule", ge=1, le=1000)
    lr_power: float = setting(1.0, "Power of the polynomial schedule", ge=0.0, le=10.0)
    use_8bit_adam: bool = setting(
        False, "8-bit AdamW from bitsandbytes: optimizer state in a quarter of the memory")
    adam_beta1: float = setting(0.9, "AdamW beta1", ge=0.0, le=1.0)
    adam_beta2: float = setting(0.999, "AdamW beta2", ge=0.0, le=1.0)
    adam_weight_decay: float = setting(0.01, "AdamW weight decay", ge=0.0, le=1.0)
    adam_epsilon: float = setting(1e-8, "AdamW epsilon", ge=0.0, le=1.0)
    max_grad_norm: float = setting(
        1.0, "Clip the gradient norm to this value (0 = no clipping)", ge=0.0, le=1000.0)
    offset_noise: float = setting(
        0.0, "Offset noise: a per-channel constant added to the noise, so the model can learn "
             "very dark and very bright images (0.05-0.1 is usual; 0 = off)", ge=0.0, le=1.0)
    snr_gamma: float = setting(
        0.0, "Min-SNR loss weighting with this gamma (5 is the paper's value; 0 = off): "
             "down-weights the easy low-noise timesteps", ge=0.0, le=1000.0)
    use_ema: bool = setting(
        False, "Export an exponential moving average of the UNet weights (smoother; holds a "
               "second copy of the UNet in memory)")
    ema_decay: float = setting(
        0.9999, "Decay of the EMA (warmed up as (1+n)/(10+n) over the first steps)",
        ge=0.0, le=1.0)
    mixed_precision: str = setting(
        "auto", "Precision of the forward pass on GPU: auto (bf16 where supported, else fp16), "
                "fp16, bf16 or no; always fp32 on CPU", choices=MIXED_PRECISION)
    seed: int = setting(1337, "Seed for everything random: the same seed gives the same weights",
                        ge=0, le=2**32 - 1)

    # --- LoRA -------------------------------------------------------------------------------
    use_lora: bool = setting(
        False, "Train LoRA adapters instead of every weight: a file of a few MB, less memory "
               "(the text encoder gets adapters too when train_text_encoder)")
    lora_rank: int = setting(16, "Rank of the LoRA adapters", ge=1, le=1024)
    lora_alpha: float = setting(
        16.0, "LoRA alpha: the adapters' output is scaled by lora_alpha / lora_rank",
        ge=0.0, le=10000.0)
    quantize_base: str = setting(
        "no", "With use_lora: hold the frozen denoiser's block weights in 4 bits (nf4, "
              "bitsandbytes; QLoRA), a quarter of bf16's memory: FLUX.1's 22 GiB become about "
              "6.6, for 24 GB cards. Writes the LoRA only (output_format lora)",
        choices=QUANTIZE_CHOICES)

    fsdp: bool = setting(
        False, "With several processes (GPUs): shard the weights that train, their gradients and "
               "AdamW's state across them (torch's FSDP) instead of a whole copy in each, for a "
               "full fine-tune too large for one GPU (FLUX.1: 12 B parameters, about 180 GiB "
               "with AdamW: about 23 GiB a GPU on 8). Not with use_lora, use_ema, fp16, "
               "sample_every or evaluate with checkpoints yet")

    # --- Output -----------------------------------------------------------------------------
    output_format: str = setting(
        "auto", "What to write: diffusers (a folder diffusers loads), single_file (one "
                ".safetensors that AUTOMATIC1111 and ComfyUI load; for SD 3.x and FLUX the "
                "transformer alone, in its original layout), lora (LoRA files, in diffusers' "
                "and the kohya/webui layout); auto = diffusers, or lora with use_lora",
        choices=OUTPUT_FORMATS)
    save_precision: str = setting("fp16", "Precision of the saved weights",
                                  choices=SAVE_PRECISIONS)
    extract_lora: int = setting(
        0, "Also write a LoRA of this rank extracted from the full fine-tune (0 = none)",
        ge=0, le=1024)

    # --- Checkpoints and samples during training --------------------------------------------
    sample_every: int = setting(
        0, "Also render the sample images every N steps, into samples/step-N/ (0 = only at "
           "the end; needs save_sample_prompt)", ge=0, le=1000000)
    resume: str | None = setting(
        None, "Resume an interrupted run from a checkpoint: a checkpoint folder (or the folder "
              "of checkpoints: the latest one is taken), or a tarball of one")
    checkpointing_steps: int = setting(
        0, "Save the full training state every N steps, so that a run can be resumed (0 = "
           "never)", ge=0, le=1000000, cog=False)
    checkpoints_total_limit: int = setting(
        2, "Keep only the latest N checkpoints (0 = keep all)", ge=0, le=100000, cog=False)
    checkpoint_dir: str | None = setting(
        None, "Folder of checkpoints (default: next to output, named after it with "
              "-checkpoints)", cog=False)

    # --- Evaluation (train/evaluate.py) -----------------------------------------------------
    evaluate: bool = setting(
        False, "Score the trained model as the DreamBooth paper does (DINO, CLIP-I, CLIP-T, PRES, "
               "DIV on its 25 prompts, with the sample settings) and add evaluation.json and "
               "contact_sheet.png; each checkpoint is scored too and the best balanced one "
               "named. Needs the feature models of script/download-weights --eval")
    eval_prompts: str | None = setting(
        None, "Your own evaluation prompts, one a line, identifier included (default: the "
              "paper's 25 for the subject's kind)")
    eval_images_per_prompt: int = setting(
        4, "Images rendered per evaluation prompt (the paper: 4)", ge=1, le=64)
    eval_dino: str = setting(
        DEFAULT_DINO, "DINO ViT-S/16 folder for the evaluation (or a built-in: tiny, random)",
        cog=False)
    eval_clip: str = setting(
        DEFAULT_CLIP, "CLIP folder for the evaluation (or a built-in: tiny, random)", cog=False)

    # --- Progress ---------------------------------------------------------------------------
    log_every: int = setting(
        0, "Print a progress line every this many steps (0 = about 50 lines per run)",
        ge=0, le=1000000)

    # --- CLI and Python API only (Cog gets these from its environment) ----------------------
    max_archive_files: int = setting(
        10000, "Most files an archive may hold", ge=1, le=10**7, cog=False)
    max_archive_mib: int = setting(
        4096, "Most MiB an archive may expand to", ge=1, le=10**7, cog=False)
    max_compression_ratio: float = setting(
        200.0, "Most times an archive may expand (more is refused as a bomb)", ge=1.0,
        le=10**6, cog=False)
    max_image_megapixels: int = setting(
        100, "Largest image accepted, in megapixels (read from its header, before decoding)",
        ge=1, le=170, cog=False)  # Pillow itself refuses more than 179 Mpx
    max_concepts: int = setting(
        100, "Most subjects one run may train (concepts); each reads its folder of the archive",
        ge=1, le=10000, cog=False)
    model: str = setting(
        "weights", "Base model: a diffusers folder (SD 1.x/2.x/XL, SD 3/3.5, FLUX.1, FLUX.2 "
                   "[klein]), a single-file .safetensors checkpoint (its configs and tokenizer "
                   "come from weights/), a built-in name (tiny, tiny-sd2, tiny-sdxl, tiny-sd3, "
                   "tiny-flux, tiny-flux2, random-sd15, random-sd35-large, random-flux-dev, "
                   "random-flux2-klein) or toy (pretrained on the toy world of shapes, "
                   "QUALITY.md); Cog reads BASE_MODEL", cog=False)
    output: str | None = setting(None, "Path of the output tarball (.tar)", cog=False)
    work_dir: str | None = setting(
        None, "Folder in which a temporary work folder is made and removed at the end "
              "(default: the system's temporary folder)",
        cog=False)
    verbose: bool = setting(
        False, "Also show other libraries' notices and warnings (DREAMBOOTH_VERBOSE=1 does the "
               "same); by default a run prints only its own lines and real warnings", cog=False)

    def __post_init__(self):
        if isinstance(self.output_format, str):  # "lora, diffusers" means diffusers,lora
            parts = {p.strip() for p in self.output_format.split(",")}
            order = ["auto", "diffusers", "single_file", "lora"]
            if parts <= set(order):
                self.output_format = ",".join(p for p in order if p in parts)
        coerce(self)
        for name in PROMPTS:
            check_prompt(name, getattr(self, name))
        check_prompts("eval_prompts", self.eval_prompt_list() or [], " (the paper uses 25)")
        check_prompts("prior_prompts", lines(self.prior_prompts))
        if not self.instance_data:
            raise UserError("instance_data is required: a ZIP (or folder) of 3-20 photos of the "
                            "subject")
        if not self.instance_prompt.strip():
            raise UserError("instance_prompt is empty: give a prompt that names the subject, "
                            "e.g. 'a photo of sks dog'")
        if self.with_prior_preservation:
            concepts = concepts_of(self)
            for concept in concepts:
                if not (concept.class_prompt or "").strip():
                    raise UserError("class_prompt is needed with prior preservation: give one, "
                                    "e.g. 'a photo of a dog', or set with_prior_preservation to "
                                    "false")
            if self.prior_source == "base_model" and self.class_data:
                raise UserError("class_data is not used with prior_source base_model, which "
                                "needs no class images: leave class_data out, or set "
                                "prior_source to class_images")
            if self.prior_source == "class_images+base_model" and not any(
                    concept.prior_prompts for concept in concepts):
                raise UserError("prior_source class_images+base_model keeps the class in the "
                                "contexts of prior_prompts: give prior_prompts (one a line, e.g. "
                                "'a photo of a dog on the beach'), or set prior_source to "
                                "class_images")
            if self.num_class_images < 1 and self.class_images():
                raise UserError("num_class_images must be at least 1 with prior preservation, "
                                "or set with_prior_preservation to false")
        for name in ("adam_beta1", "adam_beta2"):
            if getattr(self, name) >= 1:
                raise UserError(f"{name} must be below 1 (got {getattr(self, name)}); "
                                f"0.9 and 0.999 are the usual values")
        if self.lr_scheduler == "polynomial" and self.learning_rate is not None and \
                self.learning_rate <= POLYNOMIAL_END_LR:  # every family's default is above it
            raise UserError(f"the polynomial schedule decays to {POLYNOMIAL_END_LR}: "
                            f"learning_rate must be above that (got {self.learning_rate})")
        formats = self.formats()
        if "lora" in formats and not self.use_lora and not self.extract_lora:
            raise UserError("output_format lora needs a LoRA: set use_lora to true, or "
                            "extract_lora to a rank (e.g. 64) to extract one from the full "
                            "fine-tune")
        if self.quantize_base != "no" and not self.use_lora:
            raise UserError("quantize_base holds a frozen base in 4 bits, for LoRA training: "
                            "set use_lora to true, or quantize_base to no")
        if self.quantize_base != "no" and formats != ["lora"]:
            raise UserError("quantize_base writes the LoRA only: its 4-bit base cannot take "
                            "the adapters merged in; set output_format to lora (load it on the "
                            "base model), or quantize_base to no")
        if self.fsdp:
            self.check_fsdp()
        if self.extract_lora and self.use_lora:
            raise UserError("extract_lora extracts a LoRA from a full fine-tune; with use_lora "
                            "the trained LoRA itself is written: set extract_lora to 0")
        if self.sample_every and not self.save_sample_prompt:
            raise UserError("sample_every renders the sample prompt: set save_sample_prompt too")
        try:
            ImageColor.getrgb(self.alpha_background)
        except ValueError:
            raise UserError(f"alpha_background {self.alpha_background!r} is not a colour: give "
                            f"a name such as white or a hex code such as #808080") from None
        if self.eval_prompts is not None and not self.eval_prompt_list():
            raise UserError("eval_prompts holds no prompt: give one a line, or leave it unset "
                            "for the paper's 25")
        if self.resolution is not None and self.resolution % 8:
            raise UserError(f"resolution must be a multiple of 8 (got {self.resolution}); "
                            f"try {self.resolution // 8 * 8}")

    def check_fsdp(self) -> None:
        """Refuse what a sharded run does not take (yet)."""
        if self.use_lora:
            raise UserError("fsdp shards a full fine-tune; a LoRA's adapters fit one GPU (several "
                            "processes still share its batches): set fsdp to false")
        if self.use_ema:
            raise UserError("use_ema keeps a whole copy of the weights, which fsdp shards: set "
                            "use_ema or fsdp to false")
        if self.mixed_precision == "fp16":
            raise UserError("fsdp trains in bf16 or fp32, not fp16 (its loss scaling is not "
                            "sharded): set mixed_precision to bf16 or auto")
        if self.sample_every:
            raise UserError("sample_every renders from the model mid-run, which fsdp holds in "
                            "shards: set sample_every to 0 (samples are rendered at the end)")
        if self.evaluate and self.checkpointing_steps:
            raise UserError("evaluate scores each checkpoint from the model mid-run, which fsdp "
                            "holds in shards: set checkpointing_steps to 0 (the end is scored), "
                            "or evaluate to false")

    def class_images(self) -> bool:
        """Whether the run trains on class images (prior preservation from class images)."""
        return self.with_prior_preservation and self.prior_source != "base_model"

    def base_model_prior(self) -> bool:
        """Whether prior preservation's targets include the base model's own predictions: on
        the photos' noisy latents (base_model) or on the class images' (class_images+base_model)."""
        return self.with_prior_preservation and self.prior_source != "class_images"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def model_source(self) -> tuple[str, str | None, str]:
        """(the model to load, the diffusers folder giving a single file its configs, the
        setting that names it)."""
        if self.base_checkpoint:
            return self.base_checkpoint, self.model, "base_checkpoint"
        if self.model.lower().endswith(".safetensors"):
            return self.model, "weights", "model"
        return self.model, None, "model"

    def eval_prompt_list(self) -> list[str] | None:
        """The user's evaluation prompts (None: the paper's)."""
        if self.eval_prompts is None:
            return None
        return lines(self.eval_prompts)

    def formats(self) -> list[str]:
        """The output formats to write, "auto" resolved."""
        if self.output_format == "auto":
            formats = ["lora"] if self.use_lora else ["diffusers"]
        else:
            formats = self.output_format.split(",")
        return formats + ["lora"] if self.extract_lora and "lora" not in formats else formats


def lines(text: str | None) -> list[str]:
    """The non-empty lines of a text setting, stripped."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


@dataclass
class Concept:
    """One subject: its prompts and where its images are. Folders are inside the archives;
    "" is the whole archive, None (for class_folder) none at all."""
    instance_prompt: str
    class_prompt: str | None
    folder: str
    class_folder: str | None
    num_class_images: int
    prior_prompts: tuple[str, ...] = ()  # the class in other contexts (prior_prompts)


CONCEPT_KEYS = {"instance_prompt", "class_prompt", "instance_data", "class_data",
                "num_class_images", "prior_prompts"}


def concepts_of(config: TrainConfig) -> list[Concept]:
    """The subjects of a run: the `concepts` list, or the single concept of the plain inputs."""
    default_class = "" if config.class_data else None
    if not config.concepts:
        return [Concept(config.instance_prompt, config.class_prompt, "", default_class,
                        config.num_class_images, tuple(lines(config.prior_prompts)))]
    try:
        items = json.loads(config.concepts)
    except (json.JSONDecodeError, RecursionError) as e:
        raise UserError(f"concepts is not valid JSON ({str(e)[:200]})") from None
    if not isinstance(items, list) or not items or not all(isinstance(i, dict) for i in items):
        raise UserError('concepts must be a JSON list of objects, e.g. [{"instance_prompt": '
                        '"a photo of sks dog", "instance_data": "dog"}]')
    if len(items) > config.max_concepts:
        raise UserError(f"concepts lists {len(items)} subjects; at most {config.max_concepts} "
                        f"train in one run (max_concepts): split them over several runs")
    concepts = []
    for n, item in enumerate(items, 1):
        unknown = sorted(set(item) - CONCEPT_KEYS)
        if unknown:
            raise UserError(f"concept {n}: unknown key {unknown[0]!r}; use "
                            f"{', '.join(sorted(CONCEPT_KEYS))}")
        folder = item.get("instance_data")
        if not isinstance(folder, str) or not folder.strip("./"):
            raise UserError(f"concept {n}: instance_data must name a folder inside the "
                            f"instance_data archive, e.g. \"dog\"")
        class_folder = item.get("class_data")
        if class_folder is not None and not isinstance(class_folder, str):
            raise UserError(f"concept {n}: class_data must name a folder inside the class_data "
                            f"archive")
        if class_folder is not None and not config.class_data:
            raise UserError(f"concept {n}: class_data names a folder, but no class_data archive "
                            f"was given")
        prompt = item.get("instance_prompt", config.instance_prompt)
        class_prompt = item.get("class_prompt", config.class_prompt)
        count = item.get("num_class_images", config.num_class_images)
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError(f"concept {n}: instance_prompt must be non-empty text")
        if class_prompt is not None and not isinstance(class_prompt, str):
            raise UserError(f"concept {n}: class_prompt must be text")
        check_prompt(f"concept {n}: instance_prompt", prompt)
        check_prompt(f"concept {n}: class_prompt", class_prompt)
        if isinstance(count, bool) or not isinstance(count, int) or \
                not 0 <= count <= MAX_CLASS_IMAGES:
            raise UserError(f"concept {n}: num_class_images must be a whole number from 0 to "
                            f"{MAX_CLASS_IMAGES}")
        prior = item.get("prior_prompts", lines(config.prior_prompts))
        if not isinstance(prior, list) or not all(isinstance(p, str) for p in prior):
            raise UserError(f"concept {n}: prior_prompts must be a list of at most "
                            f"{MAX_EVAL_PROMPTS} prompts")
        check_prompts(f"concept {n}: prior_prompts", prior, unit="item")
        concepts.append(Concept(prompt, class_prompt, _folder(folder),
                                None if class_folder is None else _folder(str(class_folder)),
                                count, tuple(p.strip() for p in prior if p.strip())))
    wanted = sum(c.num_class_images for c in concepts)
    if wanted > MAX_CLASS_IMAGES:
        raise UserError(f"concepts ask for {wanted} class images in all; at most "
                        f"{MAX_CLASS_IMAGES} (as num_class_images alone): ask fewer per concept")
    return concepts


def check_prompt(name: str, prompt: str | None) -> None:
    if prompt is not None and len(prompt) > MAX_PROMPT_CHARS:
        raise UserError(f"{name} is {len(prompt)} characters long; at most {MAX_PROMPT_CHARS} "
                        f"(the text encoder reads only its first 77 tokens, about 300 "
                        f"characters)")


def check_prompts(name: str, prompts: list[str], note: str = "", unit: str = "line") -> None:
    """A list of prompts: at most MAX_EVAL_PROMPTS, each within MAX_PROMPT_CHARS."""
    if len(prompts) > MAX_EVAL_PROMPTS:
        raise UserError(f"{name} holds {len(prompts)} prompts; at most {MAX_EVAL_PROMPTS}{note}")
    for n, prompt in enumerate(prompts, 1):
        check_prompt(f"{name} {unit} {n}", prompt)


def _folder(name: str) -> str:
    return name.strip().removeprefix("./").strip("/")


def coerce(settings) -> None:
    """Check every field of a settings dataclass (TrainConfig, GenerateConfig) against its type,
    bounds and choices, coercing where lossless (3 -> 3.0); a UserError names the first wrong
    one. Text is bounded before anything parses it."""
    hints = typing.get_type_hints(type(settings))
    for f in dataclasses.fields(settings):
        value = _checked(f, hints[f.name], getattr(settings, f.name))
        if isinstance(value, str) and len(value) > MAX_TEXT_CHARS:
            raise UserError(f"{f.name} is {len(value)} characters long; at most "
                            f"{MAX_TEXT_CHARS} are read")
        setattr(settings, f.name, value)


def _checked(f: dataclasses.Field, hint, value):
    """Coerce a value to its field's type where it is lossless, else raise a UserError."""
    optional = type(None) in typing.get_args(hint)
    base = next(t for t in typing.get_args(hint) if t is not type(None)) if optional else hint
    if value is None:
        if optional:
            return None
        raise UserError(f"{f.name} is required")
    if base is bool:
        if not isinstance(value, bool):
            raise UserError(f"{f.name} must be true or false (got {value!r})")
    elif base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{f.name} must be a whole number (got {value!r})")
    elif base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{f.name} must be a number (got {value!r})")
        value = float(value)
        if not math.isfinite(value):
            raise UserError(f"{f.name} must be a finite number (got {value!r})")
    elif base is str:
        if not isinstance(value, str):
            raise UserError(f"{f.name} must be text (got {value!r})")
    meta = f.metadata
    if meta["choices"] is not None and value not in meta["choices"]:
        raise UserError(f"{f.name} must be one of {', '.join(meta['choices'])} (got {value!r})")
    if meta["ge"] is not None and value < meta["ge"]:
        raise UserError(f"{f.name} must be at least {meta['ge']} (got {value})")
    if meta["le"] is not None and value > meta["le"]:
        raise UserError(f"{f.name} must be at most {meta['le']} (got {value})")
    return value


def fields(settings: type = None) -> list[dataclasses.Field]:
    """The fields of a settings dataclass (default TrainConfig) in declaration order: what the
    CLI and the Cog predictors derive from."""
    return list(dataclasses.fields(settings or TrainConfig))


def field_type(f: dataclasses.Field, settings: type = None) -> type:
    """The plain type of a field: str, int, float or bool (Optional unwrapped)."""
    hint = typing.get_type_hints(settings or TrainConfig)[f.name]
    args = [t for t in typing.get_args(hint) if t is not type(None)]
    return args[0] if args else hint
