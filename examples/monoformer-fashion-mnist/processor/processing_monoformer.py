"""MonoFormer processor: tokenizer + image processor; expands each `<image>` into the placeholders of its size."""

import os

import torch
from transformers import AutoTokenizer, BatchFeature, PreTrainedConfig, ProcessorMixin
from transformers.image_utils import make_flat_list_of_images
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.processing_utils import ProcessingKwargs, Unpack

from .image_processing_monoformer import MonoFormerImageProcessor, MonoFormerImagesKwargs, with_channel_axis

BOI_TOKEN, EOI_TOKEN, IMAGE_TOKEN = "<boi>", "<eoi>", "<image>"


class MonoFormerProcessorKwargs(ProcessingKwargs, total=False):
    images_kwargs: MonoFormerImagesKwargs


class MonoFormerProcessor(ProcessorMixin):
    r"""
    Builds MonoFormer inputs. In `text`, each `<image>` stands for one image and becomes
    `<boi>` + `<image>` x N + `<eoi>`, with `N = (H / (p * f)) * (W / (p * f))` (+1 timestep token in `"token"` mode)
    for an `H x W` image, patch size `p` and VAE factor `f`. Images come from `images` (to encode: pixel values in
    `[-1, 1]` are returned) or, for images still to be generated, from `image_sizes` (`(H, W)` in pixels).

    Output: `input_ids`, `attention_mask` and, with `images`, `pixel_values` (`(n, C, H, W)` when all share a size,
    else a list of `(C, H, W)`): the model's image input for a pixel-space model (`model.generate(**processor(...))`);
    a latent model takes their VAE latents as `latents` instead. Text options (`max_length`, `padding`,
    `text_kwargs={...}`) reach the tokenizer and image options (`images_kwargs={...}`) the image processor, through
    transformers' standard processor-kwargs merging.

    Args:
        image_processor ([`MonoFormerImageProcessor`]): Converts images to `[-1, 1]` tensors.
        tokenizer: The LLM's tokenizer; `<boi>`, `<eoi>`, `<image>` are added if missing.
        patch_size (`int`, defaults to 2), vae_scale_factor (`int`, defaults to 8), timestep_token (`bool`):
            Must match the model's config; [`MonoFormerPipeline`] and `configure_for_model` set them from it.

    Example:

    ```python
    >>> processor = MonoFormerProcessor(MonoFormerImageProcessor(num_channels=1), tokenizer, patch_size=2,
    ...                                 vae_scale_factor=1)
    >>> batch = processor(text=["a sneaker<image>"], image_sizes=[[(28, 28)]])   # 196 placeholders
    >>> batch = processor(text=["<image>a photo of a bag"], images=[img])         # captioning input
    ```
    """

    valid_processor_kwargs = MonoFormerProcessorKwargs
    # Lowest-priority defaults (`_merge_kwargs`): padded PyTorch batches.
    text_kwargs = {"padding": True, "return_tensors": "pt"}
    # A list when the images' sizes differ: the processor builds `pixel_values` itself.
    skip_tensor_conversion = [*ProcessorMixin.skip_tensor_conversion, "pixel_values"]

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        patch_size: int = 2,
        vae_scale_factor: int = 8,
        timestep_token: bool = False,
        boi_token: str = BOI_TOKEN,
        eoi_token: str = EOI_TOKEN,
        image_token: str = IMAGE_TOKEN,
        chat_template=None,
        **kwargs,
    ):
        self.patch_size = patch_size
        self.vae_scale_factor = vae_scale_factor
        self.timestep_token = timestep_token
        # Checkpoints converted from the original release use "<|im_start|>" / "<|im_end|>" for <boi> / <eoi>.
        self.boi_token, self.eoi_token, self.image_token = boi_token, eoi_token, image_token
        if tokenizer is not None:
            missing = [t for t in (boi_token, eoi_token, image_token) if t not in tokenizer.get_vocab()]
            if missing:
                tokenizer.add_tokens(missing, special_tokens=True)
            # Decoder-only generation continues every row from its last column: left padding, whatever the LLM's
            # tokenizer shipped with (SmolLM2's pads right). Training collators pass `padding_side="right"`.
            tokenizer.padding_side = "left"
            # Batches and guidance branches are padded; many LLMs ship no pad token (Llama, Mistral). Pads are
            # masked by `attention_mask` and never labels, so EOS serves, as transformers' examples set it.
            if tokenizer.pad_token is None and tokenizer.eos_token is not None:
                tokenizer.pad_token = tokenizer.eos_token
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    # ---------------------------------------------------------------- configuration
    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.image_token)

    @property
    def boi_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.boi_token)

    @property
    def eoi_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.eoi_token)

    def configure_for_model(self, config) -> "MonoFormerProcessor":
        """Take `patch_size`, `vae_scale_factor` and the timestep-token layout from a `MonoFormerConfig`, and check the
        special token ids agree with it."""
        self.patch_size = config.patch_size
        self.vae_scale_factor = config.vae_scale_factor
        self.timestep_token = config.timestep_conditioning == "token"
        for name in ("image_token_id", "boi_token_id", "eoi_token_id"):
            ours, theirs = getattr(self, name), getattr(config, name)
            if theirs is not None and ours != theirs:
                raise ValueError(
                    f"The processor's tokenizer gives `{name}`={ours} but the model's config says {theirs}: use the "
                    "tokenizer that `MonoFormerForConditionalGeneration.from_llm` was given."
                )
        return self

    def num_image_tokens(self, height: int, width: int) -> int:
        """Placeholders for an image of `height x width` pixels."""
        unit = self.patch_size * self.vae_scale_factor
        if height % unit or width % unit or height <= 0 or width <= 0:
            raise ValueError(
                f"Image size {height}x{width} is not a positive multiple of patch_size * vae_scale_factor = {unit}; "
                f"resize it (e.g. `MonoFormerImageProcessor(do_resize=True, size=...)`) to a multiple of {unit}."
            )
        return (height // unit) * (width // unit) + int(self.timestep_token)

    def expand_image_tokens(self, text: str, sizes: list[tuple[int, int]]) -> str:
        """Replace the k-th `<image>` (optionally already wrapped in `<boi>`/`<eoi>`) by the k-th image's block."""
        boi, eoi, image = self.boi_token, self.eoi_token, self.image_token
        text = text.replace(boi + image + eoi, image)
        parts = text.split(image)
        if len(parts) - 1 != len(sizes):
            raise ValueError(
                f"`text` {text[:60]!r} has {len(parts) - 1} `<image>` marker(s) but {len(sizes)} image(s) were given "
                "for it: write one `<image>` where each image goes."
            )
        out = [parts[0]]
        for (h, w), rest in zip(sizes, parts[1:]):
            out.append(boi + image * self.num_image_tokens(h, w) + eoi + rest)
        return "".join(out)

    # ---------------------------------------------------------------- call
    def __call__(
        self,
        text: str | list[str] | None = None,
        images=None,
        image_sizes: list[list[tuple[int, int]]] | None = None,
        **kwargs: Unpack[MonoFormerProcessorKwargs],
    ) -> BatchFeature:
        """
        Args:
            text (`str` or `list[str]`): Prompts; one `<image>` marker per image (`<boi><image><eoi>` counts as one).
            images (*optional*): Images to encode, one per marker, in order (a flat list, or one list per text).
            image_sizes (*optional*): For images still to be generated: one list of `(H, W)` pixel sizes per text.
            **kwargs: Tokenizer options (`padding`, `padding_side`, `max_length`, ... or `text_kwargs={...}`) and
                image-processor options (`images_kwargs={...}`), merged as every transformers processor does.

        Returns:
            `BatchFeature` with `input_ids`, `attention_mask` and, when `images` are given, `pixel_values`.
        """
        if text is None:
            raise ValueError("`text` is required (use `<image>` alone for an image without words).")
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("`text` must be a string or a list of strings.")
        if images is not None and image_sizes is not None:
            raise ValueError("Pass either `images` (to encode) or `image_sizes` (to generate), not both.")
        images = with_channel_axis(images)  # a 2-D (H, W) array or tensor is one grayscale image
        wrapped = self.boi_token + self.image_token + self.eoi_token
        texts = [t.replace(wrapped, self.image_token) for t in texts]
        nested = isinstance(images, (list, tuple)) and images and all(isinstance(x, (list, tuple)) for x in images)
        if nested:  # one list per text: each must match its text's markers (the flat list is checked as a whole)
            if len(images) != len(texts):
                raise ValueError(f"`images` given per text needs one list per text ({len(texts)}), got {len(images)}.")
            for i, (t, row) in enumerate(zip(texts, images)):
                if len(row) != t.count(self.image_token):
                    raise ValueError(
                        f"Text {i} has {t.count(self.image_token)} `{self.image_token}` marker(s) but its list in "
                        f"`images` holds {len(row)} image(s): give each text exactly the images of its markers."
                    )
        if image_sizes is None:  # the base call: checks, kwargs merging, `replace_image_token` per image, tokenizer
            return super().__call__(images=images, text=texts, **kwargs)

        # Images still to be generated: no pixels, only their placeholder blocks.
        if len(image_sizes) != len(texts):
            raise ValueError(f"`image_sizes` needs one list per text ({len(texts)}), got {len(image_sizes)}.")
        expanded = [self.expand_image_tokens(t, [tuple(s) for s in sizes]) for t, sizes in zip(texts, image_sizes)]
        text_kwargs = self._merge_kwargs(
            MonoFormerProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs
        )["text_kwargs"]
        encoded = self.tokenizer(expanded, **text_kwargs)
        self._check_special_mm_tokens(expanded, encoded, modalities=["image"])
        return BatchFeature(dict(encoded), tensor_type=text_kwargs.get("return_tensors"))

    def _process_images(self, images, **kwargs):
        """Each image on its own (sizes may differ): `pixel_values` stacked when they share a size, else a list."""
        kwargs["return_tensors"] = "pt"
        images = make_flat_list_of_images(images)
        pixel_values = [self.image_processor(img, **kwargs)["pixel_values"][0] for img in images]  # [(C, H, W)]
        same_size = len({tuple(p.shape) for p in pixel_values}) == 1
        processed = {"pixel_values": torch.stack(pixel_values) if same_size else pixel_values}
        return processed, [self.replace_image_token(processed, i) for i in range(len(pixel_values))]

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        """The block replacing the `image_idx`-th `<image>` marker: `<boi>` + one placeholder per token + `<eoi>`."""
        height, width = image_inputs["pixel_values"][image_idx].shape[-2:]
        return self.boi_token + self.image_token * self.num_image_tokens(height, width) + self.eoi_token

    def post_process_image_text_to_text(self, generated_ids, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        """Decode generated ids to text (image placeholders and special tokens dropped)."""
        return self.tokenizer.batch_decode(generated_ids, skip_special_tokens=skip_special_tokens, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]

    # ---------------------------------------------------------------- loading
    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        """The image processor from its sibling class (not `AutoImageProcessor`, which would need remote code: diffusers
        does not forward `trust_remote_code` to components) and the tokenizer through `AutoTokenizer` with the
        caller's own options (`trust_remote_code=True` only if the caller passed it; False otherwise, never a prompt). The base `from_pretrained` does the
        rest: `processor_config.json`, the chat template, and keyword overrides."""
        subfolder = kwargs.pop("subfolder", "") or ""
        path = os.path.join(str(pretrained_model_name_or_path), subfolder)
        image_dict = dict((processor_dict or {}).get("image_processor") or {})
        if image_dict:
            auto_map = image_dict.pop("auto_map", None)
            image_dict.pop("image_processor_type", None)
            image_processor = MonoFormerImageProcessor(**image_dict)
            if auto_map is not None:  # as saved, so a round trip's `to_dict()` is unchanged
                image_processor.auto_map = auto_map
        else:
            image_processor = MonoFormerImageProcessor.from_pretrained(path)
        vocabulary_files = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
        if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f)) for f in vocabulary_files):
            raise ValueError(
                f"{path!r} has no tokenizer.json (nor another vocabulary file): the processor's tokenizer cannot be "
                "loaded. Restore the file from the folder the checkpoint was converted or saved from."
            )
        # The tokenizer is a stock class. Without the caller's own `trust_remote_code`, say "no" to the folder's code
        # up front: `AutoTokenizer` would otherwise resolve the model's config.json (its `auto_map`) and stop at
        # transformers' interactive prompt. A caller's True or False is passed on unchanged.
        kwargs.setdefault("trust_remote_code", False)
        if "config" not in kwargs and kwargs["trust_remote_code"] is not True:
            config = _config_without_remote_code(pretrained_model_name_or_path, subfolder, kwargs)
            if config is not None:
                kwargs["config"] = config
        tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        return [image_processor, tokenizer]

    @classmethod
    def _resolve_subprocessors(cls, pretrained_model_name_or_path, processor_dict, **kwargs):
        """transformers >= 5.25 loads sub-processors here, the image processor through `AutoImageProcessor` (which
        asks for remote code). Hand it ours, built as `_get_arguments_from_pretrained` builds them (earlier versions
        call that hook directly); sub-processors the caller passed are kept."""
        if kwargs.get("image_processor") is None or kwargs.get("tokenizer") is None:
            own = {k: v for k, v in kwargs.items() if k not in ("image_processor", "tokenizer")}
            loaded = cls._get_arguments_from_pretrained(pretrained_model_name_or_path, processor_dict, **own)
            for name, component in zip(("image_processor", "tokenizer"), loaded):
                if kwargs.get(name) is None:
                    kwargs[name] = component
        return super()._resolve_subprocessors(pretrained_model_name_or_path, processor_dict, **kwargs)

    @classmethod
    def from_args_and_dict(cls, args, processor_dict: dict, **kwargs):
        """The base method, keeping the saved `auto_map` (a round trip's `to_dict()` equals the saved one's)."""
        return _keep_auto_map(super().from_args_and_dict(args, processor_dict, **kwargs), processor_dict)

    @classmethod
    def from_dict(cls, processor_dict: dict, **kwargs):
        """As `from_args_and_dict`, for transformers >= 5.25 (which builds the processor here)."""
        return _keep_auto_map(super().from_dict(processor_dict, **kwargs), processor_dict)


