"""The benchmark harness behind BENCHMARKS.md runs and reports sane figures (smoke runs, not
timed), and its FLOP count agrees with one made independently from the layers' shapes.

    .venv/bin/python -m pytest tests/test_bench.py
"""

import pytest
import torch

from bench.speed import measure


def test_bench_scenario_reports_step_time_memory_and_overhead():
    result = measure(64, False, steps=10)
    assert 0 < result["forward_backward_s"] and 0 < result["step_s"] < 60
    assert 0 <= result["outside_share"] < 1
    assert result["peak_rss_mib"] > 100


def test_intake_bench_reads_every_photo():
    from bench.speed import measure_intake

    result = measure_intake(count=3, width=800, height=600, resolution=64)
    assert result["images"] == 3 and result["intake_s"] > 0 and result["full_decode_s"] > 0


def hook_flops(unet, text_encoder, latents, states_or_ids) -> int:
    """FLOPs of a UNet forward and backward (with the text encoder's, if given: then token ids
    are passed), counted from each layer's shapes, independently of torch's flop counter:
    2·MACs for every Linear and Conv2d, 4·B·Lq·Lk·C for attention; a backward pass costs the
    forward again for each of the weight and the input that need a gradient, attention twice."""
    import torch
    from diffusers.models.attention_processor import Attention

    total, handles = [0], []

    def layer(module, inputs, output):
        x = inputs[0]
        if isinstance(module, torch.nn.Linear):
            flops = 2 * x.numel() // x.shape[-1] * module.in_features * module.out_features
        else:
            k = module.kernel_size
            flops = 2 * output.numel() * module.in_channels // module.groups * k[0] * k[1]
        total[0] += flops * (1 + module.weight.requires_grad + x.requires_grad)

    def attention(module, q_name, k_name):
        q_shape = {}
        handles.append(getattr(module, q_name).register_forward_hook(
            lambda m, i, o: q_shape.update(q=o.shape)))

        def on_k(m, i, o):
            batch, keys, channels = o.shape
            total[0] += 3 * 4 * batch * q_shape["q"][1] * keys * channels

        handles.append(getattr(module, k_name).register_forward_hook(on_k))

    models = [unet] + ([text_encoder] if text_encoder is not None else [])
    for model in models:
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                handles.append(module.register_forward_hook(layer))
            if isinstance(module, Attention):
                attention(module, "to_q", "to_k")
            elif hasattr(module, "q_proj") and hasattr(module, "k_proj"):  # CLIP attention
                attention(module, "q_proj", "k_proj")
    states = text_encoder(states_or_ids)[0] if text_encoder is not None else states_or_ids
    pred = unet(latents, torch.tensor([100, 700]), states).sample
    torch.nn.functional.mse_loss(pred, latents).backward()
    for handle in handles:
        handle.remove()
    return total[0]


def tiny_step_flops(train_text_encoder: bool) -> int:
    """The independent count for a `tiny` scenario step: 64 px, one instance and one class
    image, prompts padded to the longer one."""
    import torch

    from bench.speed import SCENARIO_BASE
    from train.models import build_builtin

    pipe = build_builtin("tiny")
    unet, text_encoder = pipe.unet.train().requires_grad_(True), pipe.text_encoder
    text_encoder.requires_grad_(train_text_encoder)
    ids = pipe.tokenizer([SCENARIO_BASE["instance_prompt"], SCENARIO_BASE["class_prompt"]],
                         padding="longest", return_tensors="pt").input_ids
    latents = torch.randn(2, 4, 8, 8)
    if train_text_encoder:
        return hook_flops(unet, text_encoder, latents, ids)
    return hook_flops(unet, None, latents, text_encoder(ids)[0].detach())


def test_step_flops_equal_an_independent_count(tmp_path):
    from bench.speed import scenario_config, step_flops

    for name, text in (("tiny", False), ("tiny-text-encoder", True)):
        (tmp_path / name).mkdir()
        config = scenario_config(name, tmp_path / name)
        assert step_flops(config) == tiny_step_flops(text)
    # SD 1.5 at 512 px, batch 1 with prior preservation: about 4.8 TFLOP a step.
    (tmp_path / "sd15").mkdir()
    assert 4.7e12 < step_flops(scenario_config("sd15-bf16", tmp_path / "sd15")) < 4.9e12


