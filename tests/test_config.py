"""TrainConfig, the Cog inputs and the CLI flags: one set of names, defaults, bounds and checks."""

import pytest
from cog._inspector import create_predictor

from helpers import ROOT
from train.cli import build_parser
from train import UserError, families
from train.config import TrainConfig, fields

# replicate/dreambooth's inputs with their defaults: clients send these.
REPLICATE_DEFAULTS = dict(
    class_data=None, num_class_images=50, save_sample_prompt=None,
    save_sample_negative_prompt=None, n_save_sample=4, save_guidance_scale=7.5,
    save_infer_steps=50, pad_tokens=False, with_prior_preservation=True, prior_loss_weight=1.0,
    seed=1337, resolution=512, center_crop=False, train_text_encoder=True, train_batch_size=1,
    sample_batch_size=4, num_train_epochs=1, max_train_steps=2000, gradient_accumulation_steps=1,
    gradient_checkpointing=False, learning_rate=1e-6, scale_lr=False, lr_scheduler="constant",
    lr_warmup_steps=0, use_8bit_adam=False, adam_beta1=0.9, adam_beta2=0.999,
    adam_weight_decay=0.01, adam_epsilon=1e-8, max_grad_norm=1.0)
REPLICATE_REQUIRED = ("instance_prompt", "class_prompt", "instance_data")


def valid(**overrides):
    base = dict(instance_data="x.zip", instance_prompt="a photo of sks dog",
                class_prompt="a photo of a dog")
    return TrainConfig(**{**base, **overrides})


def test_replicate_defaults_kept():
    """A client of replicate/dreambooth that leaves a setting out gets its default on SD 1.x:
    some settings are unset (None) until the base model's family fills them in."""
    config, taken = families.settle(valid(), "sd1")
    for name, default in REPLICATE_DEFAULTS.items():
        assert getattr(config, name) == default, name
    assert set(taken) == {"resolution", "max_train_steps", "learning_rate",
                          "save_guidance_scale", "class_guidance_scale"}
    assert families.settle(valid(use_lora=True), "sd1")[0].learning_rate == 1e-4
    assert len(REPLICATE_DEFAULTS) + len(REPLICATE_REQUIRED) == 33


@pytest.mark.parametrize("kind, resolution", [("sd2", 512), ("sdxl", 1024), ("sd3", 1024),
                                              ("flux", 1024)])
def test_each_family_fills_in_what_is_left_unset(kind, resolution):
    config, taken = families.settle(valid(), kind)
    table = families.get(kind).DEFAULTS
    assert config.resolution == resolution
    assert (config.max_train_steps, config.learning_rate) == (table["max_train_steps"],
                                                             table["learning_rate"])
    assert config.class_guidance_scale == config.save_guidance_scale == table["guidance_scale"]
    assert taken["resolution"] == resolution
    # What the user gives is kept, and not reported as a default.
    given, taken = families.settle(valid(resolution=768, save_guidance_scale=2.0,
                                         max_train_steps=0, use_lora=True), kind)
    assert (given.resolution, given.save_guidance_scale, given.max_train_steps) == (768, 2.0, 0)
    assert given.class_guidance_scale == table["guidance_scale"]
    assert given.learning_rate == table["lora_learning_rate"]
    assert {"resolution", "save_guidance_scale", "max_train_steps"}.isdisjoint(taken)


def test_cog_inputs_derive_from_config():
    inputs = create_predictor("predict", "Predictor").inputs
    cog_fields = {f.name: f for f in fields() if f.metadata["cog"]}
    assert set(inputs) == set(cog_fields)
    assert set(REPLICATE_DEFAULTS) | set(REPLICATE_REQUIRED) <= set(inputs)
    for name, f in cog_fields.items():
        field = inputs[name]
        if name in ("instance_data", "instance_prompt"):
            assert field.default is None and field.type.repetition.name == "REQUIRED", name
            continue
        assert field.default == f.default, name
        assert field.description == f.metadata["help"], name
        assert field.choices == f.metadata["choices"], name
        for bound in ("ge", "le"):
            expected = f.metadata[bound]
            assert getattr(field, bound) == (None if expected is None else float(expected)), name


def test_cli_flags_derive_from_config():
    actions = {a.dest: a for a in build_parser()._actions if a.dest != "help"}
    assert set(actions) == {f.name for f in fields()}
    for f in fields():
        assert actions[f.name].default == f.default, f.name
        assert actions[f.name].option_strings == ["--" + f.name.replace("_", "-")]


def test_cli_booleans_take_a_value():
    args = build_parser().parse_args(["--instance-data", "a.zip", "--instance-prompt", "p",
                                      "--output", "o.tar", "--train-text-encoder", "false",
                                      "--center-crop", "true"])
    assert args.train_text_encoder is False and args.center_crop is True


