"""What a training step costs, predicted on the meta device (shapes only: no memory, no
arithmetic, any model size on any machine): its model FLOPs, the floor time they imply on a GPU,
and the GPU memory it holds (weights, gradients, optimizer state, activations).

    python -m bench --predict                      # the large-model scenarios, as a table
    python -m bench --predict flux-dev-lora-1024   # one of them

FLOPs are the denoiser's forward and backward (and the text encoders' when they train), counted
by torch's FlopCounterMode; gradient checkpointing's recomputation is not counted. Memory:
- weights: the denoiser in the precision it is held in (a LoRA's frozen base in bf16, or its
  blocks' Linear layers in NF4 with quantize_base; a full fine-tune's fp32 master weights),
  the VAE in fp32 and the text encoders that stay on the GPU (frozen ones are parked in CPU
  memory while the denoiser trains: train/recipe.py);
- gradients and AdamW's two moments in fp32 for every trainable parameter (8-bit AdamW: one
  byte a moment); with fsdp these and the trained weights are an eighth each (one node of 8
  GPUs), plus two blocks gathered whole in bf16;
- activations: the tensors autograd saves in the forward, counted with saved-tensor hooks in
  bf16 (what autocast computes in), and with gradient checkpointing each block's input plus the
  largest block's own (recomputed one block at a time in the backward).
Not counted: the allocator's fragmentation, CUDA's context (~0.5 GiB), the temporary tensors of
the backward. A prediction, to be checked against `script/bench --scenario` on a GPU.
"""

from __future__ import annotations

import torch

from train import sharding

# Dense bf16 tensor-core peaks in TFLOP/s (vendor spec sheets): the floor a step's FLOPs imply.
PEAKS = {"H100 SXM": 989.4, "H200": 989.4}


FSDP_PROCESSES = 8  # a sharded run's memory is predicted for one node of 8 GPUs


def _step_inputs(pipe, family, config):
    """The step's text ids (one per tokenizer), latents, timesteps and time ids on the meta
    device: train_batch_size instance rows, as many class rows with prior preservation."""
    from train import families
    from train.data import tokenize

    rows = config.train_batch_size * (2 if config.with_prior_preservation else 1)
    prompts = [config.instance_prompt, config.class_prompt or config.instance_prompt]
    ids = []
    for (_, name), tokenizer in zip(family.TEXT, families.tokenizers(pipe)):
        full, lengths = tokenize(tokenizer, prompts, family.TEXT_LENGTHS.get(name))
        # A batch's prompts are sliced to the longest one, unless the family or pad_tokens
        # keeps every token (train/data.py).
        keep = full.shape[1] if config.pad_tokens or family.FIXED_LENGTH else int(lengths.max())
        ids.append(full[:, :keep].repeat(config.train_batch_size, 1)[:rows].to("meta"))
    side = config.resolution // pipe.vae_scale_factor
    latents = torch.zeros(rows, pipe.vae.config.latent_channels, side, side, device="meta")
    timesteps = torch.zeros(rows, device="meta")
    time_ids = torch.zeros(rows, 6, device="meta") if family.TIME_IDS else None
    return ids, latents, timesteps, time_ids


def _prepared(config, dtype=None):
    """The config's built-in model on the meta device, with what trains marked as the recipe
    marks it: (pipe, family, denoiser, text encoders that train)."""
    from train import families
    from train.models import build_builtin
    from train.optim import mark_trainable
    from train.quiet import quiet_libraries

    quiet_libraries(False, loading=True)  # diffusers' notices about casting, peft's warnings
    pipe = build_builtin(config.model, "meta")
    if dtype is not None:
        pipe.to(dtype=dtype)
    family = families.get(families.of(pipe))
    denoiser = families.denoiser(pipe).train()
    encoders = families.text_encoders(pipe)
    for encoder in encoders:
        encoder.requires_grad_(False)
    trained = {name: encoder for name, encoder in zip(families.text_names(pipe), encoders)
               if config.train_text_encoder and name not in family.FROZEN_TEXT}
    mark_trainable(denoiser, family.DENOISER, trained, config)
    return pipe, family, denoiser, trained


def _forward(family, denoiser, encoders, trained, ids, latents, timesteps, time_ids):
    with torch.set_grad_enabled(bool(trained)):
        states, pooled = family.encode_text(encoders, ids)
    return family.denoise(denoiser, latents.to(states.dtype), timesteps, states, pooled,
                          time_ids)


def step_flops(config) -> int:
    """Model FLOPs of one training step of `config` (a TrainConfig naming a built-in model):
    the denoiser's forward and backward, and the text encoders' when they train."""
    from torch.utils.flop_counter import FlopCounterMode

    from train import families

    pipe, family, denoiser, trained = _prepared(config)
    encoders = families.text_encoders(pipe)
    ids, latents, timesteps, time_ids = _step_inputs(pipe, family, config)
    if not trained:  # the step reads the cached embeddings: no text-encoder work
        with torch.no_grad():
            states, pooled = family.encode_text(encoders, ids)
    with FlopCounterMode(display=False) as counter:
        if trained:
            states, pooled = family.encode_text(encoders, ids)
        pred = family.denoise(denoiser, latents, timesteps, states, pooled, time_ids)
        torch.nn.functional.mse_loss(pred, latents).backward()
    return counter.get_total_flops()


