"""MonoFormer: one causal LLM that writes text (next-token cross-entropy) and paints images (diffusion MSE).

Layout of a sequence: `... <boi> <image> x N <eoi> ...`. Every `<image>` placeholder is replaced by one latent patch
token (`"token"` timestep mode: the first placeholder of each image becomes a timestep token). Attention is causal over
the whole sequence plus bidirectional among the patch tokens of the same image; the LLM's 1D RoPE runs over everything.

Images enter as a `(n, C, h, w)` tensor or a list of `(C, h, w)` tensors; `as_image_list` turns either into the one
internal form (a list, one tensor per image) at the boundary and `like_latents` gives results back in the caller's form.
"""

import inspect
import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps, get_2d_sincos_pos_embed_from_grid
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPooling, ModelOutput
from transformers.modeling_utils import slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, logging
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple

from .configuration_monoformer import MonoFormerConfig
from .patch_embedding_monoformer import MonoFormerUNetPatchDecoder, MonoFormerUNetPatchEncoder, unet_head_features
from .image_experts_monoformer import ImageTokenRouting, add_image_experts, init_image_experts, is_image_expert_parameter

logger = logging.get_logger(__name__)

IMAGE_SPECIAL_TOKENS = {"boi": "<boi>", "eoi": "<eoi>", "image": "<image>"}
TIMESTEP_FREQ_DIM = 256


# ----------------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class MonoFormerModelOutputWithPast(ModelOutput):
    """
    Output of [`MonoFormerModel`].

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`):
            The LLM body's final (normed) hidden states.
        cache (`Cache`, *optional*): The key/value cache, when `use_cache=True`.
        hidden_states, attentions: As returned by the LLM body on request.
        image_hidden_states (`torch.FloatTensor` or `list[torch.FloatTensor]`, *optional*):
            Final hidden states of each image's patch tokens: `(n_images, T, hidden_size)` when every image has the
            same size, else a list of `(T_i, hidden_size)`.
        image_skip_states (`list[tuple[torch.FloatTensor, ...]]`, *optional*, `patch_embedder="unet"` only):
            Per image, the U-Net down path's skip features `(c, h_i, w_i)` for the up blocks.
        timestep_embeds (`torch.FloatTensor` of shape `(n_images, hidden_size)`, *optional*):
            The timestep embedding of each image (conditions the diffusion head).
    """

    last_hidden_state: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    image_hidden_states: torch.FloatTensor | list[torch.FloatTensor] | None = None
    timestep_embeds: torch.FloatTensor | None = None
    image_skip_states: list[tuple[torch.FloatTensor, ...]] | None = None


@dataclass
class MonoFormerCausalLMOutputWithPast(ModelOutput):
    """
    Output of [`MonoFormerForConditionalGeneration`].

    Args:
        loss (`torch.FloatTensor`, *optional*): `lm_loss_weight * lm_loss + diffusion_loss_weight * diffusion_loss`.
        lm_loss (`torch.FloatTensor`, *optional*): Shifted next-token cross-entropy (when `labels` are given).
        diffusion_loss (`torch.FloatTensor`, *optional*): MSE against `diffusion_target`, mean per image, then over
            images.
        logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`): Next-token logits.
        diffusion_output (`torch.FloatTensor` or `list[torch.FloatTensor]`, *optional*): The diffusion head's output,
            same structure as `latents`, `config.out_channels` channels.
        cache (`Cache`, *optional*): The key/value cache.
        hidden_states, attentions: As returned by the LLM body on request.
    """

    loss: torch.FloatTensor | None = None
    lm_loss: torch.FloatTensor | None = None
    diffusion_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    diffusion_output: torch.FloatTensor | list[torch.FloatTensor] | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


