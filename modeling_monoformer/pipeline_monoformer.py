"""MonoFormer text-to-image pipeline (diffusers `DiffusionPipeline`) with a prefix KV cache and batched CFG.

This file travels with saved checkpoints (it is copied to the root of the folder `save_pretrained` writes), so it may
import installed libraries only: no import from the `modeling_monoformer` package or its siblings.
"""

import importlib
import inspect
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from typing import Any, Callable

import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.guiders.guider_utils import BaseGuidance
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_loading_utils import LOADABLE_CLASSES
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import hub_utils, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor
from transformers import DynamicCache, PreTrainedModel, ProcessorMixin

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")
# Guiders that combine one conditional and one unconditional prediction run on the cached, batched denoising step.
GUIDER_PREDICTIONS = ("pred_cond", "pred_uncond")
DEFAULT_GUIDANCE_SCALE = 4.0

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


def check_scheduler_matches(scheduler, prediction_type: str) -> None:
    """Raise a `ValueError` if a diffusers scheduler cannot sample a model with this `prediction_type`.

    The training collator uses this same rule. It lives here so that this file needs
    no sibling module; for DPM-Solver with flow sigmas it also requires `prediction_type="flow_prediction"`.
    """
    name = type(scheduler).__name__
    use_flow_sigmas = bool(getattr(scheduler.config, "use_flow_sigmas", False))
    is_flow = "FlowMatch" in name or use_flow_sigmas
    if prediction_type == "flow":
        if not is_flow:
            raise ValueError(
                f"`scheduler` {name} is not a flow-matching scheduler but the model's `prediction_type` is 'flow': use "
                "FlowMatchEulerDiscreteScheduler (or DPMSolverMultistepScheduler with use_flow_sigmas=True, "
                "prediction_type='flow_prediction')."
            )
        sched_pred = getattr(scheduler.config, "prediction_type", "flow_prediction")
        if use_flow_sigmas and sched_pred != "flow_prediction":
            raise ValueError(
                f"`scheduler.config.prediction_type` is {sched_pred!r} but the model predicts a flow velocity: "
                "build it with `prediction_type='flow_prediction'`."
            )
        return
    if is_flow:
        raise ValueError(
            f"`scheduler` {name} is a flow-matching scheduler but the model's `prediction_type` is "
            f"{prediction_type!r}: use DDPM, DDIM, DPM-Solver++ or Euler."
        )
    sched_pred = getattr(scheduler.config, "prediction_type", prediction_type)
    if sched_pred != prediction_type:
        raise ValueError(
            f"`scheduler.config.prediction_type` is {sched_pred!r} but the model predicts {prediction_type!r}: "
            f"build it with `Scheduler.from_config(pipe.scheduler.config, prediction_type={prediction_type!r})`."
        )


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
            "in one batched pass. Use ClassifierFreeGuidance, AdaptiveProjectedGuidance, "
            "ClassifierFreeZeroStarGuidance, TangentialClassifierFreeGuidance or another two-prediction guider."
        )


