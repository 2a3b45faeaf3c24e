"""MonoFormer processor: tokenizer + image processor; expands each `<image>` into the placeholders of its size."""

import json
import os

import torch
from transformers import AutoTokenizer, BatchFeature, ProcessorMixin

from .image_processing_monoformer import MonoFormerImageProcessor

BOI_TOKEN, EOI_TOKEN, IMAGE_TOKEN = "<boi>", "<eoi>", "<image>"


class MonoFormerProcessor(ProcessorMixin):
    r"""
    Builds MonoFormer inputs. In `text`, each `<image>` stands for one image and becomes
    `<boi>` + `<image>` x N + `<eoi>`, with `N = (H / (p * f)) * (W / (p * f))` (+1 timestep token in `"token"` mode)
    for an `H x W` image, patch size `p` and VAE factor `f`. Images come from `images` (to encode: pixel values in
    `[-1, 1]` are returned) or, for images still to be generated, from `image_sizes` (`(H, W)` in pixels).

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
        return_tensors: str | None = "pt",
        padding: bool | str = True,
        padding_side: str | None = None,
        add_special_tokens: bool = True,
        **kwargs,
    ) -> BatchFeature:
        """
        Args:
            text (`str` or `list[str]`): Prompts; one `<image>` marker per image.
            images (*optional*): Images to encode, one per marker, in order (a flat list, or one list per text).
            image_sizes (*optional*): For images still to be generated: one list of `(H, W)` pixel sizes per text.
            padding_side (*optional*): Overrides the tokenizer's (left padding for generation).

        Returns:
            `BatchFeature` with `input_ids`, `attention_mask` and, when `images` are given, `pixel_values` (a tensor
            `(n, C, H, W)` when all share a size, else a list).
        """
        if text is None:
            raise ValueError("`text` is required (use `<image>` alone for an image without words).")
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("`text` must be a string or a list of strings.")
        if images is not None and image_sizes is not None:
            raise ValueError("Pass either `images` (to encode) or `image_sizes` (to generate), not both.")

        data = {}
        if images is not None:
            flat = images if isinstance(images, (list, tuple)) else [images]
            if flat and isinstance(flat[0], (list, tuple)):
                flat = [img for per_text in flat for img in per_text]
            pixel_values = [self.image_processor(img, return_tensors="pt", **kwargs)["pixel_values"][0] for img in flat]
            sizes_flat = [tuple(p.shape[-2:]) for p in pixel_values]
            counts = [t.count(self.image_token) for t in texts]
            if sum(counts) != len(sizes_flat):
                raise ValueError(
                    f"`text` holds {sum(counts)} `<image>` marker(s) but {len(sizes_flat)} image(s) were given."
                )
            sizes, start = [], 0
            for c in counts:
                sizes.append(sizes_flat[start : start + c])
                start += c
            same = len(set(sizes_flat)) <= 1
            data["pixel_values"] = torch.stack(pixel_values) if (same and pixel_values) else pixel_values
        elif image_sizes is not None:
            if len(image_sizes) != len(texts):
                raise ValueError(f"`image_sizes` needs one list per text ({len(texts)}), got {len(image_sizes)}.")
            sizes = [[tuple(s) for s in per_text] for per_text in image_sizes]
        else:
            sizes = [[] for _ in texts]

        expanded = [self.expand_image_tokens(t, s) for t, s in zip(texts, sizes)]
        tok_kwargs = {"padding": padding, "return_tensors": return_tensors, "add_special_tokens": add_special_tokens}
        if padding_side is not None:
            tok_kwargs["padding_side"] = padding_side
        encoded = self.tokenizer(expanded, **tok_kwargs)
        data.update(encoded)
        return BatchFeature(data=data)

    def post_process_image_text_to_text(self, generated_ids, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        """Decode generated ids to text (image placeholders and special tokens dropped)."""
        return self.tokenizer.batch_decode(generated_ids, skip_special_tokens=skip_special_tokens, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: str | None = None, **kwargs):
        """Load from a folder written by `save_pretrained`, building the image processor from its sibling class so
        that loading works inside a remote-code pipeline (diffusers does not forward `trust_remote_code`)."""
        path = str(pretrained_model_name_or_path)
        if subfolder:
            path = os.path.join(path, subfolder)
        config_file = os.path.join(path, "processor_config.json")
        if not os.path.isfile(config_file):
            return super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder or "", **kwargs)
        with open(config_file) as f:
            processor_dict = json.load(f)
        image_dict = processor_dict.pop("image_processor", None)
        if image_dict is None:
            image_processor = MonoFormerImageProcessor.from_pretrained(path)
        else:
            image_dict = {k: v for k, v in image_dict.items() if k not in ("auto_map", "image_processor_type")}
            image_processor = MonoFormerImageProcessor(**image_dict)
        tokenizer_kwargs = {k: v for k, v in kwargs.items() if k in ("revision", "token", "cache_dir", "local_files_only")}
        # This code already runs from the same folder, so its tokenizer files are trusted alike.
        tokenizer_kwargs["trust_remote_code"] = kwargs.get("trust_remote_code", True)
        tokenizer = AutoTokenizer.from_pretrained(path, **tokenizer_kwargs)
        names = ("patch_size", "vae_scale_factor", "timestep_token", "boi_token", "eoi_token", "image_token")
        init_kwargs = {k: processor_dict[k] for k in names if k in processor_dict}
        return cls(image_processor=image_processor, tokenizer=tokenizer, **init_kwargs)


MonoFormerProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["MonoFormerProcessor", "BOI_TOKEN", "EOI_TOKEN", "IMAGE_TOKEN"]
