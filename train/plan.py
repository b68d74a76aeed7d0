"""The plan of a run, worked out from the settings and the photos before anything slow starts: how
many steps, at what learning rate, on how many images; and the summary a person reads first.

    plan = make_plan(config, concepts, instance, processes=1)
    for line in dataset_summary(config, intake, plan): print(line)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .config import Concept, TrainConfig
from .data import steps_per_epoch
from .intake import prompt_words


@dataclass
class Plan:
    """What the run will do; training.json records it as it is."""
    processes: int
    effective_batch: int       # pairs per optimizer step, over every process and accumulation
    steps: int
    steps_per_epoch: int
    epochs: float
    instance_images: int
    class_images: int          # wanted, over every concept (0 without class images)
    concepts: list[dict]
    learning_rate: float       # after scale_lr
    text_encoder_lr: float
    lr_scheduler: str          # the diffusers schedule that does what lr_scheduler says
    log_every: int


def make_plan(config: TrainConfig, concepts: list[Concept], instance: list,
              processes: int = 1) -> Plan:
    """Resolve training length and learning rate. `max_train_steps` wins when it is set;
    0 means train for `num_train_epochs` epochs. An epoch pairs each concept's instance images
    with its class images: max(instances, class images) pairs per concept. Each optimizer step
    takes train_batch_size pairs in each of `processes` processes, gradient_accumulation_steps
    times: that product is the effective batch (and scale_lr's factor)."""
    prior = config.class_images()
    counts = [(sum(ex.concept == k for ex in instance), c.num_class_images if prior else 0)
              for k, c in enumerate(concepts)]
    pairs = sum(max(n_inst, n_cls) for n_inst, n_cls in counts)
    per_epoch = steps_per_epoch(pairs, config.train_batch_size * processes,
                                config.gradient_accumulation_steps)
    steps = config.max_train_steps or config.num_train_epochs * per_epoch
    scale = config.train_batch_size * config.gradient_accumulation_steps * processes
    return Plan(
        processes=processes,
        effective_batch=scale,
        steps=steps,
        steps_per_epoch=per_epoch,
        epochs=round(steps / per_epoch, 3),
        instance_images=len(instance),
        class_images=sum(n_cls for _, n_cls in counts),
        concepts=[dataclasses.asdict(c) for c in concepts],
        learning_rate=config.learning_rate * (scale if config.scale_lr else 1),
        text_encoder_lr=(config.learning_rate if config.text_encoder_lr is None
                         else config.text_encoder_lr) * (scale if config.scale_lr else 1),
        # diffusers' "constant" ignores warm-up; lr_warmup_steps should do what it says.
        lr_scheduler=("constant_with_warmup" if config.lr_scheduler == "constant"
                      and config.lr_warmup_steps else config.lr_scheduler),
        log_every=config.log_every or max(1, math.ceil(steps / 50)),
    )


def dataset_summary(config: TrainConfig, intake, plan: Plan) -> list[str]:
    """Lines that tell a person what is about to be trained on, before anything slow starts.
    `intake` is recipe.Intake: the images used and skipped, and the class images to generate."""
    concepts, instance, classes = intake.concepts, intake.instance, intake.classes
    lines = [f"dataset: {len(instance)} instance images, {len(intake.instance_skipped)} files "
             f"skipped" + (f", {len(concepts)} concepts" if len(concepts) > 1 else "")]
    for ex in instance:
        notes = "".join(f"  [{note}]" for note in ex.notes)
        lines.append(f"  use   {ex.file}  {ex.size[0]}x{ex.size[1]}  \"{ex.caption}\"{notes}")
    for s in intake.instance_skipped:
        lines.append(f"  skip  {s['file']}  ({s['reason']})")
    for k, concept in enumerate(concepts):
        if not config.with_prior_preservation:
            lines.append("class images: none (prior preservation off)")
            break
        contexts = (f" and {len(concept.prior_prompts)} prior_prompts"
                    if concept.prior_prompts else "")
        if config.prior_source == "base_model":
            lines.append(f"prior: the base model's own predictions for \"{concept.class_prompt}"
                         f"\" (in each photo's caption){contexts}; no class images")
            continue
        have = sum(ex.concept == k for ex in classes)
        both = config.prior_source == "class_images+base_model"
        lines.append(f"class images: {concept.num_class_images} \"{concept.class_prompt}\""
                     f"{'' if both else contexts} ({have} from class_data, "
                     f"{intake.to_generate[k]} to generate)")
        if both and concept.prior_prompts:
            lines.append(f"prior: each class image also kept under one of "
                         f"{len(concept.prior_prompts)} prior_prompts by the base model's "
                         f"own predictions (weight {config.context_loss_weight:g}, class images "
                         f"{config.prior_loss_weight:g})")
    for s in intake.class_skipped:
        lines.append(f"  skip  {s['file']}  ({s['reason']})")
    by = ("max_train_steps" if config.max_train_steps
          else f"num_train_epochs={config.num_train_epochs}")
    lines.append(f"plan: {plan.steps} steps ({plan.epochs} epochs of "
                 f"{plan.steps_per_epoch} steps, set by {by}), batch "
                 f"{config.train_batch_size} x {config.gradient_accumulation_steps} accumulation"
                 + (f" x {plan.processes} processes" if plan.processes > 1 else "")
                 + f", "
                 f"lr {plan.learning_rate:.1e} {plan.lr_scheduler}, text encoder "
                 f"{'trained' if config.train_text_encoder else 'frozen'}")
    for concept in concepts:
        noun = prompt_words(concept.instance_prompt, concept.class_prompt)[1]
        if concept.class_prompt and noun.lower() not in concept.instance_prompt.lower().split():
            lines.append(f"warning: instance_prompt \"{concept.instance_prompt}\" does not name "
                         f"the class \"{noun}\"; a prompt such as \"a photo of sks {noun}\" "
                         f"ties the identifier to the class, and usually learns faster and "
                         f"drifts less")
    if config.max_train_steps and config.num_train_epochs != 1:
        lines.append(f"warning: num_train_epochs={config.num_train_epochs} is overridden by "
                     f"max_train_steps={config.max_train_steps}; set max_train_steps to 0 to "
                     f"train by epochs")
    return lines