@dataclass
class MonoFormerDenoisingContext:
    """What each denoising step feeds the model besides the latents.

    Cached path: `input_ids` is the image block only and `cache` holds the prefix; naive path: `input_ids` is the whole
    sequence and `cache` is None. `attention_mask` always spans prefix + image block (2D, left padding = 0).
    """

    input_ids: torch.LongTensor
    attention_mask: torch.LongTensor
    position_ids: torch.LongTensor
    cache: DynamicCache | None = None


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
        """The scale of the guider running the current (or last) call."""
        return self._call_guider.guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Whether any step of the current (or last) call is guided (the unconditional rows are encoded)."""
        return any(self._guided_steps)

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
            if not isinstance(value, int) or value <= 0 or value % unit:
                raise ValueError(
                    f"`{name}` must be a positive multiple of patch_size * vae_scale_factor = {unit}, got {value!r}."
                )
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be an integer >= 1, got {num_inference_steps!r}.")
        if guidance_scale is not None and (
            not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale) or guidance_scale < 0
        ):
            raise ValueError(
                f"`guidance_scale` must be a number >= 0 (<= 1 disables classifier-free guidance), got "
                f"{guidance_scale!r}."
            )
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
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
        batch = self.processor(
            text=[t + self.processor.image_token for t in texts],
            image_sizes=[[(height, width)]] * len(texts),
            padding=True,
            padding_side="left",
            return_tensors="pt",
        )
        input_ids = batch["input_ids"][:, :-1].to(device)  # drop <eoi>
        attention_mask = batch["attention_mask"][:, :-1].to(device)
        n_image_tokens = self.processor.num_image_tokens(height, width)
        if not bool((input_ids[:, -n_image_tokens:] == self.processor.image_token_id).all()):
            raise ValueError("The processor did not put the image block at the end of every row.")
        # Same rule as the model's `check_sequence_length`: a scaled RoPE decides its own context.
        text_config = self.model.config.text_config
        max_positions = getattr(text_config, "max_position_embeddings", None)
        rope_type = (getattr(text_config, "rope_parameters", None) or {}).get("rope_type", "default")
        if max_positions is not None and rope_type == "default" and input_ids.shape[1] > max_positions:
            raise ValueError(
                f"`prompt` + image is {input_ids.shape[1]} tokens ({n_image_tokens} for a {height}x{width} image), "
                f"more than the LLM's max_position_embeddings={max_positions}: shorten `prompt` or lower "
                "`height`/`width`."
            )
        return input_ids, attention_mask, n_image_tokens

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
    ) -> MonoFormerDenoisingContext:
        """Run the prefix (text and `<boi>`) once into a `DynamicCache`; the denoising steps then run the image block.

        Position ids count only real tokens (`cumsum - 1` of the 2D mask), so a left-padded row gets the same positions
        as it would alone, in the prefix and in the image block alike.
        """
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        if not use_prefix_cache:
            return MonoFormerDenoisingContext(input_ids, attention_mask, position_ids)
        prefix_len = input_ids.shape[1] - n_image_tokens
        # Full (non-sliding) cache layers for every layer: a sliding-window layer would drop prefix keys that
        # `crop` cannot restore. The sliding masks still limit what each layer attends to.
        cache = DynamicCache()
        self.model(
            input_ids=input_ids[:, :prefix_len],
            attention_mask=attention_mask[:, :prefix_len],
            position_ids=position_ids[:, :prefix_len],
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return MonoFormerDenoisingContext(
            input_ids=input_ids[:, prefix_len:],
            attention_mask=attention_mask,
            position_ids=position_ids[:, prefix_len:],
            cache=cache,
        )

    def predict(self, context: MonoFormerDenoisingContext, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """One model evaluation: the diffusion head's output for `latents` (one per row of `context`) at step `t`."""
        timesteps = t.reshape(1).expand(latents.shape[0]).to(latents.device)
        output = self.model(
            input_ids=context.input_ids,
            attention_mask=context.attention_mask,
            position_ids=context.position_ids,
            latents=latents,
            timesteps=timesteps,
            cache=context.cache,
            use_cache=context.cache is not None,
            logits_to_keep=1,
        )
        if context.cache is not None:
            context.cache.crop(-context.input_ids.shape[1])  # roll back to the prefix (5.x: negative count)
        return output.diffusion_output

    def prepare_guider(
        self, guidance_scale: float | None, guidance_start: float | None, guidance_stop: float | None
    ) -> BaseGuidance:
        """The guider of this call: `self.guider`, or a copy of it (`guider.new`) with the call's explicit
        `guidance_scale` / `guidance_start` / `guidance_stop` applied; the component itself is left as it is.

        A `guidance_scale <= 1` or an empty interval (`guidance_start == guidance_stop`) turns guidance off for the
        call: every step runs the conditional rows alone.
        """
        check_guider(self.guider)  # `pipe.guider = ...` may have replaced it since __init__
        for name, value in (("guidance_start", guidance_start), ("guidance_stop", guidance_stop)):
            if value is not None and (not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0):
                raise ValueError(f"`{name}` must be a fraction of the denoising steps in [0, 1], got {value!r}.")
        start = self.guider.config.get("start", 0.0) if guidance_start is None else guidance_start
        stop = self.guider.config.get("stop", 1.0) if guidance_stop is None else guidance_stop
        if start > stop:
            raise ValueError(
                f"`guidance_start` ({start}) must not exceed `guidance_stop` ({stop}) (either may come from the "
                f"guider's config: start={self.guider.config.get('start')}, stop={self.guider.config.get('stop')})."
            )
        overrides = {}
        if guidance_scale is not None:
            overrides["guidance_scale"] = guidance_scale
        empty = start == stop
        if (guidance_start is not None or guidance_stop is not None) and not empty:
            overrides.update(start=start, stop=stop)
        disable = empty or (guidance_scale is not None and guidance_scale <= 1.0)
        if not overrides and not disable:
            return self.guider
        guider_logger = logging.getLogger(type(self.guider).__module__.rsplit(".", 1)[0] + ".guider_utils")
        level = guider_logger.level
        guider_logger.setLevel(logging.ERROR)  # the "experimental" notice was already given for the component
        try:
            guider = self.guider.new(**overrides)
        finally:
            guider_logger.setLevel(level)
        if disable:
            guider.disable()
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

        `guided=True`: `model_output` holds the unconditional rows, then the conditional ones; the guider combines the
        first `guidance_channels` prediction channels (the others come from the conditional branch). `guided=False`:
        the conditional rows only (a step outside the guidance interval). Learned variance channels (`learn_sigma`)
        come from the conditional branch and reach the scheduler only if its `variance_type` is learned.
        """
        guider = self._call_guider
        if guided is None:
            guided = guider.num_conditions > 1
        channels = self.model.config.latent_channels
        prediction, variance = model_output[:, :channels], model_output[:, channels:]
        uncond, cond = prediction.chunk(2) if guided else (None, prediction)
        if guided:
            variance = variance.chunk(2)[1]
        k = getattr(self, "_guidance_channels", channels)
        predictions = {"pred_cond": cond[:, :k], "pred_uncond": None if uncond is None else uncond[:, :k]}
        states = guider.prepare_inputs({})  # one state per prediction the guider needs at this step
        for state in states:
            state.noise_pred = predictions[getattr(state, guider._identifier_key)]
        prediction = torch.cat([guider(states).pred, cond[:, k:]], dim=1)
        if variance.shape[1] and getattr(self.scheduler.config, "variance_type", None) in LEARNED_VARIANCE_TYPES:
            return torch.cat([prediction, variance], dim=1)
        return prediction

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
    ) -> ImagePipelineOutput | tuple:
        r"""
        Generate images from text.

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

        Examples:

        Returns:
            [`ImagePipelineOutput`] or `tuple`: the images (first element of the tuple).
        """
        config = self.model.config
        if num_inference_steps is None:
            num_inference_steps = self.config.default_num_inference_steps
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
        channels = self.model.config.latent_channels
        if guidance_channels is not None and (
            not isinstance(guidance_channels, int) or not 1 <= guidance_channels <= channels
        ):
            raise ValueError(f"`guidance_channels` must be an int in [1, {channels}], got {guidance_channels!r}.")
        self._guidance_channels = guidance_channels or channels
        self._call_guider = self.prepare_guider(guidance_scale, guidance_start, guidance_stop)
        self._interrupt = False
        batch_size = 1 if isinstance(prompt, str) else len(prompt)
        device = self._execution_device

        # 2. Prepare timesteps and which of them the guider guides
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        self._guided_steps = self.guided_steps(self._call_guider, timesteps)

        # 3. Tokenize prompt (+ negative prompt) with the image block
        input_ids, attention_mask, n_image_tokens = self.encode_prompt(
            prompt, negative_prompt, num_images_per_prompt, self.do_classifier_free_guidance, height, width, device
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
        context = self.prepare_context(input_ids, attention_mask, n_image_tokens, use_prefix_cache)

        extra_step_kwargs = self.prepare_extra_step_kwargs(generator)
        cond_context = None
        if self.do_classifier_free_guidance and not all(self._guided_steps):
            n = latents.shape[0]  # unconditional rows come first
            cond_context = self.prepare_context(input_ids[n:], attention_mask[n:], n_image_tokens, use_prefix_cache)

        # 6. Denoising loop
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                self._call_guider.set_state(step=i, num_inference_steps=len(timesteps), timestep=t)
                guided = self._guided_steps[i]
                model_input = torch.cat([latents] * 2) if guided else latents
                if hasattr(self.scheduler, "scale_model_input"):  # Euler scales by sigma; FlowMatch has none
                    model_input = self.scheduler.scale_model_input(model_input, t)
                step_context = context if guided or cond_context is None else cond_context
                model_output = self.apply_guidance(self.predict(step_context, model_input, t), guided)
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

        # 7. Decode and post-process
        image = self.decode_latents(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)

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

        On top of diffusers' layout this copies this file to the root as `pipeline_monoformer.py` and points
        `model_index.json` at the code files saved next to each custom component (`model/modeling_monoformer.py`,
        `processor/processing_monoformer.py`) instead of the importable package. `push_to_hub=True` uploads that folder.
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
        `torch_dtype` reaches every torch component; a Hub id is downloaded first (files only, no code runs).
        """
        path = str(pretrained_model_name_or_path)
        if not os.path.isdir(path):
            from huggingface_hub import snapshot_download

            hub_keys = ("revision", "token", "cache_dir", "local_files_only")
            path = snapshot_download(path, **{k: kwargs.pop(k) for k in hub_keys if k in kwargs})
        torch_dtype = kwargs.pop("torch_dtype", None)
        kwargs.pop("trust_remote_code", None)  # nothing from the folder runs here
        with open(os.path.join(path, "model_index.json")) as f:
            index = json.load(f)
        package = cls.__module__.rpartition(".")[0]
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
            if torch_dtype is not None and issubclass(component_cls, torch.nn.Module):
                load_kwargs["dtype" if issubclass(component_cls, PreTrainedModel) else "torch_dtype"] = torch_dtype
            components[name] = component_cls.from_pretrained(os.path.join(path, name), **load_kwargs)
        if kwargs:
            raise TypeError(f"Unexpected arguments for `{cls.__name__}.from_pretrained`: {sorted(kwargs)}.")
        return cls(**components)

    def _make_self_contained(self, save_directory: str) -> None:
        pipeline_file = inspect.getfile(type(self))
        pipeline_module = os.path.splitext(os.path.basename(pipeline_file))[0]
        shutil.copyfile(pipeline_file, os.path.join(save_directory, os.path.basename(pipeline_file)))

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


__all__ = ["MonoFormerPipeline", "MonoFormerDenoisingContext", "check_guider", "check_scheduler_matches"]
