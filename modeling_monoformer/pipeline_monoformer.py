"""MonoFormer text-to-image pipeline (diffusers `DiffusionPipeline`) with a prefix KV cache and batched CFG.

This file travels with saved checkpoints (it is copied to the root of the folder `save_pretrained` writes, with the
sibling modules it imports: `scheduler_rules_monoformer.py`), so it imports installed libraries and those flat siblings
only, never the `modeling_monoformer` package.
"""

import importlib
import inspect
import json
import logging
import math
import numbers
import os
import shutil
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.guiders.guider_utils import BaseGuidance
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_loading_utils import LOADABLE_CLASSES
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput, hub_utils, replace_example_docstring
from diffusers.utils.dynamic_modules_utils import get_relative_import_files
from diffusers.utils.logging import get_logger
from diffusers.utils.torch_utils import randn_tensor
from transformers import DynamicCache, PreTrainedModel, ProcessorMixin
from transformers.generation.streamers import BaseStreamer

from .scheduler_rules_monoformer import check_scheduler_matches  # one rule for training and sampling
from .image_processing_monoformer import with_channel_axis  # one rule for the processor and the pipeline

logger = get_logger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")
# Guiders that combine one conditional and one unconditional prediction run on the cached, batched denoising step.
GUIDER_PREDICTIONS = ("pred_cond", "pred_uncond")
DEFAULT_GUIDANCE_SCALE = 4.0