@pytest.mark.parametrize("overrides, message", [
    (dict(learning_rate=-1.0), "learning_rate must be at least 0.0"),
    (dict(resolution=4096), "resolution must be at most 2048"),
    (dict(resolution=500), "resolution must be a multiple of 8"),
    (dict(lr_scheduler="exponential"), "lr_scheduler must be one of linear"),
    (dict(train_batch_size=1.5), "train_batch_size must be a whole number"),
    (dict(center_crop="yes"), "center_crop must be true or false"),
    (dict(instance_prompt="  "), "instance_prompt is empty"),
    (dict(instance_data=None), "instance_data is required"),
    (dict(class_prompt=None), "class_prompt is needed with prior preservation"),
    (dict(num_class_images=0), "num_class_images must be at least 1 with prior preservation"),
    (dict(adam_beta1=float("nan")), "adam_beta1 must be a finite number"),
    (dict(adam_beta2=1.0), "adam_beta2 must be below 1"),
    (dict(lr_scheduler="polynomial", learning_rate=0.0), "the polynomial schedule decays to"),
    # Text is bounded before anything parses it (a client can send a megabyte as easily as a word).
    (dict(instance_prompt="a photo of sks dog " * 100), "instance_prompt is 1900 characters long; "
                                                        "at most 1000"),
    (dict(save_sample_negative_prompt="x" * 1001), "save_sample_negative_prompt is 1001"),
    (dict(eval_prompts="a photo of sks dog\n" * 201),
     "eval_prompts holds 201 prompts; at most 200"),
    (dict(eval_prompts="ok\n" + "x" * 1001), "eval_prompts line 2 is 1001 characters long"),
    (dict(concepts="[" * (2 << 20)), "concepts is 2097152 characters long; at most 1048576"),
    (dict(concepts='[{"instance_data": "a", "class_prompt": "%s"}]' % ("y" * 2000)),
     "concept 1: class_prompt is 2000 characters long"),
    # What a sharded run does not take (yet), each with its way out.
    (dict(fsdp=True, use_lora=True), "fsdp shards a full fine-tune; a LoRA's adapters fit"),
    (dict(fsdp=True, use_ema=True), "use_ema keeps a whole copy of the weights"),
    (dict(fsdp=True, mixed_precision="fp16"), "fsdp trains in bf16 or fp32, not fp16"),
    (dict(fsdp=True, sample_every=5, save_sample_prompt="x"), "set sample_every to 0"),
    (dict(fsdp=True, checkpointing_steps=10, evaluate=True), "evaluate scores each checkpoint"),
])
def test_bad_values_are_refused_with_a_reason(overrides, message):
    with pytest.raises(UserError, match=message):
        valid(**overrides)


def test_prior_preservation_off_needs_no_class_prompt():
    config = valid(class_prompt=None, with_prior_preservation=False, num_class_images=0)
    assert config.class_prompt is None


def test_ints_are_accepted_for_floats():
    assert valid(prior_loss_weight=2).prior_loss_weight == 2.0


@pytest.mark.parametrize("page, settings, required", [
    ("inputs.md", "TrainConfig", ("instance_data", "instance_prompt")),
    ("generate.md", "GenerateConfig", ("prompt",)),
])
def test_docs_list_every_input_with_its_default_and_doc(page, settings, required):
    from train.config import TrainConfig
    from train.generate import GenerateConfig

    settings = {"TrainConfig": TrainConfig, "GenerateConfig": GenerateConfig}[settings]
    rows = {cells[1].strip(" `"): (cells[2].strip(" `"), cells[4].strip())
            for cells in (line.split("|") for line in (ROOT / "docs" / page)
                          .read_text().splitlines() if line.startswith("| `"))
            if len(cells) == 6}  # rows of the inputs table: | name | default | range | doc |
    cog = [f for f in fields(settings) if f.metadata["cog"]]
    assert len(rows) == len(cog)
    for f in cog:
        default = ("required" if f.name in required
                   else "none" if f.default is None
                   else str(f.default).lower() if isinstance(f.default, bool)
                   else str(f.default))
        assert rows.get(f.name) == (default, f.metadata["help"]), f.name


def test_output_formats_combine_in_any_order():
    assert valid(output_format="lora, diffusers", use_lora=True).output_format == "diffusers,lora"
    assert valid(use_lora=True).formats() == ["lora"]
    assert valid().formats() == ["diffusers"]
    assert valid(extract_lora=8, output_format="single_file").formats() == ["single_file", "lora"]
    with pytest.raises(UserError, match="output_format must be one of"):
        valid(output_format="ckpt")
    with pytest.raises(UserError, match="extract_lora extracts a LoRA from a full fine-tune"):
        valid(use_lora=True, extract_lora=4)
