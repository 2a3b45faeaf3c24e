"""MonoFormer configuration: a causal LLM's config plus the fields of the image/diffusion path."""

from typing import Literal, get_args

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

TimestepConditioning = Literal["adaln", "token", "add"]
ImagePosEmbed = Literal["sincos_2d", "none"]
PredictionType = Literal["epsilon", "v_prediction", "flow"]
PatchEmbedder = Literal["linear", "unet"]
ImageExperts = Literal["none", "full", "lora"]
# The allowed values as tuples, for argument parsers and error messages.
TIMESTEP_CONDITIONING_MODES = get_args(TimestepConditioning)
IMAGE_POS_EMBED_TYPES = get_args(ImagePosEmbed)
PREDICTION_TYPES = get_args(PredictionType)
PATCH_EMBEDDERS = get_args(PatchEmbedder)
DEFAULT_TEXT_CONFIG = {
    "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192,
}
IMAGE_EXPERT_MODES = get_args(ImageExperts)


@strict
class MonoFormerConfig(PreTrainedConfig):
    r"""
    Configuration of a [`MonoFormerForConditionalGeneration`]: one decoder-only transformer (any causal LLM that
    `AutoModel` builds and that takes `inputs_embeds`, a 4D attention mask and `position_ids`) that predicts the next
    text token and denoises image latents cut into `patch_size x patch_size` patches.

    Args:
        text_config (`dict` or `PretrainedConfig`, *optional*):
            Config of the LLM body (Llama, Qwen2, Mistral, ...). A dict without `model_type` is read as Llama; none
            at all gives a Llama shaped like SmolLM2-135M (135 M parameters).
        latent_channels (`int`, defaults to 4):
            Channels of the image latents (4 for a Stable-Diffusion VAE, 1 or 3 for pixel-space models).
        patch_size (`int`, defaults to 2):
            Side of the square latent patch that becomes one token.
        patch_embedder (`str`, defaults to `"linear"`):
            How patches become tokens and tokens become predictions: `"linear"` (one Linear over the `C * p * p` patch
            features in, the DiT head's Linear + unpatchify out) or `"unet"` (Transfusion: diffusers `DownBlock2D`s
            with timestep conditioning down to the patch grid before the transformer, mirrored `UpBlock2D`s after it
            with skips from the down path; suits large patches, e.g. 7 for 28x28 images).
        unet_block_channels (`list[int]`, defaults to `[64, 128]`):
            `"unet"` only: width of each U-Net level; `L` levels downsample by `2 ** (L - 1)`, which must divide
            `patch_size` (the rest of the patch is a linear patchify of the last level).
        unet_layers_per_block (`int`, defaults to 1):
            `"unet"` only: ResNet blocks per down level (the up levels have one more, as diffusers' `UNet2DModel`).
        vae_scale_factor (`int`, defaults to 8):
            Pixels per latent pixel along each side (1 = pixel space, no VAE).
        sample_size (`int`, defaults to 32):
            Default latent side; the pipeline's default image side is `sample_size * vae_scale_factor`.
        timestep_conditioning (`str`, defaults to `"adaln"`):
            How the diffusion timestep reaches the transformer: `"adaln"` (shift/scale on the image tokens before
            layer 0, as in the original MonoFormer release), `"token"` (one timestep token just before the image
            tokens) or `"add"` (the timestep embedding added to every patch token, as in Transfusion).
        image_pos_embed (`str`, defaults to `"sincos_2d"`):
            `"sincos_2d"` adds a fixed 2D sin-cos embedding (computed for any `h x w` grid, not stored) to the image
            tokens; `"none"` relies on the LLM's 1D RoPE alone.
        learn_sigma (`bool`, defaults to `False`):
            Double the diffusion head's output channels (`[prediction, variance interpolation]`, IDDPM style). The
            diffusion loss only covers the prediction half.
        prediction_type (`str`, defaults to `"epsilon"`):
            What the diffusion head predicts: `"epsilon"` (noise), `"v_prediction"` (velocity) or `"flow"`
            (rectified-flow velocity `noise - x0`). Fixes which diffusers schedulers are valid.
        num_train_timesteps (`int`, defaults to 1000):
            Scale of the `timesteps` the model receives (DDPM steps in `[0, num_train_timesteps)`, flow models
            `sigma * num_train_timesteps`).
        lm_loss_weight (`float`, defaults to 1.0), diffusion_loss_weight (`float`, defaults to 1.0):
            `loss = lm_loss_weight * lm_loss + diffusion_loss_weight * diffusion_loss` (the original release used
            0.01 / 1.0, Transfusion 1 / 5).
        image_experts (`str`, defaults to `"none"`):
            Weights for the image patch tokens inside the LLM body: `"none"` (the same weights as text), `"full"`
            (LMFusion: each decoder layer's attention projections, MLP and two norms copied for image tokens, initialised
            from the LLM's) or `"lora"` (Partial LoRA: image tokens see `W + B @ A` of every attention/MLP projection,
            text tokens `W`). Tokens are routed by type (each runs through one set of weights), so with the text
            weights frozen a text-only input gives the base LLM's logits exactly. See `image_experts_monoformer.py`.
        image_lora_rank (`int`, defaults to 16), image_lora_alpha (`float`, defaults to 16.0):
            Rank and scale (`alpha / rank`) of the image-only LoRA of `image_experts="lora"`.
        image_token_id, boi_token_id, eoi_token_id (`int`, *optional*):
            Ids of the `<image>` placeholder, `<boi>` and `<eoi>` tokens (set by `from_llm` / the processor).
        tie_word_embeddings (`bool`, defaults to `False`):
            Mirrors `text_config.tie_word_embeddings` (the wrapper decides tying).

    Example:

    ```python
    >>> from transformers import LlamaConfig
    >>> config = MonoFormerConfig(text_config=LlamaConfig(hidden_size=64, num_hidden_layers=2), patch_size=2)
    >>> config.text_config.model_type
    'llama'
    ```
    """

    model_type = "monoformer"
    # Without a `text_config`: a Llama shaped like SmolLM2-135M (the LLM the examples convert), not transformers'
    # 7B-sized LlamaConfig() defaults, which nobody asks for by omission.
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama", init_kwargs=DEFAULT_TEXT_CONFIG)
    }

    text_config: dict | PreTrainedConfig | None = None
    latent_channels: int = 4
    patch_size: int = 2
    patch_embedder: PatchEmbedder = "linear"
    unet_block_channels: list[int] | tuple[int, ...] = (64, 128)
    unet_layers_per_block: int = 1
    vae_scale_factor: int = 8
    sample_size: int = 32
    timestep_conditioning: TimestepConditioning = "adaln"
    image_pos_embed: ImagePosEmbed = "sincos_2d"
    learn_sigma: bool = False
    prediction_type: PredictionType = "epsilon"
    num_train_timesteps: int = 1000
    lm_loss_weight: float | int = 1.0
    diffusion_loss_weight: float | int = 1.0
    image_experts: ImageExperts = "none"
    image_lora_rank: int = 16
    image_lora_alpha: float | int = 16.0
    image_token_id: int | None = None
    boi_token_id: int | None = None
    eoi_token_id: int | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True

    # `@strict` checks each field's type (and the `Literal` choices) and then runs every `validate_*` method.
    def validate_positive_sizes(self):
        """Sizes and scales are positive integers."""
        for name in ("latent_channels", "patch_size", "vae_scale_factor", "sample_size", "num_train_timesteps",
                     "image_lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)!r}.")
        if self.image_lora_alpha <= 0:
            raise ValueError(f"`image_lora_alpha` must be a positive number, got {self.image_lora_alpha!r}.")

    def validate_sample_size(self):
        """The default latent side is cut into whole patches."""
        if self.sample_size % self.patch_size:
            raise ValueError(
                f"`sample_size` ({self.sample_size}) must be divisible by `patch_size` ({self.patch_size})."
            )

    def validate_unet_patch_path(self):
        """U-Net levels are positive widths whose downsampling (2 per level after the first) divides the patch."""
        channels = self.unet_block_channels
        if not channels or any(c < 1 for c in channels):
            raise ValueError(f"`unet_block_channels` must be a non-empty list of positive integers, got {channels!r}.")
        self.unet_block_channels = list(channels)
        if self.unet_layers_per_block < 1:
            raise ValueError(f"`unet_layers_per_block` must be a positive integer, got {self.unet_layers_per_block!r}.")
        downsampling = 2 ** (len(channels) - 1)
        if self.patch_embedder == "unet" and self.patch_size % downsampling:
            raise ValueError(
                f"`unet_block_channels` has {len(channels)} levels, which downsample by {downsampling}, but "
                f"`patch_size`={self.patch_size} is not a multiple of it: use {len(channels)} levels with a patch "
                f"that {downsampling} divides, or fewer levels (1 level works with any patch, e.g. 7)."
            )

    def validate_image_pos_embed(self):
        """The 2D sin-cos embedding splits the hidden size in four (sin/cos x row/column)."""
        hidden = getattr(self.text_config, "hidden_size", None)
        if self.image_pos_embed == "sincos_2d" and hidden is not None and hidden % 4:
            raise ValueError(f"`image_pos_embed='sincos_2d'` needs a hidden size divisible by 4, got {hidden}.")

    @property
    def out_channels(self) -> int:
        """Channels of the diffusion head's output per latent pixel."""
        return self.latent_channels * (2 if self.learn_sigma else 1)

    @property
    def tokens_per_image_extra(self) -> int:
        """Placeholders per image beyond its patches (the timestep token in `"token"` mode)."""
        return 1 if self.timestep_conditioning == "token" else 0

    def num_image_tokens(self, height: int, width: int) -> int:
        """Number of `<image>` placeholders for a latent of `height x width` (patches + timestep token)."""
        return (height // self.patch_size) * (width // self.patch_size) + self.tokens_per_image_extra

    @property
    def trained_position_limit(self) -> int | None:
        """The LLM's hard trained position range: `max_position_embeddings` under an unscaled RoPE; None when the
        RoPE is scaled (linear, dynamic, yarn, ...: the LLM decides its own context) or no limit is named."""
        text_config = self.text_config
        rope_type = (getattr(text_config, "rope_parameters", None) or {}).get("rope_type", "default")
        return getattr(text_config, "max_position_embeddings", None) if rope_type == "default" else None


MonoFormerConfig.register_for_auto_class()

__all__ = ["MonoFormerConfig"]