# ----------------------------------------------------------------------------------------------------------------------
# Image-path building blocks
# ----------------------------------------------------------------------------------------------------------------------
def patchify(latents: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(n, C, h, w) -> (n, h/p * w/p, C * p * p); tokens row-major over the patch grid, features in (c, ph, pw) order."""
    n, c, h, w = latents.shape
    p = patch_size
    x = latents.reshape(n, c, h // p, p, w // p, p)  # (n, C, gh, p, gw, p)
    x = x.permute(0, 2, 4, 1, 3, 5)  # (n, gh, gw, C, p, p)
    return x.reshape(n, (h // p) * (w // p), c * p * p)


def unpatchify(tokens: torch.Tensor, height: int, width: int, patch_size: int) -> torch.Tensor:
    """(n, T, p * p * C) with features in (ph, pw, c) order (the DiT/original head layout) -> (n, C, h, w)."""
    n, _, d = tokens.shape
    p = patch_size
    c = d // (p * p)
    x = tokens.reshape(n, height // p, width // p, p, p, c)  # (n, gh, gw, ph, pw, C)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (n, C, gh, ph, gw, pw)
    return x.reshape(n, c, height, width)


def sincos_2d_pos_embed(embed_dim: int, grid_height: int, grid_width: int) -> torch.Tensor:
    """Fixed 2D sin-cos embedding (MAE/DiT convention) of a `grid_height x grid_width` patch grid: (gh * gw, D), float64.

    The first half of the channels encodes the column, the second half the row; positions are plain integers, so a
    square grid equals `diffusers`' `get_2d_sincos_pos_embed(D, g, base_size=g)` and any `h x w` grid works.
    """
    rows, cols = torch.meshgrid(
        torch.arange(grid_height, dtype=torch.float64), torch.arange(grid_width, dtype=torch.float64), indexing="ij"
    )
    grid = torch.stack([cols.reshape(-1), rows.reshape(-1)])  # (2, gh * gw)
    return get_2d_sincos_pos_embed_from_grid(embed_dim, grid)


# ----------------------------------------------------------------------------------------------------------------------
# Images: one internal form, placeholders, hybrid mask (module level, as Gemma3's mask helpers)
# ----------------------------------------------------------------------------------------------------------------------
def as_image_list(latents, config: MonoFormerConfig, name: str = "latents") -> list[torch.Tensor]:
    """Validate images given as `(n, C, h, w)` or a list of `(C, h, w)` and return the internal form: a list of
    `(C, h, w)` tensors (views of a stacked tensor, so nothing is copied)."""
    p, c = config.patch_size, config.latent_channels
    if isinstance(latents, torch.Tensor):
        if latents.ndim != 4:
            raise ValueError(
                f"`{name}` must be a tensor of shape (n_images, {c}, h, w) or a list of (C, h, w) tensors, "
                f"got a tensor of shape {tuple(latents.shape)}."
            )
        images = list(latents.unbind(0))
    elif isinstance(latents, (list, tuple)):
        if not all(isinstance(x, torch.Tensor) and x.ndim == 3 for x in latents):
            raise TypeError(f"`{name}` given as a list must hold 3D tensors of shape (C, h, w), one per image.")
        images = list(latents)
    else:
        raise TypeError(f"`{name}` must be a torch.Tensor or a list of tensors, got {type(latents).__name__}.")
    for i, x in enumerate(images):
        ci, h, w = x.shape
        if ci != c:
            raise ValueError(f"`{name}` image {i} has {ci} channels; this model expects `latent_channels`={c}.")
        if h % p or w % p:
            raise ValueError(
                f"`{name}` image {i} is {h}x{w}, which `patch_size`={p} does not divide. Resize the image to a "
                f"multiple of patch_size * vae_scale_factor = {p * config.vae_scale_factor} pixels."
            )
    return images


def pixel_values_as_latents(config: MonoFormerConfig, pixel_values, latents):
    """`pixel_values` (the processor's output) are the image input of a pixel-space model (`vae_scale_factor=1`),
    where images and latents are the same thing; a latent model needs them encoded by its VAE first. No images (an
    empty list or a 0-row tensor) is `None`."""
    if pixel_values is None:
        return latents if latents is None or len(latents) else None
    if latents is not None:
        raise ValueError("Pass the images once: `pixel_values` (pixel-space models) or `latents`, not both.")
    if config.vae_scale_factor != 1:
        raise ValueError(
            f"`pixel_values` are images, but this model works on VAE latents (`vae_scale_factor`="
            f"{config.vae_scale_factor}): encode them (`vae.encode(pixel_values).latent_dist.mean * "
            "vae.config.scaling_factor`) and pass `latents=`."
        )
    return pixel_values if len(pixel_values) else None


def like_latents(per_image: list[torch.Tensor], latents) -> torch.Tensor | list[torch.Tensor]:
    """Per-image results in the caller's form: stacked when `latents` was one tensor, else the list."""
    return torch.stack(per_image) if isinstance(latents, torch.Tensor) else per_image


def shared_image_sources(images: list[torch.Tensor], timesteps: torch.Tensor | None) -> list[int] | None:
    """For each image, the index of the first image that is the same tensor object at the same timestep; None when
    no tensor object repeats (the usual case, which costs no look at the timesteps). Classifier-free guidance passes
    each noisy image once per guidance branch as one object: its patch embedding is then computed once, not per
    branch (the U-Net patch encoder's convolutions are ~10% of a guided step)."""
    if timesteps is None or len({id(x) for x in images}) == len(images):
        return None
    first: dict[tuple[int, float], int] = {}
    return [first.setdefault((id(x), t), i) for i, (x, t) in enumerate(zip(images, timesteps.tolist()))]


def group_by_shape(tensors: list[torch.Tensor]) -> list[list[int]]:
    """Indices of the tensors grouped by shape (first-seen order), so each distinct image size runs as one batch."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, x in enumerate(tensors):
        groups.setdefault(tuple(x.shape), []).append(i)
    return list(groups.values())


def get_image_block_ids(
    placeholder_mask: torch.BoolTensor, tokens_per_image: list[int], num_extra_tokens: int = 0
) -> torch.LongTensor:
    """Block ids of the hybrid mask, `(B, L)`: `k` on the patch tokens of image `k`, `-1` elsewhere.

    `placeholder_mask` marks every `<image>` placeholder; image `k` owns the `tokens_per_image[k]` placeholders that
    follow image `k - 1` in row-major order. Its first `num_extra_tokens` (the `"token"`-mode timestep token) stay
    causal, as in the original layout, so they get `-1`.
    """
    device = placeholder_mask.device
    counts = torch.tensor(tokens_per_image, device=device)
    image_ids = torch.repeat_interleave(torch.arange(len(tokens_per_image), device=device), counts)  # (sum T_i,)
    starts = counts.cumsum(0) - counts
    for k in range(num_extra_tokens):
        image_ids[starts + k] = -1
    block_ids = torch.full(placeholder_mask.shape, -1, dtype=torch.long, device=device)
    block_ids[placeholder_mask] = image_ids
    return block_ids


def create_hybrid_attention_mask(
    config: PreTrainedConfig,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache: Cache | None,
    position_ids: torch.LongTensor,
    block_ids: torch.LongTensor,
):
    """Causal + bidirectional-per-image mask in the form the LLM body (built from `config`) takes: one 4D mask /
    BlockMask, or, for bodies mixing full and sliding-window layers (Qwen2 `layer_types`), one mask per layer type.

    `block_ids` `(B, L)` covers the new tokens only; it is padded with `-1` over the cached prefix (absolute kv index).
    """
    past_len = cache.get_seq_length() if cache is not None else 0
    mask_kwargs = dict(
        config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache,
        position_ids=position_ids, block_sequence_ids=F.pad(block_ids, (past_len, 0), value=-1),
    )
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        masks = {"full_attention": create_causal_mask(**mask_kwargs)} if "full_attention" in layer_types else {}
        if "sliding_attention" in layer_types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)
        if set(layer_types) - set(masks):
            raise ValueError(f"Images are not supported with LLM layer types {sorted(set(layer_types))}.")
        return masks["full_attention"] if set(masks) == {"full_attention"} else masks
    if getattr(config, "sliding_window", None) is not None:  # Mistral: every layer slides
        return create_sliding_window_causal_mask(**mask_kwargs)
    return create_causal_mask(**mask_kwargs)


def image_position_ids(
    attention_mask: torch.Tensor | None, past_len: int, batch_size: int, seq_len: int, device
) -> torch.LongTensor:
    """Explicit `(B, L)` positions for a sequence with images: counted over the 2D `attention_mask` (left padding
    skipped), else continuing the cached prefix. Explicit ids also keep `create_causal_mask` from reading the
    sequence as several packed ones."""
    if attention_mask is not None and attention_mask.ndim == 2:
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq_len:]
    return torch.arange(past_len, past_len + seq_len, device=device).unsqueeze(0).expand(batch_size, -1)


def check_sequence_length(config: MonoFormerConfig, length: int, what: str = "The sequence") -> None:
    """Refuse a sequence with images that runs past the LLM's trained positions (`config.trained_position_limit`).

    Text alone is never checked here (text in, text out is exactly the base LLM).
    """
    max_positions = config.trained_position_limit
    if max_positions is not None and length > max_positions:
        raise ValueError(
            f"{what} is {length} tokens long, more than the LLM's `max_position_embeddings`={max_positions}: shorten "
            "the text or use smaller images."
        )


class MonoFormerTimestepEmbedder(nn.Module):
    """Scalar timesteps -> (n, hidden): sinusoidal features (cos first, no shift, as DiT) and a 2-layer SiLU MLP."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.time_proj = Timesteps(TIMESTEP_FREQ_DIM, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.timestep_embedder = TimestepEmbedding(TIMESTEP_FREQ_DIM, hidden_size)

    def forward(self, timesteps: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        freqs = self.time_proj(timesteps.float())  # (n, 256) float32
        return self.timestep_embedder(freqs.to(dtype))  # (n, D)


class MonoFormerFinalLayer(nn.Module):
    """DiT final layer: no-affine LayerNorm, adaLN shift/scale from the timestep embedding, Linear to p*p*C_out."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)

    def forward(self, hidden_states: torch.Tensor, timestep_embeds: torch.Tensor) -> torch.Tensor:
        # hidden_states: (n, T, D); timestep_embeds: (n, D)
        shift, scale = self.adaLN_modulation(timestep_embeds).unsqueeze(1).chunk(2, dim=-1)  # (n, 1, D) each
        hidden_states = self.norm_final(hidden_states) * (1 + scale) + shift
        return self.linear(hidden_states)  # (n, T, p * p * C_out)


# ----------------------------------------------------------------------------------------------------------------------
# Pretrained model base
# ----------------------------------------------------------------------------------------------------------------------
class MonoFormerPreTrainedModel(PreTrainedModel):
    # `_no_split_modules` and `_skip_keys_device_placement` are collected from the LLM body by `post_init`.
    config: MonoFormerConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_flash_attn = True  # accepted for text; refused with a clear error once a sequence holds images
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, MonoFormerModel):
            # Patch embedding as a stride-p conv (DiT): xavier on the flattened kernel.
            patch_linear = module.x_embedder if isinstance(module.x_embedder, nn.Linear) else module.x_embedder.proj
            init.xavier_uniform_(patch_linear.weight)
            init.zeros_(patch_linear.bias)
            # Conditioning starts as the identity (DiT's zero-init), so it cannot disturb the pretrained LLM.
            if module.t_modulation is not None:
                init.zeros_(module.t_modulation[-1].weight)
                init.zeros_(module.t_modulation[-1].bias)
            if module.t_projector is not None:
                init.zeros_(module.t_projector[-1].weight)
                init.zeros_(module.t_projector[-1].bias)
            init_image_experts(module.language_model)  # image experts start as the text weights
        elif isinstance(module, MonoFormerFinalLayer):
            # Zero adaLN (identity modulation); the output Linear keeps normal(initializer_range) as the original
            # release does: a zero output layer would make every untrained diffusion output identical.
            init.zeros_(module.adaLN_modulation[-1].weight)
            init.zeros_(module.adaLN_modulation[-1].bias)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, minus a stale shard index: transformers deletes the shards of an earlier
        sharded save in the same folder but keeps its `*.index.json`, which then names files that no longer exist."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if not os.path.isdir(save_directory):
            return
        for name in os.listdir(save_directory):
            if not name.endswith(".index.json"):
                continue
            path = os.path.join(save_directory, name)
            with open(path) as f:
                shards = set(json.load(f).get("weight_map", {}).values())
            if any(not os.path.isfile(os.path.join(save_directory, shard)) for shard in shards):
                os.remove(path)

    # The parent's signature: diffusers' `DiffusionPipeline.save_pretrained` reads it to decide whether to pass
    # `variant`, `max_shard_size` and `save_peft_format` (with `*args, **kwargs` it passed none of them).
    save_pretrained.__signature__ = inspect.signature(PreTrainedModel.save_pretrained)


# ----------------------------------------------------------------------------------------------------------------------
# The model without heads
# ----------------------------------------------------------------------------------------------------------------------
class MonoFormerModel(MonoFormerPreTrainedModel):
    """The LLM body plus the image input path: patch embedding, 2D position embedding, timestep conditioning."""

    def __init__(self, config: MonoFormerConfig):
        super().__init__(config)
        hidden = config.text_config.hidden_size
        p, c = config.patch_size, config.latent_channels
        self.language_model = AutoModel.from_config(config.text_config)
        if config.image_experts != "none":
            add_image_experts(self.language_model, config.image_experts, config.image_lora_rank, config.image_lora_alpha)
        # (n, C, h, w) -> (n, h/p * w/p, D): one Linear over each patch, or U-Net down blocks to the patch grid
        if config.patch_embedder == "unet":
            self.x_embedder = MonoFormerUNetPatchEncoder(config)
        else:
            self.x_embedder = nn.Linear(c * p * p, hidden)
        self.t_embedder = MonoFormerTimestepEmbedder(hidden)
        mode = config.timestep_conditioning
        self.t_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden)) if mode == "adaln" else None
        self.t_projector = (
            nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden)) if mode == "token" else None
        )
        self._pos_embed_cache: dict[tuple[int, int], torch.Tensor] = {}
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    # ---------------------------------------------------------------- input checks
    def _check_timesteps(self, timesteps, n_images: int, device) -> torch.Tensor:
        if timesteps is None:  # clean context images
            return torch.zeros(n_images, device=device)
        if not isinstance(timesteps, torch.Tensor):
            timesteps = torch.as_tensor(timesteps, device=device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(n_images)
        if timesteps.shape != (n_images,):
            raise ValueError(
                f"`timesteps` must have shape ({n_images},), one per image in `latents`, got {tuple(timesteps.shape)}."
            )
        limit = self.config.num_train_timesteps
        if ((timesteps < 0) | (timesteps > limit) | timesteps.isnan()).any():  # NaN fails every comparison
            raise ValueError(
                f"`timesteps` must be finite and in [0, {limit}] (`num_train_timesteps`; DDPM steps, flow models "
                f"sigma * {limit}), got {timesteps.tolist()}."
            )
        return timesteps.to(device)

    def _check_image_inputs(self, input_ids: torch.LongTensor | None, latents, past_len: int) -> None:
        """Refuse what cannot carry images: no image token id, flash attention (which would silently drop the
        bidirectional blocks), or placeholders without any latents."""
        if latents is None:
            if input_ids is not None and past_len == 0 and self.config.image_token_id is not None:
                if bool((input_ids == self.config.image_token_id).any()):
                    raise ValueError(
                        "`input_ids` hold `<image>` placeholders but no `latents` were given: pass one latent per "
                        "image."
                    )
            return
        if self.config.image_token_id is None:
            raise ValueError("`config.image_token_id` is not set: build the model with `from_llm(...)`.")
        attn_impl = self.config.text_config._attn_implementation or ""
        if "flash" in attn_impl:
            raise ValueError(
                f"`attn_implementation={attn_impl!r}` cannot express MonoFormer's hybrid mask (bidirectional "
                "inside each image) and would silently make images causal. Load the model with "
                "`attn_implementation='sdpa'` (or 'eager' / 'flex_attention') for sequences with images."
            )

    # ---------------------------------------------------------------- image tokens
    def get_pos_embed(self, grid_height: int, grid_width: int, device, dtype) -> torch.Tensor:
        key = (grid_height, grid_width)
        if key not in self._pos_embed_cache:
            self._pos_embed_cache[key] = sincos_2d_pos_embed(self.config.text_config.hidden_size, *key)
        return self._pos_embed_cache[key].to(device=device, dtype=dtype)

    def embed_images(self, latents: torch.Tensor, timestep_embeds: torch.Tensor) -> torch.Tensor:
        """Same-size images (n, C, h, w) + their timestep embeddings (n, D) -> placeholder embeddings (n, T(+1), D)."""
        return self.embed_images_and_skips(latents, timestep_embeds)[0]

    def embed_images_and_skips(self, latents: torch.Tensor, timestep_embeds: torch.Tensor):
        """`embed_images` plus the U-Net down path's skip features for the up blocks (a tuple of (n, c, h_i, w_i);
        None for linear patches)."""
        p = self.config.patch_size
        dtype = self.patch_dtype
        gh, gw = latents.shape[-2] // p, latents.shape[-1] // p
        if self.config.patch_embedder == "unet":
            tokens, skips = self.x_embedder(latents.to(dtype), timestep_embeds.to(dtype))  # (n, T, D), T = gh * gw
        else:
            tokens, skips = self.x_embedder(patchify(latents.to(dtype), p)), None  # (n, T, D)
        if self.config.image_pos_embed == "sincos_2d":
            tokens = tokens + self.get_pos_embed(gh, gw, tokens.device, dtype)  # (T, D) broadcast
        mode = self.config.timestep_conditioning
        if mode == "adaln":
            shift, scale = self.t_modulation(timestep_embeds).unsqueeze(1).chunk(2, dim=-1)  # (n, 1, D) each
            tokens = tokens * (1 + scale) + shift
        elif mode == "add":
            tokens = tokens + timestep_embeds.unsqueeze(1)
        elif mode == "token":
            t_token = self.t_projector(timestep_embeds).unsqueeze(1)  # (n, 1, D)
            tokens = torch.cat([t_token, tokens], dim=1)  # (n, 1 + T, D)
        return tokens, skips

    @property
    def patch_dtype(self) -> torch.dtype:
        """The dtype of the patch embedder's weights (images are cast to it)."""
        return next(self.x_embedder.parameters()).dtype

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor | list[torch.Tensor] | None = None,
        timesteps: torch.Tensor | None = None,
        latents: torch.Tensor | list[torch.Tensor] | None = None,
        timestep_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple | BaseModelOutputWithPooling:
        """The embeddings that replace each image's `<image>` placeholders, as transformers' vision-language models
        return them: `pooler_output` holds one `(T_i(+1), D)` tensor per image, `last_hidden_state` their stack
        `(n, T(+1), D)` when all images have one size (else None).

        Args:
            pixel_values (`torch.Tensor` `(n, C, h, w)` or list of `(C, h, w)`, *optional*): The images, for a
                pixel-space model (`vae_scale_factor=1`); a latent model takes `latents`.
            timesteps (`torch.Tensor` of shape `(n,)`, *optional*): Each image's timestep; `None` = clean (0).
            latents (like `pixel_values`, *optional*): The images' (noisy or clean) latents.
            timestep_embeds (`torch.Tensor` of shape `(n, D)`, *optional*): `t_embedder(timesteps)` when the caller
                already has it.
        """
        latents = pixel_values_as_latents(self.config, pixel_values, latents)
        if latents is None:
            raise ValueError("`get_image_features` needs images: `pixel_values` (pixel-space models) or `latents`.")
        images = as_image_list(latents, self.config)
        if timestep_embeds is None:
            timesteps = self._check_timesteps(timesteps, len(images), images[0].device)
            timestep_embeds = self.t_embedder(timesteps, self.patch_dtype)
        features = self._image_features_and_skips(images, timestep_embeds, timesteps)[0]
        same_size = len({f.shape for f in features}) == 1
        return BaseModelOutputWithPooling(
            last_hidden_state=torch.stack(features) if same_size else None, pooler_output=features
        )

    def _image_features_and_skips(
        self, images: list[torch.Tensor], timestep_embeds: torch.Tensor, timesteps: torch.Tensor | None = None
    ):
        """`get_image_features` and, for the U-Net path, each image's skips (a tuple of `(c, h_i, w_i)`), else None.
        An image given again as the same tensor object at the same timestep is embedded once (`shared_image_sources`).
        """
        sources = shared_image_sources(images, timesteps)
        distinct = [i for i in range(len(images)) if sources is None or sources[i] == i]
        per_image: list[torch.Tensor | None] = [None] * len(images)
        per_image_skips: list | None = None
        for group in group_by_shape([images[i] for i in distinct]):  # one batched call per distinct size
            indices = [distinct[g] for g in group]
            stacked = torch.stack([images[i] for i in indices])
            tokens, skips = self.embed_images_and_skips(stacked, timestep_embeds[indices])
            for j, i in enumerate(indices):
                per_image[i] = tokens[j]
            if skips is not None:
                per_image_skips = per_image_skips or [None] * len(images)
                for j, i in enumerate(indices):
                    per_image_skips[i] = tuple(level[j] for level in skips)
        if sources is not None:
            for i, source in enumerate(sources):
                per_image[i] = per_image[source]
                if per_image_skips is not None:
                    per_image_skips[i] = per_image_skips[source]
        return per_image, per_image_skips

    def get_placeholder_mask(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.FloatTensor, image_features: list[torch.Tensor]
    ) -> torch.BoolTensor:
        """`(B, L)` mask of the `<image>` placeholders, checked against the features: as many placeholders as feature
        rows, and each image's placeholders one contiguous run inside one row, in the order of the images. Without
        `input_ids`, the placeholders are the positions of `inputs_embeds` equal to the `<image>` token's embedding."""
        if input_ids is None:
            embed = self.get_input_embeddings()
            special = [self.config.image_token_id, self.config.boi_token_id, self.config.eoi_token_id]
            image_row, *others = embed(torch.tensor(special, device=inputs_embeds.device))  # (D,) each
            if any(torch.equal(image_row, row) for row in others):
                raise ValueError(
                    "`inputs_embeds` cannot show where the images go in this model: its `<image>` embedding equals "
                    "that of `<boi>`/`<eoi>` (an LLM's new rows start as the mean row, and image-expert training keeps "
                    "them frozen). Pass `input_ids` with the images."
                )
            placeholder_mask = (inputs_embeds == image_row).all(-1)  # (B, L)
        else:
            placeholder_mask = input_ids == self.config.image_token_id  # (B, L)
        counts = [f.shape[0] for f in image_features]
        positions = placeholder_mask.reshape(-1).nonzero().squeeze(-1)  # (n_placeholders,), row-major
        if positions.numel() != sum(counts):
            raise ValueError(
                f"`input_ids` hold {positions.numel()} `<image>` placeholders (id {self.config.image_token_id}) but "
                f"`latents` need {sum(counts)} ({len(counts)} image(s): {counts}). Expand each image's placeholder "
                "with the processor (`MonoFormerProcessor`) or `config.num_image_tokens(h, w)`."
            )
        counts_t = torch.tensor(counts, device=positions.device)
        ends = counts_t.cumsum(0) - 1
        starts = ends - counts_t + 1
        seq_len = placeholder_mask.shape[1]
        same_row = positions[starts] // seq_len == positions[ends] // seq_len
        if not bool(((positions[ends] - positions[starts] == counts_t - 1) & same_row).all()):
            raise ValueError(
                "`input_ids`: the placeholders of each image must form one contiguous run inside one row, in the "
                "order of `latents`; got runs that do not line up with the images' sizes."
            )
        return placeholder_mask

    # ---------------------------------------------------------------- forward
    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        latents: torch.Tensor | list[torch.Tensor] | None = None,
        timesteps: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        pixel_values: torch.Tensor | list[torch.Tensor] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | MonoFormerModelOutputWithPast:
        r"""
        latents (`torch.Tensor` of shape `(n_images, C, h, w)` or a list of `(C, h, w)` tensors, *optional*):
            The (noisy or clean) latents of the images, in order of appearance over the flattened batch.
        timesteps (`torch.Tensor` of shape `(n_images,)`, *optional*):
            Each image's timestep on the scheduler's scale; `0` (the default) marks a clean context image.
        pixel_values (like `latents`, *optional*):
            The processor's images, for a pixel-space model (`vae_scale_factor=1`) the same as `latents`.

        Without images, every argument goes to the LLM body untouched, so text behaves exactly as the base LLM (which
        also means: no `position_ids` + left padding gives the LLM's own default positions, as without the wrapper).
        With images and no `position_ids`, positions are counted from the 2D `attention_mask` so padding is skipped.
        `image_hidden_states` come back in the form of `latents` (stacked or a list).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        if torch.is_tensor(attention_mask) and attention_mask.ndim not in (2, 4):
            raise ValueError(
                f"`attention_mask` must have shape (batch_size, sequence_length) (or be a 4D mask / BlockMask), got "
                f"shape {tuple(attention_mask.shape)}: for one sequence use `attention_mask[None]`."
            )
        latents = pixel_values_as_latents(self.config, pixel_values, latents)
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        batch_size, seq_len = inputs_embeds.shape[:2]
        past_len = cache.get_seq_length() if cache is not None else 0
        self._check_image_inputs(input_ids, latents, past_len)

        # Text only: the LLM builds its own causal mask and positions, exactly as without the wrapper.
        mask, image_patch_mask, timestep_embeds, image_skip_states = attention_mask, None, None, None
        if latents is not None:
            images = as_image_list(latents, self.config)
            # The positions the sequence reaches: packed rows restart them per sample, so a row may be longer.
            reach = past_len + seq_len if position_ids is None else int(position_ids.max()) + 1
            check_sequence_length(self.config, reach, "The sequence (cache + input)")
            timesteps = self._check_timesteps(timesteps, len(images), inputs_embeds.device)
            timestep_embeds = self.t_embedder(timesteps, inputs_embeds.dtype)  # (n, D)
            image_features, image_skip_states = self._image_features_and_skips(images, timestep_embeds, timesteps)
            placeholder_mask = self.get_placeholder_mask(input_ids, inputs_embeds, image_features)  # (B, L)
            inputs_embeds = inputs_embeds.masked_scatter(
                placeholder_mask.unsqueeze(-1), torch.cat(image_features).to(inputs_embeds.dtype)
            )
            block_ids = get_image_block_ids(
                placeholder_mask, [f.shape[0] for f in image_features], self.config.tokens_per_image_extra
            )  # (B, L)
            # (B, L) True on patch tokens (not a "token"-mode timestep token): the diffusion head reads them, and it
            # is the routing mask for anything that treats image tokens apart (image experts).
            image_patch_mask = block_ids >= 0
            if self.config.image_experts != "none":  # patch tokens run through the image weights
                kwargs["image_routing"] = ImageTokenRouting(image_patch_mask)
            if position_ids is None:
                position_ids = image_position_ids(attention_mask, past_len, batch_size, seq_len, inputs_embeds.device)
            # A 4D mask / BlockMask given by the caller is used as is. Without any mask, explicit position ids that
            # restart (several samples packed in one row) make `create_causal_mask` cut attention between samples.
            if attention_mask is None or attention_mask.ndim == 2:
                mask = create_hybrid_attention_mask(
                    self.language_model.config, inputs_embeds, attention_mask, cache, position_ids, block_ids
                )

        # Unset flags are not passed: the body's output capturing reads its own config then (an explicit None would
        # override it); this model's config (`model.config.output_attentions = True`) counts too.
        for name, value in (("output_attentions", output_attentions), ("output_hidden_states", output_hidden_states)):
            if value is None:
                value = getattr(self.config, name, False) or None
            if value is not None:
                kwargs[name] = value
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        image_hidden_states = None
        if image_patch_mask is not None:  # gather the patch tokens back, image by image: [(T_i, D)]
            n_patches = [f.shape[0] - self.config.tokens_per_image_extra for f in image_features]
            patch_states = outputs.last_hidden_state[image_patch_mask]  # (sum T_i, D), image order
            image_hidden_states = like_latents(list(patch_states.split(n_patches)), latents)

        return MonoFormerModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            cache=outputs.cache,  # the body's (None when `use_cache` resolves to False), as the base LLM returns
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=image_hidden_states,
            timestep_embeds=timestep_embeds,
            image_skip_states=image_skip_states,
        )


# ----------------------------------------------------------------------------------------------------------------------
# The model with its two heads
# ----------------------------------------------------------------------------------------------------------------------
class MonoFormerForConditionalGeneration(MonoFormerPreTrainedModel, GenerationMixin):
    """MonoFormer with its language-modelling head and its diffusion head (DiT final layer + unpatchify).

    Example:

    ```python
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> llm = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128,
    ...                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    >>> model = MonoFormerForConditionalGeneration.from_llm(llm, latent_channels=4, patch_size=2)
    >>> n = model.config.num_image_tokens(8, 8)  # placeholders for one 8x8 latent
    >>> c = model.config
    >>> ids = torch.tensor([[1, 2, c.boi_token_id] + [c.image_token_id] * n + [c.eoi_token_id]])
    >>> out = model(input_ids=ids, latents=torch.randn(1, 4, 8, 8), timesteps=torch.tensor([500]))
    >>> out.logits.shape, out.diffusion_output.shape
    (torch.Size([1, 20, 303]), torch.Size([1, 4, 8, 8]))
    ```
    """

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    # `Trainer` must average `loss` over accumulated micro-batches itself: its token-count path (`num_items_in_batch`)
    # skips that division, which is right for a token-summed LM loss but would scale the per-batch diffusion mean by
    # the accumulation steps and the number of processes.
    accepts_loss_kwargs = False
    _tp_plan = {"lm_head": "colwise_gather_output"}  # as LlamaForCausalLM; the body's plan comes from text_config

    def __init__(self, config: MonoFormerConfig):
        super().__init__(config)
        self.model = MonoFormerModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        if config.patch_embedder == "unet":  # the head writes features for the U-Net up blocks
            self.final_layer = MonoFormerFinalLayer(config.text_config.hidden_size, 1, unet_head_features(config))
            self.patch_decoder = MonoFormerUNetPatchDecoder(config)
        else:
            self.final_layer = MonoFormerFinalLayer(
                config.text_config.hidden_size, config.patch_size, config.out_channels
            )
            self.patch_decoder = None
        # Both auto classes map to this class, so no weight is dropped whichever a user picks.
        auto_map = dict(getattr(config, "auto_map", None) or {})
        auto_map.setdefault("AutoModelForCausalLM", "modeling_monoformer.MonoFormerForConditionalGeneration")
        config.auto_map = auto_map
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def get_decoder(self):
        return self.model.language_model

    # ---------------------------------------------------------------- diffusion head
    def decode_image_states(self, image_hidden_states, timestep_embeds, latents, image_skip_states=None):
        """Image-token hidden states -> diffusion output shaped like `latents` with `config.out_channels` channels.

        `image_hidden_states`: `(n, T, D)` or a list of `(T_i, D)`; `timestep_embeds`: `(n, D)`; `latents` gives each
        image's size and the form of the result (stacked or a list); `image_skip_states`: the U-Net path's skips per
        image (`MonoFormerModelOutputWithPast.image_skip_states`).
        """
        images = as_image_list(latents, self.config)
        states = list(image_hidden_states)  # [(T_i, D)]
        outputs: list[torch.Tensor | None] = [None] * len(images)
        for indices in group_by_shape(images):  # one batched call per distinct size
            height, width = images[indices[0]].shape[-2:]
            out = self.final_layer(torch.stack([states[i] for i in indices]), timestep_embeds[indices])  # (n, T, p*p*C)
            if self.patch_decoder is None:
                out = unpatchify(out, height, width, self.config.patch_size)  # (n, C_out, h, w)
            else:  # out: (n, T, r*r*c_last) -> U-Net up blocks with this group's skips, level by level
                skips = tuple(torch.stack(level) for level in zip(*(image_skip_states[i] for i in indices)))
                out = self.patch_decoder(out, timestep_embeds[indices].to(out.dtype), skips, height, width)
            for j, i in enumerate(indices):
                outputs[i] = out[j]
        return like_latents(outputs, latents)

    def diffusion_loss_function(self, diffusion_output, diffusion_target) -> torch.Tensor | None:
        """MSE on the prediction channels, mean over each image, then over the images that have a target.

        `diffusion_target` is like `latents`: a tensor, or a list whose entries may be `None` (no loss on that image).
        """
        c = self.config.latent_channels
        predictions = list(diffusion_output)  # [(C_out, h, w)]
        if isinstance(diffusion_target, torch.Tensor) and diffusion_target.ndim == 4:
            targets = list(diffusion_target.unbind(0))
        elif isinstance(diffusion_target, (list, tuple)):
            targets = list(diffusion_target)
        else:
            raise ValueError(
                "`diffusion_target` must be like `latents`: a (n_images, C, h, w) tensor or a list of (C, h, w) "
                "tensors (None for images without a loss), got "
                f"{getattr(diffusion_target, 'shape', type(diffusion_target).__name__)}."
            )
        if len(targets) != len(predictions):
            raise ValueError(f"`diffusion_target` holds {len(targets)} images but `latents` hold {len(predictions)}.")
        per_image = []
        for i, (prediction, target) in enumerate(zip(predictions, targets)):
            if target is None:
                continue
            if target.shape != (c, *prediction.shape[1:]):
                raise ValueError(
                    f"`diffusion_target` image {i} has shape {tuple(target.shape)}, expected "
                    f"{(c, *prediction.shape[1:])} (like `latents`)."
                )
            per_image.append(((prediction[:c].float() - target.float()) ** 2).mean())
        return torch.stack(per_image).mean() if per_image else None

    def lm_loss_function(self, hidden_states, labels, input_ids=None, **loss_kwargs) -> torch.Tensor:
        """Shifted next-token cross-entropy (transformers' `loss_function`) from the final hidden states `(B, L, D)`;
        an `<image>` placeholder is never a target, whether labelled through `labels` (at placeholder positions) or a
        pre-shifted `shift_labels`.

        The LM head runs only on the positions that have a target: in a text-to-image batch most positions are image
        patches (49 of 59 per Fashion-MNIST sample), and full `(B, L, vocab)` logits, their float copy and their
        softmax were about a third of a profiled SmolLM2 training step. Same terms, same sum.
        """
        ignore_index = loss_kwargs.pop("ignore_index", -100)
        shift_labels = loss_kwargs.pop("shift_labels", None)
        image_token_id = self.config.image_token_id
        if shift_labels is None:
            if labels.shape != hidden_states.shape[:2]:
                raise ValueError(
                    f"`labels` must have shape {tuple(hidden_states.shape[:2])} (batch, sequence), like `input_ids`; "
                    f"got {tuple(labels.shape)}."
                )
            if image_token_id is not None and input_ids is not None:
                labels = labels.masked_fill(input_ids == image_token_id, ignore_index)
            shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]  # (B, L)
        if image_token_id is not None:
            shift_labels = shift_labels.masked_fill(shift_labels == image_token_id, ignore_index)
        if shift_labels.shape != hidden_states.shape[:2]:
            raise ValueError(
                f"`labels` / `shift_labels` must have shape {tuple(hidden_states.shape[:2])} (batch, sequence), got "
                f"{tuple(shift_labels.shape)}."
            )
        keep = shift_labels != ignore_index  # (B, L)
        # A sum over the predicted tokens divided by their count (at least 1): the usual mean, and a counted zero
        # (not NaN) for a batch that predicts no text, e.g. only prompt-dropped images on a tokenizer without BOS.
        num_items = loss_kwargs.pop("num_items_in_batch", None)
        if num_items is None:
            num_items = keep.sum()
        num_items = num_items.clamp(min=1) if torch.is_tensor(num_items) else max(num_items, 1)
        logits = self.lm_head(hidden_states[keep])  # (n_targets, vocab)
        return self.loss_function(
            logits=logits[None],
            labels=None,
            shift_labels=shift_labels[keep][None],
            vocab_size=self.config.text_config.vocab_size,
            num_items_in_batch=num_items,
            ignore_index=ignore_index,
            **loss_kwargs,
        )

    # ---------------------------------------------------------------- forward
    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        latents: torch.Tensor | list[torch.Tensor] | None = None,
        timesteps: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        diffusion_target: torch.Tensor | list[torch.Tensor | None] | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        pixel_values: torch.Tensor | list[torch.Tensor] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | MonoFormerCausalLMOutputWithPast:
        r"""
        latents (`torch.Tensor` `(n_images, C, h, w)` or list of `(C, h, w)`, *optional*):
            Image latents in order of appearance over the flattened batch (noisy for generation, clean for context).
        timesteps (`torch.Tensor` of shape `(n_images,)`, *optional*):
            Timesteps on the scheduler's scale (DDPM steps; flow models `sigma * 1000`); `0`/None = clean context.
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Text labels (unshifted); `-100` is ignored and `<image>` placeholders are ignored automatically. Loss
            keyword arguments (`shift_labels`, `num_items_in_batch`, `ignore_index`) go to the loss.
        diffusion_target (like `latents`, *optional*):
            The regression target for the objective (`epsilon`: noise, `v_prediction`: velocity, `flow`:
            `noise - x0`); list entries may be `None` for context images.
        pixel_values (like `latents`, *optional*):
            The processor's images (`model.generate(**processor(text, images=...))`), for a pixel-space model
            (`vae_scale_factor=1`) the same as `latents`; a latent model refuses them (encode them with the VAE).
        """
        latents = pixel_values_as_latents(self.config, pixel_values, latents)
        if diffusion_target is not None and latents is None:
            raise ValueError("`diffusion_target` was given without `latents`.")
        # Loss-only arguments stay out of the LLM body.
        loss_kwargs = {k: kwargs.pop(k) for k in ("num_items_in_batch", "ignore_index", "shift_labels") if k in kwargs}
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            latents=latents,
            timesteps=timesteps,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state  # (B, L, D)
        logits = self.lm_head(slice_logits_to_keep(hidden_states, logits_to_keep))

        diffusion_output = lm_loss = diffusion_loss = loss = None
        if latents is not None:
            diffusion_output = self.decode_image_states(
                outputs.image_hidden_states, outputs.timestep_embeds, latents, outputs.image_skip_states
            )
        if labels is not None:
            lm_loss = self.lm_loss_function(hidden_states, labels, input_ids, **loss_kwargs)
        if diffusion_target is not None:
            diffusion_loss = self.diffusion_loss_function(diffusion_output, diffusion_target)
        weighted = [(self.config.lm_loss_weight, lm_loss), (self.config.diffusion_loss_weight, diffusion_loss)]
        if lm_loss is not None or diffusion_loss is not None:
            loss = sum(weight * part for weight, part in weighted if part is not None)

        return MonoFormerCausalLMOutputWithPast(
            loss=loss,
            lm_loss=lm_loss,
            diffusion_loss=diffusion_loss,
            logits=logits,
            diffusion_output=diffusion_output,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def prepare_inputs_for_generation(
        self, input_ids, cache=None, inputs_embeds=None, latents=None, timesteps=None, pixel_values=None,
        is_first_iteration=False, **kwargs,
    ):
        # `inputs_embeds` is named here: `generate` looks for it in this signature before it accepts embeddings.
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, cache=cache, inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration, **kwargs
        )
        # Images in the prompt go in (clean) with the prefill only; decoding steps see them through the cache.
        if is_first_iteration or cache is None or cache.get_seq_length() == 0:
            model_inputs["latents"] = pixel_values_as_latents(self.config, pixel_values, latents)
            model_inputs["timesteps"] = timesteps
        return model_inputs

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """Beam search and `num_return_sequences` repeat each row `expand_size` times. Images are listed over the
        flattened batch, not one per row, so each row's images (and their timesteps) are repeated with their row."""
        image_kwargs = {k: model_kwargs.pop(k) for k in ("latents", "pixel_values", "timesteps")
                        if model_kwargs.get(k) is not None}
        expanded_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size, is_encoder_decoder, input_ids, **model_kwargs
        )
        if expand_size > 1 and image_kwargs and input_ids is not None and self.config.image_token_id is not None:
            placeholders = input_ids == self.config.image_token_id  # (B, L); each image is one run of them
            run_starts = placeholders & ~nn.functional.pad(placeholders, (1, 0))[:, :-1]
            per_row = run_starts.sum(1).tolist()
            firsts = [sum(per_row[:r]) for r in range(len(per_row))]
            order = [first + k for first, n in zip(firsts, per_row) for _ in range(expand_size) for k in range(n)]
            for key, value in image_kwargs.items():
                count = (len(value) if isinstance(value, (list, tuple))
                         else value.shape[0] if torch.is_tensor(value) and value.ndim > 0 else None)
                if count == sum(per_row):  # otherwise left as given: the forward names the mismatch
                    value = [value[i] for i in order] if isinstance(value, (list, tuple)) else value[order]
                image_kwargs[key] = value
        model_kwargs.update(image_kwargs)
        return expanded_ids, model_kwargs

    def _validate_generated_length(self, generation_config, input_ids_length, has_default_max_length):
        """Refuse, before the first token, a generation that would run past the LLM's trained positions
        (`config.trained_position_limit`: an LLM with a scaled RoPE decides its own context)."""
        super()._validate_generated_length(generation_config, input_ids_length, has_default_max_length)
        max_positions = self.config.trained_position_limit
        if max_positions is not None and generation_config.max_length > max_positions:
            raise ValueError(
                f"A {input_ids_length}-token prompt plus `max_new_tokens`={generation_config.max_length - input_ids_length}"
                f" needs {generation_config.max_length} positions, more than the LLM's max_position_embeddings="
                f"{max_positions}: ask for at most {max(max_positions - input_ids_length, 0)} new tokens."
            )

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, strict about our own checkpoints.

        - A local folder without `config.json` is refused before anything is built (transformers would build the
          default config and only then fail to fit the weights);
        - missing or unexpected weights raise a `ValueError` naming them: they mean the config no longer describes
          the weights (an edited `timestep_conditioning` or `num_hidden_layers`, say), and the model would silently
          compute something else. Pass `output_loading_info=True` to receive the report instead of the error.
        """
        folder = os.path.join(os.fspath(pretrained_model_name_or_path or ""), kwargs.get("subfolder") or "")
        if kwargs.get("config") is None and folder and os.path.isdir(folder) and not os.path.isfile(
            os.path.join(folder, "config.json")
        ):
            raise ValueError(
                f"{folder!r} has no config.json, so it is not a MonoFormer checkpoint folder: restore the file (it is "
                "written by `save_pretrained` next to the weights) or pass `config=`."
            )
        if kwargs.get("output_loading_info"):
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *model_args, output_loading_info=True,
                                              **kwargs)
        problems = [f"{name.replace('_', ' ')}: {sorted(info[name])}" for name in ("missing_keys", "unexpected_keys")
                    if info.get(name)]
        if problems:
            raise ValueError(
                f"The weights in {folder!r} do not match its config ({'; '.join(problems)}). Was config.json edited "
                "(timestep_conditioning, num_hidden_layers, ...)? Restore the config the weights were saved with, or "
                "pass `output_loading_info=True` to load anyway and inspect the report."
            )
        return model

    # ---------------------------------------------------------------- wrapping a pretrained LLM
    @classmethod
    def from_llm(cls, llm, tokenizer=None, **config_overrides) -> "MonoFormerForConditionalGeneration":
        """Wrap a pretrained causal LLM (a loaded `*ForCausalLM` or a folder) into a MonoFormer.

        Copies every LLM weight, adds `<boi>`, `<eoi>` and `<image>` (to `tokenizer` too, in place, when given),
        resizes the embeddings to `max(current rows, len(tokenizer))` (3 more rows without a tokenizer) with new rows
        set to the mean of the existing ones, and stores the token ids in the config. On text-only input the result's
        logits equal the LLM's exactly.

        Args:
            llm (`PreTrainedModel` or `str`): A causal LM (`LlamaForCausalLM`, `Qwen2ForCausalLM`, ...) or its folder.
            tokenizer (*optional*): The LLM's tokenizer; the image special tokens are added to it.
            **config_overrides: Any `MonoFormerConfig` field (`latent_channels`, `patch_size`, ...).
        """
        if isinstance(llm, (str, os.PathLike)):
            llm = AutoModelForCausalLM.from_pretrained(llm)
        if not isinstance(llm, PreTrainedModel) or llm.get_output_embeddings() is None:
            raise TypeError(f"`llm` must be a causal LM (`*ForCausalLM`) or its folder, got {type(llm).__name__}.")
        body = llm.base_model
        if not isinstance(getattr(body, "embed_tokens", None), nn.Embedding) or not hasattr(body, "layers"):
            raise ValueError(
                f"{type(llm).__name__} has a {type(body).__name__} body without `embed_tokens` and `layers`: "
                "MonoFormer wraps Llama-style decoders (Llama, Qwen2, Mistral, SmolLM2, ...)."
            )
        text_config_dict = llm.config.to_dict()
        text_config_dict.pop("quantization_config", None)  # a GGUF-loaded LLM is dequantized in memory
        text_config = llm.config.__class__.from_dict(text_config_dict)
        old_rows = llm.get_input_embeddings().weight.shape[0]

        if tokenizer is not None:
            missing = [tok for tok in IMAGE_SPECIAL_TOKENS.values() if tok not in tokenizer.get_vocab()]
            if missing:
                tokenizer.add_tokens(missing, special_tokens=True)
            ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in IMAGE_SPECIAL_TOKENS.items()}
            new_rows = max(old_rows, len(tokenizer))
            if max(ids.values()) >= new_rows:
                raise ValueError("The tokenizer's image token ids do not fit the resized embedding matrix.")
        else:
            ids = {k: old_rows + i for i, k in enumerate(IMAGE_SPECIAL_TOKENS)}
            new_rows = old_rows + len(IMAGE_SPECIAL_TOKENS)
        text_config.vocab_size = new_rows

        config_kwargs = {
            "image_token_id": ids["image"],
            "boi_token_id": ids["boi"],
            "eoi_token_id": ids["eoi"],
            "tie_word_embeddings": bool(getattr(llm.config, "tie_word_embeddings", False)),
        }
        config_kwargs.update(config_overrides)
        attn_impl = llm.config._attn_implementation
        config = MonoFormerConfig(text_config=text_config, **config_kwargs)
        model = cls(config).to(llm.dtype)
        model.set_attn_implementation(attn_impl or "sdpa")

        state = {k: v for k, v in body.state_dict().items() if k != "embed_tokens.weight"}
        result = model.model.language_model.load_state_dict(state, strict=False)
        missing = {k for k in result.missing_keys if not is_image_expert_parameter(k)}
        if result.unexpected_keys or missing != {"embed_tokens.weight"}:
            raise ValueError(
                f"Could not copy the LLM body: missing {result.missing_keys}, unexpected {result.unexpected_keys}."
            )
        with torch.no_grad():
            old_in = llm.get_input_embeddings().weight
            new_in = model.get_input_embeddings().weight
            new_in[:old_rows] = old_in
            new_in[old_rows:] = old_in.mean(0, keepdim=True)
            if not config.tie_word_embeddings:
                old_out = llm.get_output_embeddings().weight
                new_out = model.lm_head.weight
                new_out[:old_rows] = old_out
                new_out[old_rows:] = old_out.mean(0, keepdim=True)
        init_image_experts(model.model.language_model, respect_loaded=False)  # copies of the LLM's weights
        model.tie_weights()
        model.generation_config = llm.generation_config.__class__.from_dict(llm.generation_config.to_dict())
        return model


MonoFormerForConditionalGeneration.register_for_auto_class("AutoModel")

__all__ = [
    "MonoFormerPreTrainedModel",
    "MonoFormerModel",
    "MonoFormerForConditionalGeneration",
    "patchify",
    "unpatchify",
    "sincos_2d_pos_embed",
]
