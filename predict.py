"""Cog predictor: the DreamBooth trainer as a Cog model (`cog predict`, Replicate, the HTTP API).

    cog predict -i instance_data=@dog.zip -i instance_prompt="a photo of sks dog" \
        -i class_prompt="a photo of a dog"

No ML lives here: each input's default, bounds and description come from train.TrainConfig (a
test checks they agree), and predict() hands a TrainConfig to train.run, which returns the
tarball. The base model is the folder script/download-weights fills, or whatever BASE_MODEL
names (a diffusers folder or a built-in name such as `tiny`).
"""

import os
import shutil
import tempfile
from typing import Optional

from cog import BasePredictor, Input, Path

import train
from train.models import check_model
from train.config import fields

SETTINGS = {f.name: f for f in fields()}


def setting(name: str, **override):
    """A Cog Input whose description, default, bounds and choices are TrainConfig's."""
    f = SETTINGS[name]
    spec = dict(description=f.metadata["help"], default=f.default, ge=f.metadata["ge"],
                le=f.metadata["le"], choices=f.metadata["choices"])
    return Input(**{**spec, **override})


class Predictor(BasePredictor):
    def setup(self):
        """Find the base model (local files only) and a folder for outputs."""
        self.model = os.environ.get("BASE_MODEL", SETTINGS["model"].default)
        check_model(self.model)  # says to run script/download-weights when weights/ is missing
        self.outputs = tempfile.mkdtemp(prefix="dreambooth-out-")

    def predict(
        self,
        instance_prompt: str = setting("instance_prompt", default=None),
        class_prompt: Optional[str] = setting("class_prompt"),
        instance_data: Path = setting("instance_data",
                                      description="ZIP of 3-20 photos of the subject"),
        class_data: Optional[Path] = setting("class_data"),
        num_class_images: int = setting("num_class_images"),
        save_sample_prompt: Optional[str] = setting("save_sample_prompt"),
        save_sample_negative_prompt: Optional[str] = setting("save_sample_negative_prompt"),
        n_save_sample: int = setting("n_save_sample"),
        save_guidance_scale: float = setting("save_guidance_scale"),
        save_infer_steps: int = setting("save_infer_steps"),
        pad_tokens: bool = setting("pad_tokens"),
        with_prior_preservation: bool = setting("with_prior_preservation"),
        prior_loss_weight: float = setting("prior_loss_weight"),
        seed: int = setting("seed"),
        resolution: int = setting("resolution"),
        center_crop: bool = setting("center_crop"),
        train_text_encoder: bool = setting("train_text_encoder"),
        train_batch_size: int = setting("train_batch_size"),
        sample_batch_size: int = setting("sample_batch_size"),
        num_train_epochs: int = setting("num_train_epochs"),
        max_train_steps: int = setting("max_train_steps"),
        gradient_accumulation_steps: int = setting("gradient_accumulation_steps"),
        gradient_checkpointing: bool = setting("gradient_checkpointing"),
        learning_rate: Optional[float] = setting("learning_rate"),
        scale_lr: bool = setting("scale_lr"),
        lr_scheduler: str = setting("lr_scheduler"),
        lr_warmup_steps: int = setting("lr_warmup_steps"),
        use_8bit_adam: bool = setting("use_8bit_adam"),
        adam_beta1: float = setting("adam_beta1"),
        adam_beta2: float = setting("adam_beta2"),
        adam_weight_decay: float = setting("adam_weight_decay"),
        adam_epsilon: float = setting("adam_epsilon"),
        max_grad_norm: float = setting("max_grad_norm"),
        class_infer_steps: int = setting("class_infer_steps"),
        lr_num_cycles: int = setting("lr_num_cycles"),
        lr_power: float = setting("lr_power"),
        mixed_precision: str = setting("mixed_precision"),
        log_every: int = setting("log_every"),
        alpha_background: str = setting("alpha_background"),
        flip_p: float = setting("flip_p"),
        aspect_buckets: bool = setting("aspect_buckets"),
        folder_captions: bool = setting("folder_captions"),
        concepts: Optional[str] = setting("concepts"),
        text_encoder_lr: Optional[float] = setting("text_encoder_lr"),
        text_encoder_steps: int = setting("text_encoder_steps"),
        offset_noise: float = setting("offset_noise"),
        snr_gamma: float = setting("snr_gamma"),
        use_ema: bool = setting("use_ema"),
        ema_decay: float = setting("ema_decay"),
        use_lora: bool = setting("use_lora"),
        lora_rank: int = setting("lora_rank"),
        lora_alpha: float = setting("lora_alpha"),
        output_format: str = setting("output_format"),
        save_precision: str = setting("save_precision"),
        extract_lora: int = setting("extract_lora"),
        sample_every: int = setting("sample_every"),
        base_checkpoint: Optional[Path] = setting("base_checkpoint"),
        resume: Optional[Path] = setting("resume"),
    ) -> Path:
        """Train DreamBooth on the photos in instance_data; returns a tarball of weights."""
        inputs = {name: value for name, value in locals().items() if name in SETTINGS}
        inputs["instance_data"] = str(instance_data)
        for name in ("class_data", "base_checkpoint", "resume"):  # optional files
            inputs[name] = str(inputs[name]) if inputs[name] else None
        # Only the latest output is kept: the previous one has been delivered by now.
        shutil.rmtree(self.outputs, ignore_errors=True)
        os.makedirs(self.outputs)
        output = os.path.join(self.outputs, "dreambooth-weights.tar")
        config = train.TrainConfig(**inputs, model=self.model, output=output)
        return Path(train.run(config))