def _saved_bytes(run) -> tuple[int, list[int], list[int]]:
    """Bytes of the tensors autograd saves while `run()` runs; also, per block (a module in a
    ModuleList of the denoiser: transformer blocks, UNet levels), its own saved bytes and its
    input's bytes."""
    saved, marks = [0], []

    def pack(tensor):
        saved[0] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run(saved, marks)
    return saved[0], [end - start for start, end, _ in marks], [size for _, _, size in marks]


def step_memory(config, processes: int = 1) -> dict:
    """GiB of GPU memory one training step of `config` holds, by part (see the module doc), in
    each of `processes` processes: with fsdp the trained weights, their gradients and AdamW's
    state are split among them, and two blocks at a time are gathered whole in bf16 (the one
    running and the next, prefetched)."""
    from train import families

    lora_base = config.use_lora and config.mixed_precision != "no"
    pipe, family, denoiser, trained = _prepared(config)
    trainable = [p for module in (denoiser, *trained.values()) for p in module.parameters()
                 if p.requires_grad]
    n_train = sum(p.numel() for p in trainable)
    frozen = sum(p.numel() for p in denoiser.parameters() if not p.requires_grad)
    gib = 2 ** 30
    # quantize_base: the blocks' Linear weights in NF4, 0.5 byte plus a 4-byte scale per 64.
    linears = {id(m): m for blocks in denoiser.modules()  # ModuleLists nest: each layer once
               if isinstance(blocks, torch.nn.ModuleList) for m in blocks.modules()
               if type(m) is torch.nn.Linear and not m.weight.requires_grad}
    quantized = sum(m.weight.numel() for m in linears.values()) \
        if config.quantize_base != "no" else 0
    shards = processes if config.fsdp else 1
    units = [sum(p.numel() for p in unit.parameters() if p.requires_grad)
             for module in (denoiser, *trained.values()) for unit in sharding.units(module)]
    gathered = 2 * max(units) * 2 if shards > 1 else 0
    weights = ((frozen - quantized) * (2 if lora_base else 4) + quantized * (0.5 + 4 / 64)
               + n_train * 4 / shards + gathered) / gib
    # Text encoders that train run every step, and so do the frozen ones beside them (nothing
    # is cached); all frozen, they wait in CPU memory while the denoiser trains.
    text_gib = sum(p.numel() * (4 if p.requires_grad or not lora_base else 2)
                   for e in families.text_encoders(pipe) for p in e.parameters()) / gib \
        if trained else 0.0
    vae_gib = sum(p.numel() * 4 for p in pipe.vae.parameters()) / gib
    adam = 2 if config.use_8bit_adam else 8

    # Activations, in bf16 as autocast computes them.
    pipe, family, denoiser, trained = _prepared(config, torch.bfloat16)
    ids, latents, timesteps, time_ids = _step_inputs(pipe, family, config)
    blocks = [m for m in denoiser.modules() if isinstance(m, torch.nn.ModuleList)
              and len(m) > 1 and all(sum(1 for _ in b.parameters()) for b in m)]
    blocks = [b for group in blocks for b in group]

    def run(saved, marks):
        def before(module, args, kwargs):
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            module._start = (saved[0], sum(t.numel() * t.element_size() for t in tensors))

        def after(module, args, kwargs, out):
            marks.append((module._start[0], saved[0], module._start[1]))

        handles = [h for b in blocks for h in (
            b.register_forward_pre_hook(before, with_kwargs=True),
            b.register_forward_hook(after, with_kwargs=True))]
        try:
            _forward(family, denoiser, families.text_encoders(pipe), trained, ids, latents,
                     timesteps, time_ids)
        finally:
            for handle in handles:
                handle.remove()

    total, own, inputs = _saved_bytes(run)
    # Nested blocks (a UNet level holds attention blocks) are counted at the outer level only.
    outer = [i for i, b in enumerate(blocks) if not any(b is not o and b in list(o.modules())
                                                         for o in blocks)]
    inside = sum(own[i] for i in outer)
    checkpointed = total - inside + sum(inputs[i] for i in outer) + max(own[i] for i in outer)
    activations = (checkpointed if config.gradient_checkpointing else total) / gib
    parts = {"weights": weights, "text_encoders": text_gib, "vae": vae_gib,
             "gradients": n_train * 4 / shards / gib, "optimizer": n_train * adam / shards / gib,
             "activations": activations}
    return dict(parts, total=sum(parts.values()), trainable=n_train, frozen=frozen,
                processes=shards)


def predict(config) -> dict:
    """The step's FLOPs, the floor time they imply on each GPU of PEAKS, and its memory."""
    flops = step_flops(config)
    memory = {k: round(v, 2) if isinstance(v, float) else v
              for k, v in step_memory(config, FSDP_PROCESSES if config.fsdp else 1).items()}
    return dict(flops_per_step=flops, memory_gib=memory,
                floor_s={gpu: round(flops / (peak * 1e12), 3) for gpu, peak in PEAKS.items()})