def no_logits(device) -> torch.Tensor:
    """`logits_to_keep` for a forward whose logits nobody reads (prefix runs, denoising steps): the empty set of
    positions, so the LM head (vocab x hidden, 113 MB in float32 for SmolLM2) is not run at all."""
    return torch.empty(0, dtype=torch.long, device=device)

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler

        >>> pipe = DiffusionPipeline.from_pretrained("path/to/monoformer-pipeline", trust_remote_code=True)
        >>> pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        >>> image = pipe("a photo of a sneaker", num_inference_steps=25, generator=torch.manual_seed(0)).images[0]
        ```
"""


# Two-prediction guiders that fail on 4-D predictions, by class name (so that older diffusers without them import this
# file), with the reason; checked before a call rather than met as a tensor error inside diffusers.
IMAGE_SHAPE_UNSAFE_GUIDERS = {
    "MagnitudeAwareGuidance": "diffusers' `mambo_guidance` takes `torch.norm` over every non-batch dimension, which "
    "torch refuses for more than two dimensions (diffusers 0.42).",
}


RUNNABLE_GUIDERS_HINT = (
    "Use ClassifierFreeGuidance, AdaptiveProjectedGuidance, ClassifierFreeZeroStarGuidance or "
    "TangentialClassifierFreeGuidance."
)


def count_images(images) -> int:
    """Images in an `images` argument: a list counts its items, a batched `(n, ...)` tensor or array its `n`."""
    if images is None:
        return 0
    if isinstance(images, (list, tuple)):
        return sum(count_images(item) for item in images)
    if isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim == 4:
        return images.shape[0]
    return 1


def is_integer(value) -> bool:
    """An integer argument: Python or numpy integers, not bools."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A real-number argument: Python or numpy ints and floats, not bools."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_guider(guider) -> None:
    """Raise a `TypeError` unless `guider` is a `diffusers.guiders` guider this pipeline can run.

    The pipeline evaluates the conditional and unconditional rows as one batch against the prefix cache, so it runs
    guiders that combine exactly those two predictions without hooks on the model; guiders that need a perturbed
    third pass (perturbed-attention, skip-layer, smoothed-energy) or a hooked model (auto-guidance) are refused.
    """
    if not isinstance(guider, BaseGuidance):
        raise TypeError(
            f"`guider` must be a `diffusers.guiders` guider (e.g. `ClassifierFreeGuidance(guidance_scale=4.0)`), got "
            f"{type(guider).__name__}."
        )
    hooked = type(guider).prepare_models is not BaseGuidance.prepare_models
    if tuple(guider._input_predictions) != GUIDER_PREDICTIONS or hooked:
        raise TypeError(
            f"`guider` {type(guider).__name__} needs predictions {guider._input_predictions}"
            f"{' from a hooked model' if hooked else ''}; MonoFormerPipeline computes `pred_cond` and `pred_uncond` "
            f"in one batched pass. {RUNNABLE_GUIDERS_HINT}"
        )
    if type(guider).__name__ in IMAGE_SHAPE_UNSAFE_GUIDERS:
        raise TypeError(
            f"`guider` {type(guider).__name__} cannot combine this pipeline's image-shaped predictions (n, C, H, W): "
            f"{IMAGE_SHAPE_UNSAFE_GUIDERS[type(guider).__name__]} {RUNNABLE_GUIDERS_HINT}"
        )


@dataclass
class MonoFormerDenoisingContext:
    """What each denoising step feeds the model besides the latents.

    Cached path: `input_ids` is the image block only and `cache` holds the prefix; naive path: `input_ids` is the whole
    sequence and `cache` is None. `attention_mask` always spans prefix + image block (2D, left padding = 0).
    `context_latents` (naive path only): per row, the clean latent `(C, h, w)` of the context image in its prefix (an
    editing source) or None; the cached path has them in the cache.
    """

    input_ids: torch.LongTensor
    attention_mask: torch.LongTensor
    position_ids: torch.LongTensor
    cache: DynamicCache | None = None
    context_latents: list[torch.Tensor | None] | None = None


@dataclass
class MonoFormerInterleavedOutput(BaseOutput):
    """
    Output of [`MonoFormerPipeline.generate_interleaved`].

    Args:
        segments (`list`): What the model wrote, in order: text strings and images (PIL images, `(H, W, C)` arrays,
            `(C, H, W)` tensors or latents, per `output_type`). Empty text between two images is left out.
        sequences (`torch.LongTensor` of shape `(1, L)`): The whole token sequence: the prompt, the generated text and
            every image block (`<boi> <image> x N <eoi>`).
        image_latents (`list[torch.Tensor]`): The clean latents `(C, h, w)` of every image in `sequences`, in order
            (the prompt's images first): `model(input_ids=sequences, latents=image_latents)` recomputes the sequence.
        cache (`DynamicCache`): The KV cache of `sequences` minus its last token (as `generate` leaves it).
    """

    segments: list
    sequences: torch.LongTensor
    image_latents: list[torch.Tensor]
    cache: DynamicCache


class _SegmentStreamer(BaseStreamer):
    """Forwards the tokens of several `generate` calls to one user streamer as one stream: each call's first `put` (its
    prompt, i.e. everything already streamed) is dropped, and `end` is left to the caller (a `TextIteratorStreamer`
    stops its iterator on `end`)."""

    def __init__(self, streamer: BaseStreamer):
        self.streamer = streamer
        self.is_prompt = True

    def put(self, value):
        if self.is_prompt:
            self.is_prompt = False
            return
        self.streamer.put(value)

    def end(self):
        self.is_prompt = True


class MonoFormerPipeline(DiffusionPipeline):
    r"""
    Text-to-image generation with MonoFormer: one causal LLM reads the prompt and denoises the image's patch tokens.

    The prompt (everything up to and including `<boi>`) runs through the transformer **once**; each denoising step
    then runs only the image block against that prefix's KV cache and rolls the cache back. The conditional and the
    unconditional (negative prompt, default `""`) branches of classifier-free guidance run as one left-padded batch.

    This model inherits from [`DiffusionPipeline`]. Check the superclass documentation for the generic methods
    implemented for all pipelines (downloading, saving, running on a particular device, etc.).

    Parameters:
        model ([`MonoFormerForConditionalGeneration`]):
            The MonoFormer model; its `diffusion_output` is the scheduler's `model_output`.
        vae ([`AutoencoderKL`] or `None`):
            Decodes latents to images. `None` for pixel-space models (`config.vae_scale_factor == 1`).
        scheduler ([`SchedulerMixin`]):
            Any scheduler matching the model's `prediction_type`: DDPM, DDIM, DPM-Solver++ or Euler for
            `epsilon`/`v_prediction`; FlowMatchEuler (or DPM-Solver with flow sigmas) for `flow`. Swap it with
            `pipe.scheduler = Scheduler.from_config(pipe.scheduler.config)`.
        processor ([`MonoFormerProcessor`]):
            Tokenizer + image processor; configured here for the model (`configure_for_model`).
        guider ([`~diffusers.guiders.BaseGuidance`], *optional*):
            How the conditional and unconditional predictions combine: any `diffusers.guiders` guider that takes
            `pred_cond` and `pred_uncond` (`ClassifierFreeGuidance`, `AdaptiveProjectedGuidance`,
            `ClassifierFreeZeroStarGuidance`, `TangentialClassifierFreeGuidance`, ...). Its `start`/`stop` select the
            guided steps; the others run the conditional rows alone (one evaluation per image). Saved in the
            pipeline folder (`guider/guider_config.json`). Default: `ClassifierFreeGuidance(guidance_scale=4.0)` on
            every step. Swap it with `pipe.guider = AdaptiveProjectedGuidance(guidance_scale=4.0)`.
        default_num_inference_steps (`int`, defaults to 50):
            The step count of a call without `num_inference_steps`, saved in `model_index.json`; a checkpoint stores
            the count it was tuned with, so that `pipe(prompt)` samples as its model card reports.
    """

    model_cpu_offload_seq = "model->vae"
    _optional_components = ["vae", "guider"]
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        model: PreTrainedModel,
        vae: AutoencoderKL | None,
        scheduler: SchedulerMixin,
        processor: ProcessorMixin,
        guider: BaseGuidance | None = None,
        default_num_inference_steps: int = 50,
    ):
        super().__init__()
        if not isinstance(default_num_inference_steps, int) or default_num_inference_steps < 1:
            raise ValueError(
                f"`default_num_inference_steps` must be an integer >= 1, got {default_num_inference_steps!r}."
            )
        if guider is None:  # folders saved before guiders were components load with the old call default
            guider = ClassifierFreeGuidance(guidance_scale=DEFAULT_GUIDANCE_SCALE)
        check_guider(guider)
        config = model.config
        self._check_vae(vae, model)
        if vae is not None:
            vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
            if vae_factor != config.vae_scale_factor or vae.config.latent_channels != config.latent_channels:
                raise ValueError(
                    f"`vae` downsamples by {vae_factor} into {vae.config.latent_channels} channels but the model "
                    f"expects `vae_scale_factor`={config.vae_scale_factor} and "
                    f"`latent_channels`={config.latent_channels}."
                )
        processor.configure_for_model(config)
        self.register_modules(model=model, vae=vae, scheduler=scheduler, processor=processor, guider=guider)
        self.register_to_config(default_num_inference_steps=default_num_inference_steps)
        self.vae_scale_factor = config.vae_scale_factor
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @staticmethod
    def _check_vae(vae, model) -> None:
        """A latent model (`vae_scale_factor` > 1) cannot run, or be saved, without the VAE that decodes its latents."""
        if vae is None and model.config.vae_scale_factor != 1:
            raise ValueError(
                f"`vae` is None (pixel space) but the model's `config.vae_scale_factor` is "
                f"{model.config.vae_scale_factor}: pass the AutoencoderKL the model was trained with, or use a "
                "pixel-space model (vae_scale_factor=1)."
            )

    # ------------------------------------------------------------------------------------------------------ properties
    @property
    def guidance_scale(self) -> float:
        """The guidance scale of the current (or last) call. A `callback_on_step_end` may set `pipe._guidance_scale`
        (the diffusers convention, e.g. to cut guidance after some steps): the next guided steps use it, and a value
        <= 1 makes them unguided (the conditional rows' prediction; one evaluation per image where the call built
        conditional rows of their own, i.e. when its guidance interval leaves some steps unguided). A call that
        starts unguided builds no unconditional rows, so raising the scale mid-call has no effect there."""
        return self._guidance_scale

    def default_guider(self) -> BaseGuidance:
        """The guider a call uses: the `guider` component, or, after `pipe.guider = None`, what a pipeline built
        without one gets: `ClassifierFreeGuidance(guidance_scale=4.0)` on every step."""
        return self.guider if self.guider is not None else ClassifierFreeGuidance(guidance_scale=DEFAULT_GUIDANCE_SCALE)

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Whether any step of the current (or last) call is guided (the unconditional rows are encoded)."""
        return any(self._guided_steps)

    @property
    def image_guidance_scale(self) -> float:
        return self._image_guidance_scale

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    # ------------------------------------------------------------------------------------------------------ checks
    def check_inputs(
        self,
        prompt,
        negative_prompt,
        height,
        width,
        num_inference_steps,
        guidance_scale,
        num_images_per_prompt,
        latents,
        output_type,
        callback_on_step_end_tensor_inputs,
    ):
        """Validate every argument (and the scheduler/model pairing) before any compute; errors name the argument."""
        self._check_vae(self.vae, self.model)  # `pipe.vae = None` after construction
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = list(prompt)
        else:
            raise ValueError(f"`prompt` must be a string or a non-empty list of strings, got {prompt!r}.")
        num_prompts = len(prompts)
        if negative_prompt is not None:
            if isinstance(negative_prompt, str):
                negatives = [negative_prompt]
            elif isinstance(negative_prompt, (list, tuple)) and all(isinstance(p, str) for p in negative_prompt):
                negatives = list(negative_prompt)
                if len(negatives) != num_prompts:
                    raise ValueError(
                        f"`negative_prompt` has {len(negatives)} entries but `prompt` has {num_prompts}: give one "
                        "negative prompt per prompt, or a single string for all."
                    )
            else:
                raise ValueError(
                    f"`negative_prompt` must be None, a string or a list of strings, got {negative_prompt!r}."
                )
            prompts = prompts + negatives
        specials = (self.processor.image_token, self.processor.boi_token, self.processor.eoi_token)
        for text in prompts:
            for special in specials:
                if special in text:
                    raise ValueError(
                        f"`prompt`/`negative_prompt` {text[:60]!r} contains {special!r}; the pipeline appends "
                        "the image block itself."
                    )

        unit = self.model.config.patch_size * self.vae_scale_factor
        for name, value in (("height", height), ("width", width)):
            if not is_integer(value) or value <= 0 or value % unit:
                raise ValueError(
                    f"`{name}` must be a positive multiple of patch_size * vae_scale_factor = {unit}, got {value!r}."
                )
        if not is_integer(num_inference_steps) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be an integer >= 1, got {num_inference_steps!r}.")
        if guidance_scale is not None and (
            not is_number(guidance_scale) or not math.isfinite(guidance_scale) or guidance_scale < 0
        ):
            raise ValueError(
                f"`guidance_scale` must be a number >= 0 (<= 1 disables classifier-free guidance), got "
                f"{guidance_scale!r}."
            )
        if not is_integer(num_images_per_prompt) or num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be an integer >= 1, got {num_images_per_prompt!r}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if latents is not None and not isinstance(latents, torch.Tensor):
            raise TypeError(
                f"`latents` must be a torch.Tensor, got {type(latents).__module__}.{type(latents).__name__}: convert it "
                "with `torch.as_tensor(latents)`."
            )
        if latents is not None:
            config = self.model.config
            shape = (
                num_prompts * num_images_per_prompt,
                config.latent_channels,
                height // self.vae_scale_factor,
                width // self.vae_scale_factor,
            )
            if tuple(latents.shape) != shape:
                raise ValueError(
                    f"`latents` must be a tensor of shape {shape} (batch x num_images_per_prompt, channels, height / "
                    f"vae_scale_factor, width / vae_scale_factor), got {tuple(latents.shape)}."
                )
            if not torch.isfinite(latents).all():
                raise ValueError("`latents` holds NaN or infinite values: pass finite initial noise.")
        if callback_on_step_end_tensor_inputs is not None and not all(
            k in self._callback_tensor_inputs for k in callback_on_step_end_tensor_inputs
        ):
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` must be a subset of {self._callback_tensor_inputs}, got "
                f"{callback_on_step_end_tensor_inputs}."
            )

        check_scheduler_matches(self.scheduler, self.model.config.prediction_type)
        variance_type = getattr(self.scheduler.config, "variance_type", None)
        if variance_type in LEARNED_VARIANCE_TYPES and not self.model.config.learn_sigma:
            raise ValueError(
                f"`scheduler.config.variance_type` is {variance_type!r} but the model has `learn_sigma=False`: build "
                "the scheduler with `variance_type='fixed_small'`."
            )

    # ------------------------------------------------------------------------------------------------------ steps
    def encode_prompt(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
        height: int,
        width: int,
        device: torch.device,
    ) -> tuple[torch.LongTensor, torch.LongTensor, int]:
        """Tokenize `prompt <boi> <image> x N` for each image to make (unconditional rows first under CFG).

        Rows are left-padded so that every row ends with the same image block; the trailing `<eoi>` is dropped (the
        image tokens never attend to it). Returns `(input_ids, attention_mask, n_image_tokens)`.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        texts = [p for p in prompts for _ in range(num_images_per_prompt)]
        if do_classifier_free_guidance:
            negatives = negative_prompt if negative_prompt is not None else ""
            negatives = [negatives] * len(prompts) if isinstance(negatives, str) else list(negatives)
            texts = [n for n in negatives for _ in range(num_images_per_prompt)] + texts
        texts = [t + self.processor.image_token for t in texts]
        return self.tokenize_image_rows(texts, [[(height, width)]] * len(texts), height, width, device)

    def tokenize_image_rows(
        self, texts: list[str], image_sizes: list[list[tuple[int, int]]], height: int, width: int, device
    ) -> tuple[torch.LongTensor, torch.LongTensor, int]:
        """Tokenize rows that each end with the `<image>` to make (left-padded, the trailing `<eoi>` dropped: the image
        tokens never attend to it); `image_sizes` lists every image of a row. Returns `(input_ids, attention_mask,
        n_image_tokens)`."""
        batch = self.processor(
            text=texts, image_sizes=image_sizes, padding=True, padding_side="left", return_tensors="pt"
        )
        input_ids = batch["input_ids"][:, :-1].to(device)  # drop <eoi>
        attention_mask = batch["attention_mask"][:, :-1].to(device)
        n_image_tokens = self.processor.num_image_tokens(height, width)
        if not bool((input_ids[:, -n_image_tokens:] == self.processor.image_token_id).all()):
            raise ValueError("The processor did not put the image block at the end of every row.")
        max_positions = self.model.config.trained_position_limit  # the model's rule: a scaled RoPE has none
        if max_positions is not None and input_ids.shape[1] > max_positions:
            raise ValueError(
                f"`prompt` + image is {input_ids.shape[1]} tokens ({n_image_tokens} for a {height}x{width} image), "
                f"more than the LLM's max_position_embeddings={max_positions}: shorten `prompt` or lower "
                "`height`/`width`."
            )
        return input_ids, attention_mask, n_image_tokens

    def encode_edit_prompt(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None,
        source_latents: torch.Tensor,
        num_images_per_prompt: int,
        height: int,
        width: int,
        device: torch.device,
    ) -> tuple[torch.LongTensor, torch.LongTensor, int, list[torch.Tensor | None]]:
        """Tokenize the rows of an edit: `<boi> source <eoi> instruction <boi> <image> x N`, one per image to make.

        With guidance the branches come first (`self._num_branches` of them, conditional last): `[source + instruction]`
        alone; `[source + negative, source + instruction]` (text guidance); `[negative, source + negative, source +
        instruction]` (image guidance, `apply_dual_guidance`); the negative prompt defaults to `""`. Returns
        `(input_ids, attention_mask, n_image_tokens, context_latents)`, the last giving each row's source or None.
        """
        image = self.processor.image_token
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = negative_prompt if negative_prompt is not None else ""
        negatives = [negatives] * len(prompts) if isinstance(negatives, str) else list(negatives)
        size = (height, width)

        def rows(with_source: bool, texts: list[str]):
            for i, text in enumerate(texts):
                for _ in range(num_images_per_prompt):
                    if with_source:
                        yield image + text + image, [size, size], source_latents[i]
                    else:
                        yield text + image, [size], None

        branches = [rows(True, prompts)]
        if self._num_branches >= 2:
            branches.insert(0, rows(True, negatives))
        if self._num_branches == 3:
            branches.insert(0, rows(False, negatives))
        texts, sizes, sources = zip(*(row for branch in branches for row in branch))
        input_ids, attention_mask, n_image_tokens = self.tokenize_image_rows(list(texts), list(sizes), height, width, device)
        return input_ids, attention_mask, n_image_tokens, list(sources)

    def preprocess_image(self, image, name: str = "image") -> torch.Tensor:
        """Images to encode -> pixels `(n, C, H, W)` in `[-1, 1]`.

        Accepts a PIL image or a list of them (converted by the processor's image processor), or images in `[0, 1]`
        as this pipeline returns them: a `(C, H, W)` / `(n, C, H, W)` tensor (`output_type="pt"`) or a `(H, W, C)` /
        `(n, H, W, C)` array (`"np"`), or a list of those; integer arrays and tensors (`np.array(pil_image)`,
        `pil_to_tensor`) are taken as `0..255`; a 2-D `(H, W)` array or tensor is one grayscale image (as
        `np.array(pil_image)` gives a mode "L" image). Every image must have the model's channel count and one size
        that fits the patch grid; errors name `name`.
        """
        items = list(image) if isinstance(image, (list, tuple)) else [image]
        if not items:
            raise ValueError(f"`{name}` is an empty list: pass at least one image.")
        pixels = []
        for item in items:
            if isinstance(item, PIL.Image.Image):
                x = self.processor.image_processor(item, return_tensors="pt")["pixel_values"]
            elif isinstance(item, (torch.Tensor, np.ndarray)):
                item = with_channel_axis(item)  # (H, W): one grayscale image
                x = torch.as_tensor(item) if isinstance(item, torch.Tensor) else torch.from_numpy(np.asarray(item))
                if x.ndim not in (3, 4):
                    raise ValueError(
                        f"`{name}` must be (H, W) grayscale, (C, H, W) / (n, C, H, W) tensors or (H, W, C) / "
                        f"(n, H, W, C) arrays in [0, 1], got shape {tuple(x.shape)}."
                    )
                x = x.unsqueeze(0) if x.ndim == 3 else x
                if isinstance(item, np.ndarray):
                    x = x.permute(0, 3, 1, 2)
                integer = not (x.is_floating_point() or x.dtype == torch.bool)
                x = x.float() / 255 if integer else x.float()  # uint8 pixels, as PIL images convert to arrays
                if x.numel() and (x.min() < -1e-3 or x.max() > 1 + 1e-3 or not bool(x.isfinite().all())):
                    raise ValueError(
                        f"`{name}` holds float values in [{x.min().item():.3g}, {x.max().item():.3g}]; float images "
                        "must be in [0, 1] (as this pipeline returns them). Pass uint8 pixels as integers (0..255), "
                        "and images in [-1, 1] as `(x + 1) / 2`."
                    )
                x = x * 2 - 1
            else:
                raise TypeError(
                    f"`{name}` must be a PIL image, a torch tensor or a numpy array (or a list of them), got "
                    f"{type(item).__name__}."
                )
            pixels.extend(x)
        expected = self.vae.config.in_channels if self.vae is not None else self.model.config.latent_channels
        unit = self.model.config.patch_size * self.vae_scale_factor
        for i, x in enumerate(pixels):
            which = f"`{name}` image {i}" if len(pixels) > 1 else f"`{name}`"
            if x.shape[0] != expected:
                stack_hint = (" A stack of grayscale images (n, H, W) needs a channel axis: `x[:, None]` (tensors) "
                              "or `x[..., None]` (arrays), or pass a list of (H, W) images." if expected == 1 else "")
                raise ValueError(
                    f"{which} has {x.shape[0]} channels but this pipeline's images have {expected}: pass "
                    f"{'grayscale' if expected == 1 else 'RGB'} images.{stack_hint}"
                )
            if x.shape[-2] % unit or x.shape[-1] % unit:
                raise ValueError(
                    f"{which} is {x.shape[-2]}x{x.shape[-1]} pixels; both sides must be multiples of "
                    f"patch_size * vae_scale_factor = {unit}: resize it."
                )
        if len({tuple(x.shape) for x in pixels}) > 1:
            raise ValueError(
                f"`{name}` images have different sizes {sorted({tuple(x.shape[-2:]) for x in pixels})}: resize them "
                "to one size."
            )
        return torch.stack(pixels)

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels `(n, C, H, W)` in `[-1, 1]` -> clean latents `(n, C, h, w)`: the VAE posterior's mean, shifted and
        scaled as in training (`encode_images` in the training data module), or the pixels for pixel-space models."""
        if self.vae is None:
            return pixels.to(device=self._execution_device, dtype=self.model.dtype)
        latents = self.vae.encode(pixels.to(device=self.vae.device, dtype=self.vae.dtype)).latent_dist.mean
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * self.vae.config.scaling_factor).to(self.model.dtype)

    def prepare_source_latents(
        self, pixels: torch.Tensor, batch_size: int, height: int, width: int, device
    ) -> torch.Tensor:
        """The edit sources' clean latents, one per prompt `(batch_size, C, h, w)` (a single source serves every
        prompt); the edited image has the source's size."""
        if pixels.shape[0] not in (1, batch_size):
            raise ValueError(
                f"`image` holds {pixels.shape[0]} source images for {batch_size} prompts: pass one per prompt, or one "
                "for all."
            )
        if tuple(pixels.shape[-2:]) != (height, width):
            raise ValueError(
                f"`image` is {pixels.shape[-2]}x{pixels.shape[-1]} pixels but `height`x`width` is {height}x{width}: "
                "an edit keeps the source's size; leave `height`/`width` unset or resize the source."
            )
        latents = self.encode_image(pixels).to(device)
        return latents.expand(batch_size, *latents.shape[1:]) if latents.shape[0] == 1 else latents

    def prepare_latents(self, batch_size, num_channels, height, width, dtype, device, generator, latents=None):
        """Draw the initial noise with `randn_tensor` (or take `latents`) and scale it by `init_noise_sigma`."""
        shape = (batch_size, num_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        generators = generator if isinstance(generator, list) else [generator]
        if generator is not None and not all(isinstance(g, torch.Generator) for g in generators):
            raise TypeError(
                f"`generator` must be a torch.Generator (e.g. `torch.Generator().manual_seed(0)`) or a list of them, "
                f"got {generator!r}."
            )
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"`generator` is a list of {len(generator)} generators but {batch_size} images are made (batch size x "
                "num_images_per_prompt): pass one generator per image, or a single one."
            )
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            latents = latents.to(device=device, dtype=dtype)
        # FlowMatch schedulers have no init_noise_sigma (their noise has unit variance).
        return latents * getattr(self.scheduler, "init_noise_sigma", 1.0)

    @torch.no_grad()
    def prepare_context(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.LongTensor,
        n_image_tokens: int,
        use_prefix_cache: bool = True,
        context_latents: list[torch.Tensor | None] | None = None,
    ) -> MonoFormerDenoisingContext:
        """Run the prefix (text and `<boi>`) once into a `DynamicCache`; the denoising steps then run the image block.

        Position ids count only real tokens (`cumsum - 1` of the 2D mask), so a left-padded row gets the same positions
        as it would alone, in the prefix and in the image block alike. `context_latents`: per row, the clean latent of
        the context image in its prefix (an editing source, `t = 0`) or None.
        """
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        if not use_prefix_cache:
            return MonoFormerDenoisingContext(input_ids, attention_mask, position_ids, context_latents=context_latents)
        prefix_len = input_ids.shape[1] - n_image_tokens
        sources = [x for x in context_latents or [] if x is not None]
        # Full (non-sliding) cache layers for every layer: a sliding-window layer would drop prefix keys that
        # `crop` cannot restore. The sliding masks still limit what each layer attends to.
        cache = DynamicCache()
        self.model(
            input_ids=input_ids[:, :prefix_len],
            attention_mask=attention_mask[:, :prefix_len],
            position_ids=position_ids[:, :prefix_len],
            latents=torch.stack(sources) if sources else None,
            timesteps=torch.zeros(len(sources), device=input_ids.device) if sources else None,
            cache=cache,
            use_cache=True,
            logits_to_keep=no_logits(input_ids.device),
        )
        return MonoFormerDenoisingContext(
            input_ids=input_ids[:, prefix_len:],
            attention_mask=attention_mask,
            position_ids=position_ids[:, prefix_len:],
            cache=cache,
        )

    def predict(
        self, context: MonoFormerDenoisingContext, latents: torch.Tensor, t: torch.Tensor, branches: int = 1
    ) -> torch.Tensor:
        """One model evaluation at step `t`: the diffusion head's output for each row of `context`, whose rows are
        `branches` guidance branches of `latents`' `B` images each (branch by branch). Every image goes in once per
        branch as the same tensor object, so the model embeds it once (`shared_image_sources`)."""
        images = list(latents.unbind(0)) * branches  # [(C, h, w)] per row of `context`
        timesteps = t.reshape(1).expand(len(images)).to(latents.device)
        model_latents, noisy_index = images, None
        if context.cache is None and context.context_latents is not None:
            # Naive path: each row's clean context image (t = 0) comes before its noisy image, in sequence order.
            model_latents, image_timesteps, noisy_index = [], [], []
            for source, x_t, t_row in zip(context.context_latents, images, timesteps):
                if source is not None:
                    model_latents.append(source.to(x_t))
                    image_timesteps.append(torch.zeros_like(t_row))
                noisy_index.append(len(model_latents))
                model_latents.append(x_t)
                image_timesteps.append(t_row)
            timesteps = torch.stack(image_timesteps)
        output = self.model(
            input_ids=context.input_ids,
            attention_mask=context.attention_mask,
            position_ids=context.position_ids,
            latents=model_latents,
            timesteps=timesteps,
            cache=context.cache,
            use_cache=context.cache is not None,
            logits_to_keep=no_logits(latents.device),
        )
        if context.cache is not None:
            context.cache.crop(-context.input_ids.shape[1])  # roll back to the prefix (5.x: negative count)
        outputs = output.diffusion_output  # [(C_out, h, w)], one per image of `model_latents`
        return torch.stack([outputs[i] for i in noisy_index] if noisy_index is not None else outputs)

    def denoise(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        context: MonoFormerDenoisingContext,
        cond_context: MonoFormerDenoisingContext | None,
        guided_steps: list[bool],
        extra_step_kwargs: dict,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = (),
    ) -> torch.Tensor:
        """The denoising loop. A guided step runs every guidance branch (`self._num_branches` rows per image, in
        `context`) and combines them with the call's guider (`apply_guidance`); an unguided one runs the conditional
        rows alone (`cond_context`, or `context` when it holds only those)."""
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                scale = self._guidance_scale
                if scale is not None and self._num_branches == 3:  # an edit: text guidance <= 1 is none (s_T = 1)
                    scale = max(scale, 1.0)
                if scale is not None and scale != self._call_guider.guidance_scale:  # a callback changed it
                    self._call_guider.guidance_scale = scale
                self._call_guider.set_state(step=i, num_inference_steps=len(timesteps), timestep=t)
                # Text guidance cut to <= 1 mid-call: the conditional rows alone (an edit keeps its image guidance).
                guided = guided_steps[i] and (self._num_branches == 3 or scale is None or scale > 1)
                model_input = latents
                if hasattr(self.scheduler, "scale_model_input"):  # Euler scales by sigma; FlowMatch has none
                    model_input = self.scheduler.scale_model_input(model_input, t)
                if guided:
                    output = self.predict(context, model_input, t, self._num_branches)
                elif cond_context is not None or not guided_steps[i]:  # without `cond_context`, `context` is cond
                    output = self.predict(cond_context if cond_context is not None else context, model_input, t)
                else:  # cut mid-call where every step was guided: the conditional rows of the guided context
                    output = self.predict(context, model_input, t, self._num_branches).chunk(self._num_branches)[-1]
                model_output = self.apply_guidance(output, guided)
                latents = self.scheduler.step(model_output, t, latents, **extra_step_kwargs, return_dict=False)[0]

                if callback_on_step_end is not None:
                    callback_kwargs = {}
                    for k in callback_on_step_end_tensor_inputs:  # a loop: a comprehension has its own locals()
                        callback_kwargs[k] = locals()[k]
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    if not isinstance(callback_outputs, dict):
                        raise TypeError(
                            "`callback_on_step_end` must return a dict (the `callback_kwargs` it received, changed or "
                            f"not), got {type(callback_outputs).__name__} at step {i}."
                        )
                    latents = callback_outputs.pop("latents", latents)
                progress_bar.update()
        return latents

    def prepare_guider(
        self, guidance_scale: float | None, guidance_start: float | None, guidance_stop: float | None
    ) -> BaseGuidance:
        """The guider of this call: a copy of `self.guider` (`guider.new`, keeping its current scale and enabled state)
        with the call's explicit `guidance_scale` / `guidance_start` / `guidance_stop` applied; the component itself is
        left as it is.

        A `guidance_scale <= 1` or an empty interval (`guidance_start == guidance_stop`) turns guidance off for the
        call: every step runs the conditional rows alone. The call always runs a copy, so a callback that changes the
        scale mid-call (`pipe._guidance_scale`) never changes the component.
        """
        component = self.default_guider()
        check_guider(component)  # `pipe.guider = ...` may have replaced it since __init__
        for name, value in (("guidance_start", guidance_start), ("guidance_stop", guidance_stop)):
            if value is not None and (not is_number(value) or not 0.0 <= value <= 1.0):
                raise ValueError(f"`{name}` must be a fraction of the denoising steps in [0, 1], got {value!r}.")
        start = component.config.get("start", 0.0) if guidance_start is None else guidance_start
        stop = component.config.get("stop", 1.0) if guidance_stop is None else guidance_stop
        if start > stop:
            raise ValueError(
                f"`guidance_start` ({start}) must not exceed `guidance_stop` ({stop}) (either may come from the "
                f"guider's config: start={component.config.get('start')}, stop={component.config.get('stop')})."
            )
        overrides = {}
        if hasattr(component, "guidance_scale"):  # set on the object after construction: not in its config
            overrides["guidance_scale"] = component.guidance_scale
        if guidance_scale is not None:
            overrides["guidance_scale"] = guidance_scale
        empty = start == stop
        if (guidance_start is not None or guidance_stop is not None) and not empty:
            overrides.update(start=start, stop=stop)
        disable = empty or (guidance_scale is not None and guidance_scale <= 1.0) or not component._enabled
        guider_logger = logging.getLogger(type(component).__module__.rsplit(".", 1)[0] + ".guider_utils")
        level = guider_logger.level
        guider_logger.setLevel(logging.ERROR)  # the "experimental" notice was already given for the component
        try:
            guider = component.new(**overrides)
        finally:
            guider_logger.setLevel(level)
        if disable:
            guider.disable()
        # what `pipe.guidance_scale` reads, and a callback may change (None for a guider without a scale)
        self._guidance_scale = getattr(guider, "guidance_scale", None)
        return guider

    def guided_steps(self, guider: BaseGuidance, timesteps: torch.Tensor) -> list[bool]:
        """Which steps the guider guides (two predictions per image) for this schedule."""
        flags = []
        for i, t in enumerate(timesteps):
            guider.set_state(step=i, num_inference_steps=len(timesteps), timestep=t)
            flags.append(guider.num_conditions > 1)
        return flags

    def apply_guidance(self, model_output: torch.Tensor, guided: bool | None = None) -> torch.Tensor:
        """Combine the rows of one step with the call's guider (its state set for the step).

        `guided=True`: `model_output` holds the branches in order, conditional last: `[uncond, cond]`; for an edit
        with image guidance `[uncond, source only, source + instruction]` (`apply_dual_guidance`). The guider combines
        the last two on the first `guidance_channels` prediction channels (the others come from the conditional
        branch). `guided=False`: the conditional rows only (a step outside the guidance interval). Learned variance
        channels (`learn_sigma`) come from the conditional branch and reach the scheduler only if its
        `variance_type` is learned.
        """
        guider = self._call_guider
        branches = getattr(self, "_num_branches", 2)
        if guided is None:
            guided = branches > 1 and guider.num_conditions > 1
        channels = self.model.config.latent_channels
        prediction, variance = model_output[:, :channels], model_output[:, channels:]
        rows = prediction.chunk(branches) if guided else (prediction,)
        uncond, cond = (rows[-2], rows[-1]) if guided else (None, prediction)
        if guided:
            variance = variance.chunk(branches)[-1]
        k = getattr(self, "_guidance_channels", channels)
        if guided:
            predictions = {"pred_cond": cond[:, :k], "pred_uncond": uncond[:, :k]}
            states = guider.prepare_inputs({})  # one state per prediction the guider needs at this step
            for state in states:
                state.noise_pred = predictions[getattr(state, guider._identifier_key)]
            guided_part = guider(states).pred
        else:  # what every guider returns for one prediction (also where a callback cut the scale to <= 1)
            guided_part = cond[:, :k]
        if guided and branches == 3:
            guided_part = self.apply_dual_guidance(guided_part, rows[1][:, :k], rows[0][:, :k])
        prediction = torch.cat([guided_part, cond[:, k:]], dim=1)
        if variance.shape[1] and getattr(self.scheduler.config, "variance_type", None) in LEARNED_VARIANCE_TYPES:
            return torch.cat([prediction, variance], dim=1)
        return prediction

    def apply_dual_guidance(
        self, text_guided: torch.Tensor, pred_image: torch.Tensor, pred_uncond: torch.Tensor
    ) -> torch.Tensor:
        """InstructPix2Pix's dual classifier-free guidance (Brooks et al., 2023, eq. 3),
        `uncond + s_T (full - image) + s_I (image - uncond)`, written as the guider's text guidance between the
        source-only and the full branch, `text_guided = image + s_T (full - image)`, plus the image term
        `(s_I - 1) (image - uncond)`; `pred_image` is conditioned on the source alone, `pred_uncond` on neither. With
        `ClassifierFreeGuidance` this is exactly eq. 3; another guider shapes the text term its way. diffusers' guiders
        combine one conditional and one unconditional prediction, so the third branch is added here."""
        return text_guided + (self.image_guidance_scale - 1.0) * (pred_image - pred_uncond)

    def prepare_extra_step_kwargs(self, generator) -> dict:
        """`generator` for the schedulers whose `step` samples noise (DDPM, stochastic samplers)."""
        if "generator" in inspect.signature(self.scheduler.step).parameters:
            return {"generator": generator}
        return {}

    def decode_latents(self, latents: torch.Tensor, output_type: str):
        """Latents -> images in `output_type` (pixel-space models: the latents are the image in [-1, 1])."""
        if output_type == "latent":
            return latents
        if self.vae is not None:
            latents = latents / self.vae.config.scaling_factor
            if getattr(self.vae.config, "shift_factor", None) is not None:
                latents = latents + self.vae.config.shift_factor
            image = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
        else:
            image = latents
        return self.image_processor.postprocess(image.float(), output_type=output_type)

    # ------------------------------------------------------------------------------------------------------ call
    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, int, dict], dict]
        | PipelineCallback
        | MultiPipelineCallbacks
        | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        use_prefix_cache: bool = True,
        guidance_channels: int | None = None,
        guidance_start: float | None = None,
        guidance_stop: float | None = None,
        image: PIL.Image.Image | np.ndarray | torch.Tensor | list | None = None,
        image_guidance_scale: float | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Generate images from text, or edit `image` following the instruction in `prompt`.

        Args:
            prompt (`str` or `list[str]`): The prompt(s).
            negative_prompt (`str` or `list[str]`, *optional*): The unconditional branch of CFG (default `""`, i.e.
                just `<boi>`, the layout of the prompts dropped in training).
            height (`int`, *optional*), width (`int`, *optional*): Image size in pixels, multiples of
                `patch_size * vae_scale_factor`; default `config.sample_size * vae_scale_factor`.
            num_inference_steps (`int`, *optional*): Denoising steps; default `pipe.config.default_num_inference_steps`
                (the count the checkpoint was tuned with; 50 for a new pipeline).
            guidance_scale (`float`, *optional*): Overrides the guider's `guidance_scale` for this call; `<= 1` runs
                the conditional branch alone. Default: the guider's (`pipe.guider`, 4.0 unless the checkpoint saved
                another).
            num_images_per_prompt (`int`, defaults to 1): Images per prompt.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): Makes sampling deterministic.
            latents (`torch.Tensor`, *optional*): Initial noise, `(batch, C, height / f, width / f)`.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"`, `"pt"` or `"latent"`.
            return_dict (`bool`, defaults to `True`): Return an [`ImagePipelineOutput`] rather than a tuple.
            callback_on_step_end (*optional*): Called as `callback_on_step_end(self, i, t, callback_kwargs)` after each
                step; may return a dict replacing the tensors named in `callback_on_step_end_tensor_inputs`.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*): Subset of `["latents"]`.
            use_prefix_cache (`bool`, defaults to `True`): Run the prompt once into a KV cache; `False` recomputes the
                whole sequence at every step (same result, slower: for tests and benchmarks).
            guidance_channels (`int`, *optional*): Guide only the first `guidance_channels` prediction channels; the
                others come from the conditional branch. `3` reproduces the original MonoFormer/DiT sampler (recorded
                as `guidance_channels` in `monoformer_original.json` by the converter). Default: every channel.
            guidance_start (`float`, *optional*), guidance_stop (`float`, *optional*): Override the guider's
                `start`/`stop` for this call: guidance runs only on the denoising steps in `[int(start * N),
                int(stop * N))` (fractions of the N steps, as diffusers' `ClassifierFreeGuidance(start=, stop=)`); the
                other steps run the conditional rows alone, so they cost one network evaluation per image instead of
                two. Guidance on a limited interval of noise levels keeps the prompt adherence of CFG with less loss of
                diversity (Kynkäänniemi et al., 2024). Default: the guider's (every step unless the checkpoint saved
                an interval).

            Explicit `guidance_scale`, `guidance_start` and `guidance_stop` win over the guider's settings; the call
            then runs a copy of the guider (`pipe.guider.new(...)`), so `pipe.guider` is left unchanged. Without them
            the call runs `pipe.guider` as configured, which is how a saved checkpoint carries its tuned sampler.
            image (PIL image, array, tensor or a list of them, *optional*): The source image(s) of an edit (one per
                prompt, or one for all), as `preprocess_image` takes them (tensors / arrays in `[0, 1]`, as this
                pipeline outputs them). The source goes in clean (`t = 0`) before the instruction `prompt`; the edited
                image, of the source's size, is generated after it: `<boi> source <eoi> instruction <boi> edit <eoi>`.
            image_guidance_scale (`float`, *optional*, defaults to 1.5 with `image`): Image guidance of an edit
                (InstructPix2Pix's `s_I`): with `> 1` each guided step runs three branches (no source and no
                instruction; source only; source and instruction), the guider guiding the text between the last two
                and `apply_dual_guidance` adding the image term. It runs on the guider's guided steps, or on every
                step when text guidance is off. `<= 1`: text guidance only (the source in both branches).

        Examples:

        Returns:
            [`ImagePipelineOutput`] or `tuple`: the images (first element of the tuple).
        """
        config = self.model.config
        if num_inference_steps is None:
            num_inference_steps = self.config.default_num_inference_steps
        source_pixels = None
        if image is not None:
            source_pixels = self.preprocess_image(image, "image")
            height = source_pixels.shape[-2] if height is None else height
            width = source_pixels.shape[-1] if width is None else width
        elif image_guidance_scale is not None:
            raise ValueError(
                f"`image_guidance_scale`={image_guidance_scale!r} was given without `image`: an edit needs its source "
                "image (`pipe(prompt=instruction, image=source)`); drop `image_guidance_scale` for text-to-image."
            )
        height = config.sample_size * self.vae_scale_factor if height is None else height  # 0 is refused, not defaulted
        width = config.sample_size * self.vae_scale_factor if width is None else width
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        callback_on_step_end_tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]

        # 1. Check inputs
        self.check_inputs(
            prompt,
            negative_prompt,
            height,
            width,
            num_inference_steps,
            guidance_scale,
            num_images_per_prompt,
            latents,
            output_type,
            callback_on_step_end_tensor_inputs,
        )
        height, width, num_inference_steps = int(height), int(width), int(num_inference_steps)  # numpy ints too
        num_images_per_prompt = int(num_images_per_prompt)
        guidance_scale = None if guidance_scale is None else float(guidance_scale)
        channels = self.model.config.latent_channels
        if guidance_channels is not None and (
            not isinstance(guidance_channels, int) or not 1 <= guidance_channels <= channels
        ):
            raise ValueError(f"`guidance_channels` must be an int in [1, {channels}], got {guidance_channels!r}.")
        self._guidance_channels = guidance_channels or channels
        self._call_guider = self.prepare_guider(guidance_scale, guidance_start, guidance_stop)
        if image_guidance_scale is None:
            image_guidance_scale = 1.5  # InstructPix2Pix's default
        if not is_number(image_guidance_scale) or not math.isfinite(image_guidance_scale) or image_guidance_scale < 0:
            raise ValueError(
                f"`image_guidance_scale` must be a finite number >= 0 (<= 1 disables image guidance), got "
                f"{image_guidance_scale!r}."
            )
        self._image_guidance_scale = image_guidance_scale = float(image_guidance_scale)
        self._interrupt = False
        batch_size = 1 if isinstance(prompt, str) else len(prompt)
        device = self._execution_device

        # 2. Prepare timesteps and which of them the guider guides (an edit's image guidance: every step without it)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        self._guided_steps = self.guided_steps(self._call_guider, timesteps)
        image_guided = image is not None and image_guidance_scale > 1
        if image_guided and not any(self._guided_steps):
            self._guided_steps = [True] * len(timesteps)
        self._num_branches = 3 if image_guided else 2 if self.do_classifier_free_guidance else 1

        # 3. Tokenize prompt (+ negative prompt) with the image block; an edit puts the clean source before the text
        if image is None:
            input_ids, attention_mask, n_image_tokens = self.encode_prompt(
                prompt, negative_prompt, num_images_per_prompt, self.do_classifier_free_guidance, height, width, device
            )
            context_latents = None
        else:
            source_latents = self.prepare_source_latents(source_pixels, batch_size, height, width, device)
            input_ids, attention_mask, n_image_tokens, context_latents = self.encode_edit_prompt(
                prompt, negative_prompt, source_latents, num_images_per_prompt, height, width, device
            )

        # 4. Prepare latents
        latents = self.prepare_latents(
            batch_size * num_images_per_prompt,
            config.latent_channels,
            height,
            width,
            self.model.dtype,
            device,
            generator,
            latents,
        )

        # 5. Run the prefix once into the KV cache (and the conditional rows alone for unguided steps)
        context = self.prepare_context(input_ids, attention_mask, n_image_tokens, use_prefix_cache, context_latents)

        extra_step_kwargs = self.prepare_extra_step_kwargs(generator)
        cond_context = None
        if self._num_branches > 1 and not all(self._guided_steps):
            n = latents.shape[0]  # the conditional rows come last
            cond_context = self.prepare_context(
                input_ids[-n:], attention_mask[-n:], n_image_tokens, use_prefix_cache,
                None if context_latents is None else context_latents[-n:],
            )

        # 6. Denoising loop
        latents = self.denoise(
            latents, timesteps, context, cond_context, self._guided_steps, extra_step_kwargs, callback_on_step_end,
            callback_on_step_end_tensor_inputs,
        )

        # 7. Decode and post-process
        image = self.decode_latents(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)

    # ------------------------------------------------------------------------------------------------------ interleaved
    def check_interleaved_inputs(
        self, prompt, images, max_new_tokens, height, width, num_inference_steps, guidance_scale, output_type,
        generate_kwargs,
    ):
        """Validate the arguments of `generate_interleaved` before any compute; errors name the argument."""
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(
                f"`prompt` must be one non-empty string (interleaved generation runs one sequence), got {prompt!r}."
            )
        for special in (self.processor.boi_token, self.processor.eoi_token):
            if special in prompt:
                raise ValueError(
                    f"`prompt` contains {special!r}: write `{self.processor.image_token}` where an input image goes "
                    "(the pipeline adds `<boi>`/`<eoi>`); the model itself decides when to start an image."
                )
        n_markers = prompt.count(self.processor.image_token)
        n_images = count_images(images)
        if n_markers != n_images:
            raise ValueError(
                f"`prompt` has {n_markers} `{self.processor.image_token}` marker(s) but `images` holds {n_images} "
                f"image(s): write one `{self.processor.image_token}` where each input image goes."
            )
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"`max_new_tokens` must be an integer >= 1, got {max_new_tokens!r}.")
        # The text around the markers and the sampler arguments are checked as `__call__` checks them.
        self.check_inputs(
            prompt.replace(self.processor.image_token, ""), None, height, width, num_inference_steps, guidance_scale,
            1, None, output_type, None,
        )
        for name in ("num_beams", "num_return_sequences"):
            if generate_kwargs.get(name, 1) != 1:
                raise ValueError(
                    f"`{name}`={generate_kwargs[name]} is not supported: interleaved generation follows one sequence "
                    "(greedy or sampled decoding)."
                )

    @staticmethod
    def stack_contexts(contexts: list[MonoFormerDenoisingContext]) -> MonoFormerDenoisingContext:
        """Batch cached contexts whose prefixes differ in length (one row each): prefixes are left-padded in the cache
        (zero keys/values that the 2D mask hides), as `encode_prompt`'s left-padded rows are."""
        lengths = [c.cache.get_seq_length() for c in contexts]
        longest = max(lengths)

        def pad(x: torch.Tensor, length: int) -> torch.Tensor:  # (B, H, length, d) -> (B, H, longest, d)
            return torch.nn.functional.pad(x, (0, 0, longest - length, 0))

        layers = []
        for per_layer in zip(*(c.cache.layers for c in contexts)):
            keys = torch.cat([pad(layer.keys, n) for layer, n in zip(per_layer, lengths)])
            values = torch.cat([pad(layer.values, n) for layer, n in zip(per_layer, lengths)])
            layers.append((keys, values))
        masks = [torch.nn.functional.pad(c.attention_mask, (longest - n, 0)) for c, n in zip(contexts, lengths)]
        return MonoFormerDenoisingContext(
            input_ids=torch.cat([c.input_ids for c in contexts]),
            attention_mask=torch.cat(masks),
            position_ids=torch.cat([c.position_ids for c in contexts]),
            cache=DynamicCache(ddp_cache_data=layers),
        )

    def generate_image_in_context(
        self,
        sequences: torch.LongTensor,
        cache: DynamicCache,
        height: int,
        width: int,
        num_inference_steps: int,
        guidance_scale: float | None,
        guidance_start: float | None,
        guidance_stop: float | None,
        generator,
    ) -> torch.Tensor:
        """Denoise one image after `sequences` (which ends with `<boi>`), whose KV cache holds all of it but `<boi>`.

        The conditional branch runs the image block against that cache; the guider's guided steps add, in the same
        batch, the unconditional row of text-to-image training (`encode_prompt("")`: `<boi>` alone), its short prefix
        left-padded next to the long one (`stack_contexts`). The cache ends as it started, plus `<boi>`. Returns the
        clean latents `(1, C, h, w)`.
        """
        device = sequences.device
        # `<boi>` into the cache
        self.model(input_ids=sequences[:, -1:], cache=cache, use_cache=True, logits_to_keep=no_logits(device))
        n_image_tokens = self.processor.num_image_tokens(height, width)
        length = sequences.shape[1]
        block = torch.full((1, n_image_tokens), self.processor.image_token_id, dtype=torch.long, device=device)
        cond_context = MonoFormerDenoisingContext(
            input_ids=block,
            attention_mask=torch.ones(1, length + n_image_tokens, dtype=torch.long, device=device),
            position_ids=torch.arange(length, length + n_image_tokens, device=device).unsqueeze(0),
            cache=cache,
        )
        self._call_guider = self.prepare_guider(guidance_scale, guidance_start, guidance_stop)
        self._guidance_channels = self.model.config.latent_channels
        self._interrupt = False
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        self._guided_steps = self.guided_steps(self._call_guider, timesteps)
        self._num_branches = 2 if self.do_classifier_free_guidance else 1
        context = cond_context
        if self.do_classifier_free_guidance:
            uncond_ids, uncond_mask, _ = self.encode_prompt("", None, 1, False, height, width, device)
            uncond_context = self.prepare_context(uncond_ids, uncond_mask, n_image_tokens)
            context = self.stack_contexts([uncond_context, cond_context])
        latents = self.prepare_latents(
            1, self.model.config.latent_channels, height, width, self.model.dtype, device, generator
        )
        return self.denoise(
            latents, timesteps, context, cond_context, self._guided_steps, self.prepare_extra_step_kwargs(generator)
        )

    @torch.no_grad()
    def generate_interleaved(
        self,
        prompt: str,
        images=None,
        max_new_tokens: int = 256,
        streamer: BaseStreamer | None = None,
        generator: torch.Generator | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        guidance_start: float | None = None,
        guidance_stop: float | None = None,
        height: int | None = None,
        width: int | None = None,
        output_type: str = "pil",
        **generate_kwargs,
    ) -> MonoFormerInterleavedOutput:
        r"""
        Write text and images in one sequence: the model decodes text with the KV cache; when it emits `<boi>` an image
        of `height x width` is denoised inside the same cache (its prefix cached, CFG batched, `denoise`), appended as
        clean context (`t = 0`), `<eoi>` follows, and decoding goes on until EOS or `max_new_tokens`.

        Text decoding is `model.generate` (greedy by default; `do_sample`, `temperature`, `top_k`, `logits_processor`
        ... pass through `generate_kwargs`) with `<boi>` as an extra stop token, so every text segment gets the
        stock sampling, logits processors and streaming; each segment continues the same `DynamicCache`.

        Args:
            prompt (`str`): The text so far; one `<image>` where each input image goes (understanding, VQA).
            images (*optional*): The prompt's images (PIL, arrays or tensors, see `preprocess_image`), in order; sizes
                may differ. Encoded with the VAE when there is one and read clean (`t = 0`).
            max_new_tokens (`int`, defaults to 256): Budget of generated text tokens (each `<boi>` counts; image
                tokens do not). Generation also stops before an image that would not fit `max_position_embeddings`.
            streamer (`BaseStreamer`, *optional*): Receives the generated token ids as one stream (`<boi>` and
                `<eoi>` mark each image), e.g. `TextStreamer(tokenizer, skip_special_tokens=True)`; `end()` once.
            generator (`torch.Generator`, *optional*): The images' noise. Sampled text uses torch's global RNG, as
                `generate` does.
            num_inference_steps (`int`, *optional*), guidance_scale (`float`, *optional*), guidance_start
                (`float`, *optional*), guidance_stop (`float`, *optional*): As in `__call__`, for every image: by
                default the pipeline's `default_num_inference_steps` and its guider (the checkpoint's tuned sampler).
            height (`int`, *optional*), width (`int`, *optional*): Size of generated images; default
                `config.sample_size * vae_scale_factor`.
            output_type (`str`, defaults to `"pil"`): Images in `segments` as `"pil"`, `"np"`, `"pt"` or `"latent"`.

        Returns:
            [`MonoFormerInterleavedOutput`]: `segments` (text strings and images in order), `sequences`,
            `image_latents` and `cache`.

        Example:

        ```py
        >>> from transformers import TextStreamer
        >>> out = pipe.generate_interleaved("Show me a picture of a sneaker.",
        ...                                 streamer=TextStreamer(pipe.processor.tokenizer, skip_special_tokens=True))
        >>> [type(s).__name__ for s in out.segments]
        ['str', 'Image', 'str']
        ```
        """
        config = self.model.config
        height = config.sample_size * self.vae_scale_factor if height is None else height  # 0 is refused, not defaulted
        width = config.sample_size * self.vae_scale_factor if width is None else width
        if num_inference_steps is None:
            num_inference_steps = self.config.default_num_inference_steps
        self.check_interleaved_inputs(
            prompt, images, max_new_tokens, height, width, num_inference_steps, guidance_scale, output_type,
            generate_kwargs,
        )
        device = self._execution_device
        tokenizer = self.processor.tokenizer

        # 1. The prompt, its images as clean latents (the VAE encodes them), and the stop tokens
        items = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
        pixels = [x[None] for i, item in enumerate(items) for x in self.preprocess_image(item, f"images[{i}]")]
        image_latents = [self.encode_image(x)[0] for x in pixels]  # one (C, h, w) per image, a batched item's too
        sizes = [tuple(x.shape[-2:]) for x in pixels]
        sequences = self.processor(text=prompt, image_sizes=[sizes], return_tensors="pt")["input_ids"].to(device)
        boi, eoi = self.processor.boi_token_id, self.processor.eoi_token_id
        eos = generate_kwargs.pop("eos_token_id", None)
        eos = self.model.generation_config.eos_token_id if eos is None else eos
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        generate_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or [boi])[0])
        # The pipeline writes each image's placeholders and its `<eoi>`: text never does (a stray one would be read
        # as a placeholder without an image, and `sequences` would no longer recompute).
        suppress = [self.processor.image_token_id, eoi]
        generate_kwargs["suppress_tokens"] = [*(generate_kwargs.get("suppress_tokens") or []), *suppress]
        max_positions = config.trained_position_limit  # the model's rule: a scaled RoPE has none
        n_image_tokens = self.processor.num_image_tokens(height, width)
        segment_streamer = _SegmentStreamer(streamer) if streamer is not None else None

        # 2. Text until `<boi>` / EOS / the budget; an image after each `<boi>`
        cache = DynamicCache()
        segments, budget = [], max_new_tokens
        while budget > 0:
            room = budget if max_positions is None else min(budget, max_positions - sequences.shape[1])
            if room < 1:
                break
            prompt_images = {}
            if cache.get_seq_length() == 0 and image_latents:  # prefill: the prompt's images, clean
                prompt_images = {"latents": image_latents, "timesteps": torch.zeros(len(image_latents), device=device)}
            output = self.model.generate(
                input_ids=sequences, attention_mask=torch.ones_like(sequences), cache=cache, max_new_tokens=room,
                eos_token_id=[boi, *eos], streamer=segment_streamer, **prompt_images, **generate_kwargs,
            )
            new_tokens = output[0, sequences.shape[1] :]
            budget -= new_tokens.numel()
            sequences = output
            wants_image = new_tokens.numel() > 0 and int(new_tokens[-1]) == boi
            text = tokenizer.decode(new_tokens[:-1] if wants_image else new_tokens, skip_special_tokens=True)
            if text:
                segments.append(text)
            if not wants_image:
                break
            if max_positions is not None and sequences.shape[1] + n_image_tokens + 1 > max_positions:
                logger.warning(
                    f"The model started an image at token {sequences.shape[1]}, but its {n_image_tokens} tokens would "
                    f"pass max_position_embeddings={max_positions}: generation stops there."
                )
                break
            latents = self.generate_image_in_context(
                sequences, cache, height, width, num_inference_steps, guidance_scale, guidance_start, guidance_stop,
                generator,
            )
            # The finished image goes into the cache as clean context; `<eoi>` is the next step's input.
            block = torch.full((1, n_image_tokens), self.processor.image_token_id, dtype=torch.long, device=device)
            self.model(
                input_ids=block, attention_mask=torch.ones(1, sequences.shape[1] + n_image_tokens, device=device),
                latents=latents, timesteps=torch.zeros(1, device=device), cache=cache, use_cache=True,
                logits_to_keep=no_logits(device),
            )
            eoi_token = torch.tensor([[eoi]], device=device)
            sequences = torch.cat([sequences, block, eoi_token], dim=1)
            image_latents.append(latents[0])
            segments.append(self.decode_latents(latents, output_type)[0])
            if streamer is not None:
                streamer.put(eoi_token[0].cpu())
        if streamer is not None:
            streamer.end()
        self.maybe_free_model_hooks()
        return MonoFormerInterleavedOutput(
            segments=segments, sequences=sequences, image_latents=image_latents, cache=cache
        )

    # ------------------------------------------------------------------------------------------------------ saving
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str | None = None,
        push_to_hub: bool = False,
        **kwargs,
    ):
        """Save a self-contained folder: `DiffusionPipeline.from_pretrained(d, trust_remote_code=True)` loads it where
        the `modeling_monoformer` package is not installed.

        On top of diffusers' layout this copies this file to the root as `pipeline_monoformer.py`, with the sibling
        modules it imports (`scheduler_rules_monoformer.py`), and points `model_index.json` at the code files saved next
        to each custom component (`model/modeling_monoformer.py`, `processor/processing_monoformer.py`) instead of the
        importable package. `push_to_hub=True` uploads that folder.
        """
        self._check_vae(self.vae, self.model)  # a latent pipeline without its VAE would not load again
        hub_keys = ("commit_message", "private", "create_pr", "token", "repo_id")
        hub_kwargs = {k: kwargs.pop(k) for k in hub_keys if k in kwargs}
        super().save_pretrained(
            save_directory,
            safe_serialization=safe_serialization,
            variant=variant,
            max_shard_size=max_shard_size,
            push_to_hub=False,
            **kwargs,
        )
        self._make_self_contained(str(save_directory))
        if push_to_hub:
            repo_id = hub_kwargs.get("repo_id", os.path.basename(os.path.normpath(str(save_directory))))
            token = hub_kwargs.get("token")
            repo_id = hub_utils.create_repo(
                repo_id, exist_ok=True, private=hub_kwargs.get("private"), token=token
            ).repo_id
            model_card = hub_utils.populate_model_card(
                hub_utils.load_or_create_model_card(repo_id, token=token, is_pipeline=True)
            )
            model_card.save(os.path.join(save_directory, "README.md"))
            self._upload_folder(
                save_directory,
                repo_id,
                token=token,
                commit_message=hub_kwargs.get("commit_message"),
                create_pr=hub_kwargs.get("create_pr", False),
            )

    # ------------------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """Load a folder written by `save_pretrained` with **this** class and its installed sibling classes.

        A saved folder names its own code (`pipeline_monoformer.py`, `model/modeling_monoformer.py`, ...), so diffusers'
        loader would run that code (and demand `trust_remote_code=True`) whichever class it is called on. Called on
        this class, each component is built instead by the class of the same name installed next to this module
        (library components by their library), so no code from the folder runs and `isinstance` checks hold.
        `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` is untouched: it loads the folder's own
        code where this package is not installed. Components passed as keyword arguments are used as given;
        `dtype` (or its older name `torch_dtype`; a dict gives each component its own, `"default"` the rest),
        `device_map` (one device: the components are loaded onto it), `variant` and `use_safetensors` reach every
        torch component (`low_cpu_mem_usage` the diffusers ones); a Hub id is downloaded first (files only, no code
        runs; `revision`, `token`, `cache_dir`, `local_files_only` go to the download and mean nothing for a local
        folder).
        """
        path = str(pretrained_model_name_or_path)
        hub_kwargs = {k: kwargs.pop(k) for k in ("revision", "token", "cache_dir", "local_files_only") if k in kwargs}
        if not os.path.isdir(path):
            from huggingface_hub import snapshot_download

            path = snapshot_download(path, **hub_kwargs)
        dtype, torch_dtype = kwargs.pop("dtype", None), kwargs.pop("torch_dtype", None)
        if dtype is not None and torch_dtype is not None:
            raise ValueError("Pass `dtype` or its older name `torch_dtype`, not both.")
        dtype = torch_dtype if dtype is None else dtype
        device_map = kwargs.pop("device_map", None)
        if device_map is not None and (not isinstance(device_map, (str, int, torch.device)) or device_map in (
            "balanced", "auto"
        )):
            raise ValueError(
                f"`device_map={device_map!r}`: MonoFormer's pipeline runs one model, so it loads onto one device "
                "(`device_map='cuda'`, `'cpu'`, `0`, ...); to spread a large model, load the model with "
                "`MonoFormerForConditionalGeneration.from_pretrained(..., device_map='auto')` and pass it as `model=`."
            )
        weights_kwargs = {k: kwargs.pop(k) for k in ("variant", "use_safetensors") if kwargs.get(k) is not None}
        low_cpu_mem_usage = kwargs.pop("low_cpu_mem_usage", None)
        kwargs.pop("trust_remote_code", None)  # nothing from the folder runs here
        with open(os.path.join(path, "model_index.json")) as f:
            index = json.load(f)
        package = __name__.rpartition(".")[0]  # this module's package (a subclass may live anywhere)
        components = {}
        for name, entry in index.items():
            if name.startswith("_"):
                continue
            if name in kwargs or not isinstance(entry, list):  # a passed component, or a registered config value
                components[name] = kwargs.pop(name, entry)
                continue
            library, class_name = entry
            if library is None:
                components[name] = None
                continue
            module_name = library if library in LOADABLE_CLASSES or not package else f"{package}.{library}"
            component_cls = getattr(importlib.import_module(module_name), class_name)
            load_kwargs = {}
            folder = os.path.join(path, name)
            if issubclass(component_cls, torch.nn.Module):
                variant = weights_kwargs.get("variant")
                if variant is not None and not any(f".{variant}." in f for f in os.listdir(folder)):
                    raise ValueError(
                        f"You are trying to load the model files of the `variant={variant}`, but no such modeling "
                        f"files are available in {folder}: drop `variant` or save the pipeline with it."
                    )
                load_kwargs.update(weights_kwargs)
                component_dtype = dtype.get(name, dtype.get("default")) if isinstance(dtype, dict) else dtype
                if component_dtype is not None:
                    load_kwargs["dtype"] = component_dtype
                if device_map is not None:
                    load_kwargs["device_map"] = device_map
                if low_cpu_mem_usage is not None and not issubclass(component_cls, PreTrainedModel):
                    load_kwargs["low_cpu_mem_usage"] = low_cpu_mem_usage
            components[name] = component_cls.from_pretrained(folder, **load_kwargs)
        if kwargs:
            raise TypeError(f"Unexpected arguments for `{cls.__name__}.from_pretrained`: {sorted(kwargs)}.")
        return cls(**components)

    def _make_self_contained(self, save_directory: str) -> None:
        pipeline_file = inspect.getfile(type(self))
        pipeline_module = os.path.splitext(os.path.basename(pipeline_file))[0]
        for code_file in [pipeline_file, *get_relative_import_files(pipeline_file)]:  # diffusers loads these siblings
            shutil.copyfile(code_file, os.path.join(save_directory, os.path.basename(code_file)))

        index_file = os.path.join(save_directory, "model_index.json")
        with open(index_file) as f:
            index = json.load(f)
        index["_class_name"] = [pipeline_module, type(self).__name__]
        for name, entry in index.items():
            if name.startswith("_") or not isinstance(entry, list) or entry[0] is None or entry[0] in LOADABLE_CLASSES:
                continue
            component = getattr(self, name)
            module_file = os.path.basename(inspect.getfile(type(component)))
            if not os.path.isfile(os.path.join(save_directory, name, module_file)):
                raise ValueError(
                    f"`{name}` was saved without its code ({module_file}): register its class for an auto class "
                    "(`register_for_auto_class`) inside its module so that `save_pretrained` copies it."
                )
            index[name] = [os.path.splitext(module_file)[0], type(component).__name__]
        with open(index_file, "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
            f.write("\n")


__all__ = [
    "MonoFormerPipeline",
    "MonoFormerDenoisingContext",
    "MonoFormerInterleavedOutput",
    "check_guider",
    "check_scheduler_matches",
]