def _keep_auto_map(loaded, processor_dict: dict):
    processor = loaded[0] if isinstance(loaded, tuple) else loaded
    if processor_dict.get("auto_map") is not None:
        processor.auto_map = processor_dict["auto_map"]
    return loaded


def _config_without_remote_code(pretrained_model_name_or_path, subfolder: str, kwargs: dict):
    """The folder's config.json as the base `PreTrainedConfig` when transformers has no class for its `model_type`
    (a converted MonoFormer folder: `MonoFormerConfig` is remote code), else None.

    `AutoTokenizer` reads the model's config for hints (`tokenizer_class`, `model_type`). For a type it can only build
    with remote code, refused, it falls back to `PreTrainedConfig.from_pretrained`, which warns "You are using a model
    of type `monoformer` to instantiate a model of type ``". Passing the same base config it would build, read with
    `from_dict`, picks the same tokenizer without the misleading warning.
    """
    try:
        config_dict, _ = PreTrainedConfig.get_config_dict(
            pretrained_model_name_or_path, **{**kwargs, "subfolder": subfolder}
        )
    except OSError:  # no config.json: AutoTokenizer goes by tokenizer_config.json alone
        return None
    model_type = config_dict.get("model_type")
    if not model_type or model_type in CONFIG_MAPPING:
        return None
    return PreTrainedConfig.from_dict(config_dict)


MonoFormerProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["MonoFormerProcessor", "MonoFormerProcessorKwargs", "BOI_TOKEN", "EOI_TOKEN", "IMAGE_TOKEN"]
