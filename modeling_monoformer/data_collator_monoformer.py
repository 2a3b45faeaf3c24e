"""Training inputs for MonoFormer: noise and timesteps from a diffusers scheduler, and a collator for Trainer/accelerate.

`MonoFormerDataCollator` turns samples `{"text": ..., "latents" | "pixel_values": ...}` into the keyword arguments of
`MonoFormerForConditionalGeneration.forward` (`input_ids`, `attention_mask`, `labels`, `latents`, `timesteps`,
`diffusion_target`), so `transformers.Trainer` and a plain `accelerate` loop train the model unchanged.
"""

import copy
import random

import torch

from .scheduler_rules_monoformer import check_scheduler_matches  # one rule for training and sampling

TASKS = ("generate", "caption", "text", "edit", "interleaved")


def add_training_noise(
    scheduler,
    latents: torch.Tensor,
    prediction_type: str,
    generator: torch.Generator | None = None,
    max_noise: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise clean latents `x0` (n, C, h, w) at random training timesteps with a diffusers scheduler.

    DDPM-family schedulers: `t ~ U{0..T-1}`, `x_t = scheduler.add_noise(x0, eps, t)`, target `eps`
    (`epsilon`) or `scheduler.get_velocity(x0, eps, t)` (`v_prediction`).
    Flow matching (`FlowMatchEulerDiscreteScheduler` with its full training schedule): a uniformly drawn entry of
    `scheduler.timesteps` (`sigma * 1000`), `x_t = scheduler.scale_noise(x0, t, eps) = (1 - sigma) x0 + sigma eps`,
    target `eps - x0`.
    `max_noise` < 1 caps the draw to the first fraction of the schedule (`t < max_noise * T`; flow: `sigma <=
    max_noise`): Transfusion's cap of 0.5 for an image read before its caption keeps it legible.

    Returns:
        `(noisy_latents, timesteps, target)`.
    """
    check_scheduler_matches(scheduler, prediction_type)
    if not 0.0 < max_noise <= 1.0:
        raise ValueError(f"`max_noise` must be a fraction of the noise schedule in (0, 1], got {max_noise}.")
    n = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents)
    if prediction_type == "flow":
        schedule = scheduler.timesteps
        if max_noise < 1.0:
            schedule = schedule[schedule <= max_noise * scheduler.config.num_train_timesteps]
        idx = torch.randint(0, len(schedule), (n,), generator=generator)
        timesteps = schedule[idx].to(latents.device)
        noisy = scheduler.scale_noise(latents, timesteps, noise)
        return noisy, timesteps, noise - latents
    num_train = scheduler.config.num_train_timesteps
    high = num_train if max_noise == 1.0 else max(1, int(max_noise * num_train))
    timesteps = torch.randint(0, high, (n,), generator=generator).to(latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    return noisy, timesteps, target


class MonoFormerDataCollator:
    r"""
    Collates samples into MonoFormer training batches.

    Each sample is a dict with `"text"` and, for image tasks, `"latents"` (`(C, h, w)`, already VAE-encoded and
    scaled) or `"pixel_values"` (`(C, H, W)` in `[-1, 1]`, pixel-space models only). `"task"` picks the layout:

    - `"generate"` (default with an image): `text <boi> <image>... <eoi>`; the image is noised (diffusion loss), the
      text is dropped with probability `cfg_dropout` (classifier-free guidance), and with `caption_word_dropout` each
      word of a kept prompt is dropped on its own (at least one stays), so the image cannot key on one wording;
    - `"caption"`: `<boi> <image>... <eoi> [prompt] text <eos>`; the image is clean (`t = 0`), or with
      `caption_max_noise` noised at a capped timestep (Transfusion: `t <= 0.5 T`; it then has a diffusion target too),
      and the LM learns the caption. An optional `"prompt"` (a question, for VQA: `"What is this?"` with `text` the
      answer, `" A sneaker."`) comes between the image and `text` and is conditioning, not a target (labels -100);
      `text` must then start where a token starts (e.g. with a space), so the prompt's tokens are a prefix;
    - `"edit"`: `<boi> source <eoi> instruction <boi> target <eoi>`; the sample also has `"source"` (a tensor like the
      target), read clean; the target is noised. The instruction is conditioning, not a target (labels -100 up to and
      including the target's `<boi>`: the pipeline starts the edited image, the model never has to). Instruction and
      source are each dropped with probability `cfg_dropout`, independently (InstructPix2Pix), which trains the
      branches of dual guidance;
    - `"interleaved"`: `text` holds one `<image>` marker per entry of `"images"` (a list of `(C, h, w)` tensors, sizes
      may differ), e.g. `"Show me a sneaker. <image> It has laces."`, then `<eos>`; every image is noised
      (Transfusion; each has a diffusion target) and every text token, `<boi>` included, has a label, so the LM learns
      when to start an image;
    - `"text"` (default without an image): `text <eos>`, LM loss only.

    A sample may carry an integer `"seed"`: its prompt dropout, noise and timestep are then drawn from a generator
    seeded with it (not from the collator's own), so a batch's inputs do not depend on how samples are grouped into
    batches or processes, or on where a resumed run restarts ([`MonoFormerTrainingDataset`] sets it).

    Args:
        processor ([`MonoFormerProcessor`]): configured for the model (`configure_for_model`).
        scheduler: A diffusers scheduler with the training schedule (DDPM-family, or FlowMatchEuler for `flow`).
        prediction_type (`str`): The model's `config.prediction_type`.
        cfg_dropout (`float`, defaults to 0.1): Probability of dropping the prompt of a `"generate"` sample (and, each
            on its own, the instruction and the source of an `"edit"` sample).
        max_length (`int`, *optional*): Refuse longer sequences with a clear error.
        seed (`int`, *optional*): Seeds the collator's own generator (noise, timesteps, dropout).
        caption_max_noise (`float`, *optional*): Noise `"caption"` images at timesteps in the first
            `caption_max_noise` of the schedule (Transfusion: 0.5) instead of keeping them clean.
        caption_word_dropout (`float`, defaults to 0): Probability of dropping each whitespace-separated word of a
            `"generate"` prompt that was kept (no new words are made: the subsets of a training caption only).
    """

    def __init__(
        self,
        processor,
        scheduler,
        prediction_type: str,
        cfg_dropout: float = 0.1,
        max_length=None,
        seed=None,
        caption_max_noise: float | None = None,
        caption_word_dropout: float = 0.0,
    ):
        if not 0.0 <= cfg_dropout < 1.0:
            raise ValueError(f"`cfg_dropout` must be in [0, 1), got {cfg_dropout}.")
        if not 0.0 <= caption_word_dropout < 1.0:
            raise ValueError(f"`caption_word_dropout` must be in [0, 1), got {caption_word_dropout}.")
        if caption_max_noise is not None and not 0.0 < caption_max_noise <= 1.0:
            raise ValueError(
                f"`caption_max_noise` must be None (clean caption images) or a fraction in (0, 1], got "
                f"{caption_max_noise}."
            )
        check_scheduler_matches(scheduler, prediction_type)
        self.processor = processor
        self.scheduler = copy.deepcopy(scheduler)  # a pipeline's set_timesteps must not change the training schedule
        self.prediction_type = prediction_type
        self.cfg_dropout = cfg_dropout
        self.max_length = max_length
        self.caption_max_noise = caption_max_noise
        self.caption_word_dropout = caption_word_dropout
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.rng = random.Random(seed)

    def _as_image(self, value, field: str, index: int) -> torch.Tensor:
        if field == "pixel_values" and self.processor.vae_scale_factor != 1:
            raise ValueError(
                f"Sample {index} has `pixel_values` but the model works on VAE latents (`vae_scale_factor` "
                f"{self.processor.vae_scale_factor}): encode images first and pass `latents`."
            )
        value = torch.as_tensor(value, dtype=torch.float32)
        if value.ndim != 3:
            raise ValueError(f"Sample {index}: `{field}` must be one (C, h, w) tensor, got shape {tuple(value.shape)}.")
        return value

    def _image_of(self, sample: dict, index: int) -> torch.Tensor | None:
        for field in ("latents", "pixel_values"):
            if sample.get(field) is not None:
                return self._as_image(sample[field], field, index)
        return None

    def _uniform(self, generator: torch.Generator | None) -> float:
        """One draw in [0, 1), from the sample's generator when it has a seed."""
        return self.rng.random() if generator is None else torch.rand((), generator=generator).item()

    def _drop(self, generator: torch.Generator | None) -> bool:
        """One prompt-dropout draw."""
        return self._uniform(generator) < self.cfg_dropout

    def _drop_words(self, text: str, generator: torch.Generator | None) -> str:
        """`text` with each word dropped with probability `caption_word_dropout`; one random word stays if all go."""
        words = text.split()
        if self.caption_word_dropout == 0.0 or len(words) < 2:
            return text
        kept = [w for w in words if self._uniform(generator) >= self.caption_word_dropout]
        return " ".join(kept) if kept else words[int(self._uniform(generator) * len(words))]

    def _layout(self, sample: dict, index: int, generator) -> tuple[str, list[torch.Tensor], list[float | None]]:
        """A sample's text (one `<image>` per image) and its images in order, each with its noise cap (`1.0`: the full
        schedule, `None`: clean context)."""
        if "text" not in sample:
            raise ValueError(f"Sample {index} has no `text` field (keys: {sorted(sample)}).")
        image_token, eos = self.processor.image_token, self.processor.tokenizer.eos_token or ""
        text = str(sample["text"])
        image = self._image_of(sample, index)
        task = sample.get("task") or ("generate" if image is not None else "text")
        if task not in TASKS:
            raise ValueError(f"Sample {index}: `task` must be one of {TASKS}, got {task!r}.")
        if sample.get("prompt") and task != "caption":
            raise ValueError(
                f"Sample {index} has a `prompt` but task {task!r}: a prompt (a question about the image) belongs to "
                "a `\"task\": \"caption\"` sample; for text-to-image put the prompt in `text`."
            )
        if task == "text":
            return text + eos, [], []
        if task == "interleaved":
            images = sample.get("images")
            if not isinstance(images, (list, tuple)) or not images:
                raise ValueError(f"Sample {index} has task 'interleaved' but no `images` list.")
            if text.count(image_token) != len(images):
                raise ValueError(
                    f"Sample {index}: `text` has {text.count(image_token)} `{image_token}` marker(s) for "
                    f"{len(images)} image(s) in `images`: write one marker where each image goes."
                )
            field = "latents" if self.processor.vae_scale_factor != 1 else "pixel_values"
            return text + eos, [self._as_image(x, field, index) for x in images], [1.0] * len(images)
        if image is None:
            raise ValueError(f"Sample {index} has task {task!r} but no `latents` / `pixel_values`.")
        if task == "generate":
            return ("" if self._drop(generator) else self._drop_words(text, generator)) + image_token, [image], [1.0]
        if task == "caption":
            return image_token + str(sample.get("prompt") or "") + text + eos, [image], [self.caption_max_noise]
        if sample.get("source") is None:  # edit
            raise ValueError(f"Sample {index} has task 'edit' but no `source` image.")
        source = self._as_image(sample["source"], "source", index)
        drop_text, drop_source = self._drop(generator), self._drop(generator)
        text = "" if drop_text else text
        if drop_source:
            return text + image_token, [image], [1.0]
        return image_token + text + image_token, [source, image], [None, 1.0]

    def _noise(self, images, caps, generators) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor | None]]:
        """Noise every image that has a cap: one image at a time with per-sample generators, else one call per
        (size, cap) group from the collator's generator. Returns `(timesteps, latents, targets)`."""
        timesteps = torch.zeros(len(images))
        latents, targets = list(images), [None] * len(images)
        noised = [i for i, cap in enumerate(caps) if cap is not None]
        if any(generators[i] is not None for i in noised):
            groups = [[i] for i in noised]
        else:
            by_key: dict[tuple, list[int]] = {}
            for i in noised:
                by_key.setdefault((tuple(images[i].shape), caps[i]), []).append(i)
            groups = list(by_key.values())
        for idx in groups:
            x_t, t, target = add_training_noise(
                self.scheduler, torch.stack([images[i] for i in idx]), self.prediction_type,
                generators[idx[0]] or self.generator, max_noise=caps[idx[0]],
            )
            for j, i in enumerate(idx):
                latents[i], timesteps[i], targets[i] = x_t[j], t[j], target[j]
        return timesteps, latents, targets

    def _prompt_end(self, ids: torch.Tensor, prompt: str, sizes: list, index: int) -> int:
        """The length of a caption sample's conditioning, `[bos] <boi> image <eoi> prompt`, tokenized in the same
        context as in the row (so tokenizers that treat a segment's first word differently agree)."""
        prefix = self.processor(text=[self.processor.image_token + prompt], image_sizes=[sizes])["input_ids"][0]
        if ids[: len(prefix)].tolist() != prefix.tolist():
            raise ValueError(
                f"Sample {index}: its `prompt` {prompt!r} does not tokenize to a prefix of the text after the image "
                "(the tokenizer merged it with the start of `text`): start `text` with a space or punctuation."
            )
        return len(prefix)

    def __call__(self, samples: list[dict]) -> dict:
        f = self.processor.vae_scale_factor
        texts, sizes, images, caps, generators, edit_rows, prompt_rows = [], [], [], [], [], [], []
        for i, sample in enumerate(samples):
            generator = None
            if sample.get("seed") is not None:
                generator = torch.Generator().manual_seed(int(sample["seed"]))
            text, sample_images, sample_caps = self._layout(sample, i, generator)
            texts.append(text)
            sizes.append([(x.shape[-2] * f, x.shape[-1] * f) for x in sample_images])
            images += sample_images
            caps += sample_caps
            generators += [generator] * len(sample_images)
            if sample.get("task") == "edit":
                edit_rows.append(i)
            if sample.get("prompt"):  # `_layout` allows a prompt on caption samples only
                prompt_rows.append((i, str(sample["prompt"])))

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
        # An edit's source, instruction and the target's <boi> are conditioning (the pipeline starts the edited image).
        # Learning that <boi> taught "after a clean image, start another" whenever the instruction was dropped, and
        # captioning collapsed (benchmarks/README.md, the demo fine-tuned with edit samples).
        for row in edit_rows:
            target_boi = int((input_ids[row] == self.processor.boi_token_id).nonzero()[-1])
            labels[row, : target_boi + 1] = -100
        for row, prompt in prompt_rows:  # a caption's question is conditioning: the LM learns the answer only
            labels[row, : self._prompt_end(input_ids[row], prompt, sizes[row], row)] = -100
        out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if not images:
            return out

        timesteps, latents, targets = self._noise(images, caps, generators)
        if len({tuple(x.shape) for x in images}) == 1 and all(cap is not None for cap in caps):
            out["latents"] = torch.stack(latents)
            out["diffusion_target"] = torch.stack(targets)
        else:
            out["latents"] = latents
            out["diffusion_target"] = targets if any(cap is not None for cap in caps) else None
        out["timesteps"] = timesteps
        return out


__all__ = ["MonoFormerDataCollator", "add_training_noise", "check_scheduler_matches"]