def test_named_scenarios_run_and_report_sane_figures(tmp_path, capsys):
    """The harness end to end, as CI runs it: `tiny` in a child process, and a GPU scenario,
    which without CUDA is skipped with a clear line."""
    import json

    import torch

    from bench.speed import PHASES, main

    gpu = torch.cuda.is_available()
    names = ["tiny"] + ([] if gpu else ["sd15-bf16"])
    main([a for n in names for a in ("--scenario", n)]
         + ["--steps", "6", "--class-images", "2", "--json", str(tmp_path / "bench.json")])
    printed = capsys.readouterr().out
    rows = {row["scenario"]: row for row in json.loads((tmp_path / "bench.json").read_text())}
    tiny = rows["tiny"]
    assert tiny["steps"] == 6 and 0 < tiny["step_s"] < 30
    assert abs(tiny["steps_per_s"] * tiny["step_s"] - 1) < 0.01
    assert tiny["peak_mib"] > 100
    assert tiny["flops_per_step"] == tiny_step_flops(False)
    assert tiny["tflops"] == pytest.approx(tiny["flops_per_step"] / tiny["step_s"] / 1e12,
                                           rel=0.01) and tiny["tflops"] > 0
    assert tiny["class_images"] == 2 and tiny["class_images_per_s"] > 0
    assert tiny["class_sampler"] == "dpm++ 25"
    assert all(tiny["phases"][p] >= 0 for p in PHASES) and tiny["phases"]["train"] > 0
    assert abs(tiny["total_s"] - sum(tiny["phases"].values())) < 0.05
    table = [line for line in printed.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(names)
    assert len({line.count("|") for line in table}) == 1  # every row has every column
    assert any(line.startswith("| tiny | cpu | ") for line in table)
    if not gpu:
        assert rows["sd15-bf16"]["skipped"] == "needs CUDA"
        assert "sd15-bf16: skipped: needs CUDA" in printed
        assert "| sd15-bf16 | skipped: needs CUDA |" in printed


def test_scenario_list_names_cpu_and_gpu_scenarios(capsys):
    from bench.speed import NAMED, main

    main(["--list"])
    printed = capsys.readouterr().out
    assert all(name in printed for name in NAMED)
    assert {device for device, _, _ in NAMED.values()} == {"cpu", "cuda"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_scenario_reports_device_memory_and_fraction_of_peak():
    """On a GPU: SD 1.5 size at 512 px in bf16, a few steps (about a minute with the export)."""
    from bench.speed import measure_scenario

    row = measure_scenario("sd15-bf16", steps=10, class_images=2)
    assert row["peak_kind"] == "cuda max_memory_allocated" and row["peak_mib"] > 3000
    assert row["mixed_precision"] == "bf16" and 0 < row["step_s"] < 10
    if row["device_peak_tflops"]:
        assert 0 < row["of_peak"] < 1


def test_sampler_bench_reports_each_sampler():
    from bench.speed import measure_samplers

    rows = measure_samplers(count=1, repeats=1, batch_size=1)
    assert [(r["sampler"], r["steps"]) for r in rows] == [("dpm++", 25), ("base", 50),
                                                          ("dpm++", 50)]
    assert all(r["images_per_s"] > 0 and r["cpu_s_per_image"] > 0 for r in rows)


def test_download_bench_times_both_downloads_of_the_whole_file():
    from bench.download import measure

    rows = measure(mib=4, rounds=1)
    assert [r["download"] for r in rows] == ["cog", "fetch"]
    assert all(r["mib_per_s"] > 0 for r in rows)


def test_generate_bench_times_the_cold_start_and_each_image(tmp_path):
    from bench.generate import measure
    from train.example_data import write_example_zip

    photos = write_example_zip(tmp_path / "photos.zip", count=3, size=64)
    row = measure("tiny", "full", images=1, size=64, steps=2, folder=tmp_path, photos=photos)
    parts = [row[k] for k in ("unpack_s", "load_s", "first_image_s", "per_image_s")]
    assert all(seconds > 0 for seconds in parts) and row["tarball_mib"] > 1
    assert abs(row["cold_s"] - sum(parts[:3])) < 1e-6


def test_predicted_memory_follows_what_trains_and_how(tmp_path):
    """On the meta device, for the flow families' tiny models: a LoRA trains a sliver of the
    weights and holds its frozen base in bf16; gradient checkpointing cuts the activations;
    frozen text encoders are parked off the GPU."""
    from bench.predict import predict, step_memory
    from bench.speed import scenario_config

    base = scenario_config("tiny", tmp_path)
    for model in ("tiny-sd3", "tiny-flux"):
        full = step_memory(base.__class__(**dict(base.to_dict(), model=model,
                                                 mixed_precision="bf16")))
        lora = step_memory(base.__class__(**dict(base.to_dict(), model=model, use_lora=True,
                                                 lora_rank=2,
                                                 mixed_precision="bf16")))
        checkpointed = step_memory(base.__class__(**dict(
            base.to_dict(), model=model, use_lora=True, lora_rank=2, mixed_precision="bf16",
            gradient_checkpointing=True)))
        assert full["frozen"] == 0 and 0 < lora["trainable"] < full["trainable"] / 4
        # fp32 master weights against a bf16 frozen base plus fp32 adapters
        assert lora["weights"] < 0.6 * full["weights"]
        assert lora["optimizer"] < full["optimizer"] and full["text_encoders"] == 0
        assert 0 < checkpointed["activations"] < lora["activations"]
        quantized = step_memory(base.__class__(**dict(
            base.to_dict(), model=model, use_lora=True, lora_rank=2, mixed_precision="bf16",
            quantize_base="nf4")))
        assert quantized["weights"] < 0.6 * lora["weights"]
        parts = ("weights", "text_encoders", "vae", "gradients", "optimizer", "activations")
        assert full["total"] == pytest.approx(sum(full[p] for p in parts))
        # fsdp on 8 processes: an eighth of the trained weights, gradients and AdamW each,
        # and two blocks gathered whole in bf16
        sharded = step_memory(base.__class__(**dict(base.to_dict(), model=model,
                                                    mixed_precision="bf16", fsdp=True)), 8)
        assert sharded["processes"] == 8 and sharded["activations"] == full["activations"]
        for part in ("gradients", "optimizer"):
            assert sharded[part] == pytest.approx(full[part] / 8)
        assert full["weights"] / 8 < sharded["weights"] < full["weights"]
    row = predict(base.__class__(**dict(base.to_dict(), model="tiny-flux")))
    assert row["flops_per_step"] > 0
    assert row["floor_s"]["H100 SXM"] == round(row["flops_per_step"] / 989.4e12, 3)


def test_the_large_model_scenarios_are_named():
    from bench.speed import NAMED

    for name in ("flux-dev-lora-512", "flux-dev-lora-1024", "sd35-large-lora-512",
                 "sd35-large-lora-1024"):
        device, settings, _ = NAMED[name]
        assert device == "cuda" and settings["use_lora"] and settings["gradient_checkpointing"]
