"""MonoFormer: one causal LLM that writes text (next-token cross-entropy) and paints images (diffusion MSE).

Layout of a sequence: `... <boi> <image> x N <eoi> ...`. Every `<image>` placeholder is replaced by one latent patch
token (`"token"` timestep mode: the first placeholder of each image becomes a timestep token). Attention is causal over
the whole sequence plus bidirectional among the patch tokens of the same image; the LLM's 1D RoPE runs over everything.
"""

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import ModelOutput
from transformers.utils import logging

from .configuration_monoformer import MonoFormerConfig

try:  # diffusers is a hard dependency of the package, optional for loaders that only read text
    from diffusers.models.embeddings import TimestepEmbedding, Timesteps, get_2d_sincos_pos_embed_from_grid
except ImportError:  # pragma: no cover - exercised only without diffusers
    TimestepEmbedding = Timesteps = get_2d_sincos_pos_embed_from_grid = None

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
        timestep_embeds (`torch.FloatTensor` of shape `(n_images, hidden_size)`, *optional*):
            The timestep embedding of each image (conditions the diffusion head).
    """

    last_hidden_state: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    image_hidden_states: torch.FloatTensor | list[torch.FloatTensor] | None = None
    timestep_embeds: torch.FloatTensor | None = None


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


class MonoFormerTimestepEmbedder(nn.Module):
    """Scalar timesteps -> (n, hidden): sinusoidal features (cos first, no shift, as DiT) and a 2-layer SiLU MLP."""

    def __init__(self, hidden_size: int):
        super().__init__()
        if Timesteps is None:
            raise ImportError("MonoFormer's image path needs `diffusers`: `pip install diffusers`.")
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
    config_class = MonoFormerConfig
    config: MonoFormerConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaDecoderLayer", "Qwen2DecoderLayer", "MistralDecoderLayer"]
    _skip_keys_device_placement = "cache"
    _supports_flash_attn = True  # accepted for text; refused with a clear error once a sequence holds images
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, MonoFormerModel):
            # Patch embedding as a stride-p conv (DiT): xavier on the flattened kernel.
            init.xavier_uniform_(module.x_embedder.weight)
            init.zeros_(module.x_embedder.bias)
            # Conditioning starts as the identity (DiT's zero-init), so it cannot disturb the pretrained LLM.
            if module.t_modulation is not None:
                init.zeros_(module.t_modulation[-1].weight)
                init.zeros_(module.t_modulation[-1].bias)
            if module.t_projector is not None:
                init.zeros_(module.t_projector[-1].weight)
                init.zeros_(module.t_projector[-1].bias)
        elif isinstance(module, MonoFormerFinalLayer):
            # Zero adaLN (identity modulation); the output Linear keeps normal(initializer_range) as the original
            # release does: a zero output layer would make every untrained diffusion output identical.
            init.zeros_(module.adaLN_modulation[-1].weight)
            init.zeros_(module.adaLN_modulation[-1].bias)


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
    def _check_latents(self, latents) -> list[torch.Tensor] | torch.Tensor:
        """Validate `latents` (a 4D tensor or a list of 3D tensors) and return it unchanged."""
        p, c = self.config.patch_size, self.config.latent_channels
        if isinstance(latents, torch.Tensor):
            if latents.ndim != 4:
                raise ValueError(
                    f"`latents` must be a tensor of shape (n_images, {c}, h, w) or a list of (C, h, w) tensors, "
                    f"got a tensor of shape {tuple(latents.shape)}."
                )
            shapes = [tuple(latents.shape[1:])] * latents.shape[0]
        elif isinstance(latents, (list, tuple)):
            if not all(isinstance(x, torch.Tensor) and x.ndim == 3 for x in latents):
                raise TypeError("`latents` given as a list must hold 3D tensors of shape (C, h, w), one per image.")
            shapes = [tuple(x.shape) for x in latents]
        else:
            raise TypeError(f"`latents` must be a torch.Tensor or a list of tensors, got {type(latents).__name__}.")
        for i, (ci, h, w) in enumerate(shapes):
            if ci != c:
                raise ValueError(f"`latents` image {i} has {ci} channels; this model expects `latent_channels`={c}.")
            if h % p or w % p:
                raise ValueError(
                    f"`latents` image {i} is {h}x{w}, which `patch_size`={p} does not divide. Resize the image to a "
                    f"multiple of patch_size * vae_scale_factor = {p * self.config.vae_scale_factor} pixels."
                )
        return latents

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
        return timesteps.to(device)

    # ---------------------------------------------------------------- image tokens
    def get_pos_embed(self, grid_height: int, grid_width: int, device, dtype) -> torch.Tensor:
        key = (grid_height, grid_width)
        if key not in self._pos_embed_cache:
            self._pos_embed_cache[key] = sincos_2d_pos_embed(self.config.text_config.hidden_size, *key)
        return self._pos_embed_cache[key].to(device=device, dtype=dtype)

    def embed_images(self, latents: torch.Tensor, timestep_embeds: torch.Tensor) -> torch.Tensor:
        """Same-size images (n, C, h, w) + their timestep embeddings (n, D) -> placeholder embeddings (n, T(+1), D)."""
        p = self.config.patch_size
        dtype = self.x_embedder.weight.dtype
        gh, gw = latents.shape[-2] // p, latents.shape[-1] // p
        tokens = self.x_embedder(patchify(latents.to(dtype), p))  # (n, T, D), T = gh * gw
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
        return tokens

    def _image_token_embeddings(self, latents, timestep_embeds) -> tuple[torch.Tensor, list[int]]:
        """All images' placeholder embeddings concatenated in order: (sum_i T_i(+1), D), and the count per image."""
        extra = self.config.tokens_per_image_extra
        if isinstance(latents, torch.Tensor):
            tokens = self.embed_images(latents, timestep_embeds)  # (n, T(+1), D)
            return tokens.reshape(-1, tokens.shape[-1]), [tokens.shape[1]] * tokens.shape[0]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, x in enumerate(latents):
            groups.setdefault(tuple(x.shape), []).append(i)
        per_image: list[torch.Tensor | None] = [None] * len(latents)
        for indices in groups.values():  # one batched call per distinct size
            tokens = self.embed_images(torch.stack([latents[i] for i in indices]), timestep_embeds[indices])
            for j, i in enumerate(indices):
                per_image[i] = tokens[j]
        counts = [t.shape[0] for t in per_image]
        assert all(c > extra for c in counts)
        return torch.cat(per_image, dim=0), counts

    def _locate_placeholders(self, input_ids: torch.LongTensor, counts: list[int]):
        """Check each image owns a contiguous run of placeholders in one row; return flat indices and image ids."""
        flat = (input_ids == self.config.image_token_id).reshape(-1).nonzero().squeeze(-1)  # (n_placeholders,)
        expected = sum(counts)
        if flat.numel() != expected:
            raise ValueError(
                f"`input_ids` hold {flat.numel()} `<image>` placeholders (id {self.config.image_token_id}) but "
                f"`latents` need {expected} ({len(counts)} image(s): {counts}). Expand each image's placeholder with "
                "the processor (`MonoFormerProcessor`) or `config.num_image_tokens(h, w)`."
            )
        counts_t = torch.tensor(counts, device=flat.device)
        ends = counts_t.cumsum(0) - 1
        starts = ends - counts_t + 1
        seq_len = input_ids.shape[1]
        contiguous = (flat[ends] - flat[starts] == counts_t - 1) & (flat[starts] // seq_len == flat[ends] // seq_len)
        if not bool(contiguous.all()):
            raise ValueError(
                "`input_ids`: the placeholders of each image must form one contiguous run inside one row, in the "
                "order of `latents`; got runs that do not line up with the images' sizes."
            )
        image_ids = torch.repeat_interleave(torch.arange(len(counts), device=flat.device), counts_t)
        return flat, image_ids, starts

    def _hybrid_mask(self, inputs_embeds, attention_mask, cache, position_ids, block_ids):
        """Causal + bidirectional-per-image mask in the form the LLM body takes: one 4D mask / BlockMask, or, for
        bodies mixing full and sliding-window layers (Qwen2 `layer_types`), a dict with one mask per layer type."""
        config = self.language_model.config
        kwargs = dict(
            config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache,
            position_ids=position_ids, block_sequence_ids=block_ids,
        )
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None:
            masks = {"full_attention": create_causal_mask(**kwargs)} if "full_attention" in layer_types else {}
            if "sliding_attention" in layer_types:
                masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
            if set(layer_types) - set(masks):
                raise ValueError(f"Images are not supported with LLM layer types {sorted(set(layer_types))}.")
            return masks["full_attention"] if set(masks) == {"full_attention"} else masks
        if getattr(config, "sliding_window", None) is not None:  # Mistral: every layer slides
            return create_sliding_window_causal_mask(**kwargs)
        return create_causal_mask(**kwargs)

    # ---------------------------------------------------------------- forward
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
        **kwargs,
    ) -> MonoFormerModelOutputWithPast:
        r"""
        latents (`torch.Tensor` of shape `(n_images, C, h, w)` or a list of `(C, h, w)` tensors, *optional*):
            The (noisy or clean) latents of the images, in order of appearance over the flattened batch.
        timesteps (`torch.Tensor` of shape `(n_images,)`, *optional*):
            Each image's timestep on the scheduler's scale; `0` (the default) marks a clean context image.

        Without images, every argument goes to the LLM body untouched, so text behaves exactly as the base LLM (which
        also means: no `position_ids` + left padding gives the LLM's own default positions, as without the wrapper).
        With images and no `position_ids`, positions are counted from the 2D `attention_mask` so padding is skipped.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        batch_size, seq_len = inputs_embeds.shape[:2]
        past_len = cache.get_seq_length() if cache is not None else 0

        max_positions = getattr(self.config.text_config, "max_position_embeddings", None)
        if max_positions is not None and past_len + seq_len > max_positions:
            raise ValueError(
                f"The sequence is {past_len + seq_len} tokens long (cache {past_len} + input {seq_len}), more than the "
                f"LLM's `max_position_embeddings`={max_positions}. Shorten the text or use smaller images."
            )
        mask = attention_mask  # text only: the LLM builds its own causal mask, exactly as without the wrapper
        image_hidden_states = timestep_embeds = None
        patch_flat = None
        if latents is not None:
            if input_ids is None:
                raise ValueError("`latents` need `input_ids` to find the `<image>` placeholders, not `inputs_embeds`.")
            if self.config.image_token_id is None:
                raise ValueError("`config.image_token_id` is not set: build the model with `from_llm(...)`.")
            attn_impl = self.config.text_config._attn_implementation or ""
            if "flash" in attn_impl:
                raise ValueError(
                    f"`attn_implementation={attn_impl!r}` cannot express MonoFormer's hybrid mask (bidirectional "
                    "inside each image) and would silently make images causal. Load the model with "
                    "`attn_implementation='sdpa'` (or 'eager' / 'flex_attention') for sequences with images."
                )
            latents = self._check_latents(latents)
            if position_ids is None:  # explicit positions: left padding and the cached prefix count right
                if attention_mask is not None and attention_mask.ndim == 2:
                    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq_len:]
                else:
                    position_ids = torch.arange(past_len, past_len + seq_len, device=inputs_embeds.device)
                    position_ids = position_ids.unsqueeze(0).expand(batch_size, -1)
            n_images = latents.shape[0] if isinstance(latents, torch.Tensor) else len(latents)
            timesteps = self._check_timesteps(timesteps, n_images, inputs_embeds.device)
            timestep_embeds = self.t_embedder(timesteps, inputs_embeds.dtype)  # (n, D)
            image_tokens, counts = self._image_token_embeddings(latents, timestep_embeds)  # (sum T_i, D)
            flat, image_ids, starts = self._locate_placeholders(input_ids, counts)

            inputs_embeds = inputs_embeds.reshape(-1, inputs_embeds.shape[-1]).index_copy(
                0, flat, image_tokens.to(inputs_embeds.dtype)
            ).reshape(batch_size, seq_len, -1)

            # Patch tokens form the bidirectional blocks; a "token"-mode timestep token stays causal (original layout).
            is_patch = torch.ones_like(flat, dtype=torch.bool)
            if self.config.tokens_per_image_extra:
                is_patch[starts] = False
            patch_flat = flat[is_patch]
            block_ids = torch.full((batch_size * seq_len,), -1, dtype=torch.long, device=flat.device)
            block_ids[patch_flat] = image_ids[is_patch]
            block_ids = F.pad(block_ids.reshape(batch_size, seq_len), (past_len, 0), value=-1)  # absolute kv index

            # A 4D mask / BlockMask given by the caller is used as is. Without any mask, explicit position ids that
            # restart (several samples packed in one row) make `create_causal_mask` cut attention between samples.
            if attention_mask is None or attention_mask.ndim == 2:
                mask = self._hybrid_mask(inputs_embeds, attention_mask, cache, position_ids, block_ids)
        elif input_ids is not None and past_len == 0 and self.config.image_token_id is not None:
            if bool((input_ids == self.config.image_token_id).any()):
                raise ValueError(
                    "`input_ids` hold `<image>` placeholders but no `latents` were given: pass one latent per image."
                )

        kwargs.pop("return_dict", None)  # outputs are always ModelOutputs
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        hidden = outputs.last_hidden_state  # (B, L, D)

        if patch_flat is not None:
            patch_states = hidden.reshape(-1, hidden.shape[-1])[patch_flat]  # (sum T_i, D), image order
            extra = self.config.tokens_per_image_extra
            if isinstance(latents, torch.Tensor):
                image_hidden_states = patch_states.reshape(n_images, -1, hidden.shape[-1])
            else:
                image_hidden_states = list(patch_states.split([c - extra for c in counts]))

        return MonoFormerModelOutputWithPast(
            last_hidden_state=hidden,
            cache=outputs.cache if use_cache else None,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=image_hidden_states,
            timestep_embeds=timestep_embeds,
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

    def __init__(self, config: MonoFormerConfig):
        super().__init__(config)
        self.model = MonoFormerModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.final_layer = MonoFormerFinalLayer(
            config.text_config.hidden_size, config.patch_size, config.out_channels
        )
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
    def decode_image_states(self, image_hidden_states, timestep_embeds, latents):
        """Image-token hidden states -> diffusion output shaped like `latents` with `config.out_channels` channels."""
        p = self.config.patch_size
        if isinstance(latents, torch.Tensor):
            out = self.final_layer(image_hidden_states, timestep_embeds)  # (n, T, p*p*C_out)
            return unpatchify(out, latents.shape[-2], latents.shape[-1], p)  # (n, C_out, h, w)
        outputs = []
        for i, (states, x) in enumerate(zip(image_hidden_states, latents)):
            out = self.final_layer(states.unsqueeze(0), timestep_embeds[i : i + 1])
            outputs.append(unpatchify(out, x.shape[-2], x.shape[-1], p)[0])
        return outputs

    def diffusion_loss_function(self, diffusion_output, diffusion_target) -> torch.Tensor | None:
        """MSE on the prediction channels, mean over each image, then over the images that have a target."""
        c = self.config.latent_channels
        if isinstance(diffusion_output, torch.Tensor):
            if not isinstance(diffusion_target, torch.Tensor) or diffusion_target.shape != (
                diffusion_output.shape[0], c, *diffusion_output.shape[2:]
            ):
                raise ValueError(
                    "`diffusion_target` must match `latents`: expected a tensor of shape "
                    f"{(diffusion_output.shape[0], c, *diffusion_output.shape[2:])}, got "
                    f"{getattr(diffusion_target, 'shape', type(diffusion_target).__name__)}."
                )
            err = (diffusion_output[:, :c].float() - diffusion_target.float()) ** 2
            return err.mean(dim=(1, 2, 3)).mean()
        if not isinstance(diffusion_target, (list, tuple)) or len(diffusion_target) != len(diffusion_output):
            raise ValueError("`diffusion_target` must be a list like `latents` (None for images without a loss).")
        per_image = []
        for i, (pred, target) in enumerate(zip(diffusion_output, diffusion_target)):
            if target is None:
                continue
            if target.shape != (c, *pred.shape[1:]):
                raise ValueError(f"`diffusion_target[{i}]` has shape {tuple(target.shape)}, expected {(c, *pred.shape[1:])}.")
            per_image.append(((pred[:c].float() - target.float()) ** 2).mean())
        return torch.stack(per_image).mean() if per_image else None

    # ---------------------------------------------------------------- forward
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
        **kwargs,
    ) -> MonoFormerCausalLMOutputWithPast:
        r"""
        latents (`torch.Tensor` `(n_images, C, h, w)` or list of `(C, h, w)`, *optional*):
            Image latents in order of appearance over the flattened batch (noisy for generation, clean for context).
        timesteps (`torch.Tensor` of shape `(n_images,)`, *optional*):
            Timesteps on the scheduler's scale (DDPM steps; flow models `sigma * 1000`); `0`/None = clean context.
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Text labels (unshifted); `-100` is ignored and `<image>` placeholders are ignored automatically.
        diffusion_target (like `latents`, *optional*):
            The regression target for the objective (`epsilon`: noise, `v_prediction`: velocity, `flow`:
            `noise - x0`); list entries may be `None` for context images.
        """
        if diffusion_target is not None and latents is None:
            raise ValueError("`diffusion_target` was given without `latents`.")
        # Loss-only arguments (Trainer's global token count) stay out of the LLM body.
        loss_kwargs = {k: kwargs.pop(k) for k in ("num_items_in_batch", "ignore_index") if k in kwargs}
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            latents=latents,
            timesteps=timesteps,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, slice_indices, :])

        diffusion_output = None
        if outputs.image_hidden_states is not None:
            diffusion_output = self.decode_image_states(outputs.image_hidden_states, outputs.timestep_embeds, latents)

        lm_loss = diffusion_loss = loss = None
        if labels is not None:
            if input_ids is not None and self.config.image_token_id is not None:
                labels = labels.masked_fill(input_ids == self.config.image_token_id, -100)
            full_logits = logits if logits.shape[1] == labels.shape[1] else self.lm_head(hidden)
            # A sum over the predicted tokens divided by their count (at least 1): the usual mean, and a counted zero
            # (not NaN) for a batch that predicts no text, e.g. only prompt-dropped images on a tokenizer without BOS.
            num_items = loss_kwargs.pop("num_items_in_batch", None)
            if num_items is None:
                num_items = (labels[..., 1:] != loss_kwargs.get("ignore_index", -100)).sum()
            num_items = num_items.clamp(min=1) if torch.is_tensor(num_items) else max(num_items, 1)
            lm_loss = self.loss_function(
                logits=full_logits, labels=labels, vocab_size=self.config.text_config.vocab_size,
                num_items_in_batch=num_items, **loss_kwargs,
            )
        if diffusion_target is not None:
            diffusion_loss = self.diffusion_loss_function(diffusion_output, diffusion_target)
        parts = []
        if lm_loss is not None:
            parts.append(self.config.lm_loss_weight * lm_loss)
        if diffusion_loss is not None:
            parts.append(self.config.diffusion_loss_weight * diffusion_loss)
        if parts:
            loss = sum(parts)

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
        self, input_ids, cache=None, latents=None, timesteps=None, is_first_iteration=False, **kwargs
    ):
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, cache=cache, is_first_iteration=is_first_iteration, **kwargs
        )
        # Images in the prompt go in (clean) with the prefill only; decoding steps see them through the cache.
        if is_first_iteration or cache is None or cache.get_seq_length() == 0:
            model_inputs["latents"] = latents
            model_inputs["timesteps"] = timesteps
        return model_inputs

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
        if result.unexpected_keys or set(result.missing_keys) != {"embed_tokens.weight"}:
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
