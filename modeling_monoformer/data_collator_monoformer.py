"""Training inputs for MonoFormer: noise and timesteps from a diffusers scheduler, and a collator for Trainer/accelerate.

`MonoFormerDataCollator` turns samples `{"text": ..., "latents" | "pixel_values": ...}` into the keyword arguments of
`MonoFormerForConditionalGeneration.forward` (`input_ids`, `attention_mask`, `labels`, `latents`, `timesteps`,
`diffusion_target`), so `transformers.Trainer` and a plain `accelerate` loop train the model unchanged.
"""

import copy
import random

import torch

from .pipeline_monoformer import check_scheduler_matches  # one rule for training and sampling

TASKS = ("generate", "caption", "text")


def add_training_noise(
    scheduler, latents: torch.Tensor, prediction_type: str, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise clean latents `x0` (n, C, h, w) at random training timesteps with a diffusers scheduler.

    DDPM-family schedulers: `t ~ U{0..T-1}`, `x_t = scheduler.add_noise(x0, eps, t)`, target `eps`
    (`epsilon`) or `scheduler.get_velocity(x0, eps, t)` (`v_prediction`).
    Flow matching (`FlowMatchEulerDiscreteScheduler` with its full training schedule): a uniformly drawn entry of
    `scheduler.timesteps` (`sigma * 1000`), `x_t = scheduler.scale_noise(x0, t, eps) = (1 - sigma) x0 + sigma eps`,
    target `eps - x0`.

    Returns:
        `(noisy_latents, timesteps, target)`.
    """
    check_scheduler_matches(scheduler, prediction_type)
    n = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents)
    if prediction_type == "flow":
        schedule = scheduler.timesteps
        idx = torch.randint(0, len(schedule), (n,), generator=generator)
        timesteps = schedule[idx].to(latents.device)
        noisy = scheduler.scale_noise(latents, timesteps, noise)
        return noisy, timesteps, noise - latents
    num_train = scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, num_train, (n,), generator=generator).to(latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    return noisy, timesteps, target


class MonoFormerDataCollator:
    r"""
    Collates samples into MonoFormer training batches.

    Each sample is a dict with `"text"` and, for image tasks, `"latents"` (`(C, h, w)`, already VAE-encoded and
    scaled) or `"pixel_values"` (`(C, H, W)` in `[-1, 1]`, pixel-space models only). `"task"` picks the layout:

    - `"generate"` (default with an image): `text <boi> <image>... <eoi>`; the image is noised (diffusion loss), the
      text is dropped with probability `cfg_dropout` (classifier-free guidance);
    - `"caption"`: `<boi> <image>... <eoi> text <eos>`; the image is clean (`t = 0`), the LM learns the caption;
    - `"text"` (default without an image): `text <eos>`, LM loss only.

    A sample may carry an integer `"seed"`: its prompt dropout, noise and timestep are then drawn from a generator
    seeded with it (not from the collator's own), so a batch's inputs do not depend on how samples are grouped into
    batches or processes, or on where a resumed run restarts ([`MonoFormerTrainingDataset`] sets it).

    Args:
        processor ([`MonoFormerProcessor`]): configured for the model (`configure_for_model`).
        scheduler: A diffusers scheduler with the training schedule (DDPM-family, or FlowMatchEuler for `flow`).
        prediction_type (`str`): The model's `config.prediction_type`.
        cfg_dropout (`float`, defaults to 0.1): Probability of dropping the prompt of a `"generate"` sample.
        max_length (`int`, *optional*): Refuse longer sequences with a clear error.
        seed (`int`, *optional*): Seeds the collator's own generator (noise, timesteps, dropout).
    """

    def __init__(self, processor, scheduler, prediction_type: str, cfg_dropout: float = 0.1, max_length=None, seed=None):
        if not 0.0 <= cfg_dropout < 1.0:
            raise ValueError(f"`cfg_dropout` must be in [0, 1), got {cfg_dropout}.")
        check_scheduler_matches(scheduler, prediction_type)
        self.processor = processor
        self.scheduler = copy.deepcopy(scheduler)  # a pipeline's set_timesteps must not change the training schedule
        self.prediction_type = prediction_type
        self.cfg_dropout = cfg_dropout
        self.max_length = max_length
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.rng = random.Random(seed)

    def _image_of(self, sample: dict) -> torch.Tensor | None:
        if "latents" in sample and sample["latents"] is not None:
            return torch.as_tensor(sample["latents"], dtype=torch.float32)
        if "pixel_values" in sample and sample["pixel_values"] is not None:
            if self.processor.vae_scale_factor != 1:
                raise ValueError(
                    "A sample has `pixel_values` but the model works on VAE latents (`vae_scale_factor` "
                    f"{self.processor.vae_scale_factor}): encode images first and pass `latents`."
                )
            return torch.as_tensor(sample["pixel_values"], dtype=torch.float32)
        return None

    def __call__(self, samples: list[dict]) -> dict:
        tok = self.processor.tokenizer
        eos = tok.eos_token or ""
        f = self.processor.vae_scale_factor
        texts, sizes, images, noised, generators = [], [], [], [], []
        for i, sample in enumerate(samples):
            if "text" not in sample:
                raise ValueError(f"Sample {i} has no `text` field (keys: {sorted(sample)}).")
            image = self._image_of(sample)
            task = sample.get("task") or ("generate" if image is not None else "text")
            if task not in TASKS:
                raise ValueError(f"Sample {i}: `task` must be one of {TASKS}, got {task!r}.")
            if task != "text" and image is None:
                raise ValueError(f"Sample {i} has task {task!r} but no `latents` / `pixel_values`.")
            text = str(sample["text"])
            generator = None
            if sample.get("seed") is not None:
                generator = torch.Generator().manual_seed(int(sample["seed"]))
            if task == "generate":
                draw = self.rng.random() if generator is None else torch.rand((), generator=generator).item()
                if draw < self.cfg_dropout:
                    text = ""
                texts.append(text + self.processor.image_token)
            elif task == "caption":
                texts.append(self.processor.image_token + text + eos)
            else:
                texts.append(text + eos)
            if task == "text":
                sizes.append([])
            else:
                sizes.append([(image.shape[-2] * f, image.shape[-1] * f)])
                images.append(image)
                noised.append(task == "generate")
                generators.append(generator)

        batch = self.processor(text=texts, image_sizes=sizes, padding=True, padding_side="right")
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        if self.max_length is not None and input_ids.shape[1] > self.max_length:
            raise ValueError(
                f"A batch is {input_ids.shape[1]} tokens long, more than `max_length`={self.max_length}: shorten the "
                "texts or use smaller images."
            )
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        for special in (self.processor.image_token_id, self.processor.eoi_token_id):
            labels = labels.masked_fill(input_ids == special, -100)
        out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if not images:
            return out

        same_size = len({tuple(x.shape) for x in images}) == 1
        timesteps = torch.zeros(len(images))
        targets: list[torch.Tensor | None] = [None] * len(images)
        latents = list(images)
        gen_idx = [i for i, is_noised in enumerate(noised) if is_noised]
        if gen_idx and any(generators[i] is not None for i in gen_idx):
            for i in gen_idx:  # per-sample generators: one image at a time
                x_t, t, target = add_training_noise(
                    self.scheduler, images[i].unsqueeze(0), self.prediction_type, generators[i] or self.generator
                )
                latents[i], timesteps[i], targets[i] = x_t[0], t[0], target[0]
        elif gen_idx:
            groups: dict[tuple, list[int]] = {}
            for i in gen_idx:
                groups.setdefault(tuple(images[i].shape), []).append(i)
            for idx in groups.values():
                x_t, t, target = add_training_noise(
                    self.scheduler, torch.stack([images[i] for i in idx]), self.prediction_type, self.generator
                )
                for j, i in enumerate(idx):
                    latents[i], timesteps[i], targets[i] = x_t[j], t[j], target[j]
        if same_size and all(noised):
            out["latents"] = torch.stack(latents)
            out["diffusion_target"] = torch.stack(targets)
        else:
            out["latents"] = latents
            out["diffusion_target"] = targets if gen_idx else None
        out["timesteps"] = timesteps
        return out


__all__ = ["MonoFormerDataCollator", "add_training_noise", "check_scheduler_matches"]
