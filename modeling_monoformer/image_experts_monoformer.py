"""Modality-routed image weights ("image experts") for MonoFormer's LLM body: LMFusion's full copy and Partial LoRA.

`config.image_experts` picks the mode:
- `"none"`: one set of weights for every token (the original MonoFormer).
- `"full"` (LMFusion, arXiv 2412.15188): every decoder layer gets a second copy of its attention projections
  (q/k/v/o), its MLP projections and its two norms (`input_layernorm`, `post_attention_layernorm`), initialised from the
  LLM's own weights. Image patch tokens run through the copy, every other token through the original weights.
- `"lora"` (Partial LoRA, InternLM-XComposer2, arXiv 2401.16420): every attention and MLP projection `W` gets a low-rank
  pair; image patch tokens see `W + (alpha / rank) * B @ A`, other tokens `W`. Norms are shared. `B` starts at zero.

Routing is by token type, decided once per forward by the patch-token mask (`ImageTokenRouting`): a `"full"` module
gathers the rows of each type, runs each set of weights on its own rows only and scatters the results back; a
`"lora"` projection runs its shared `W` on every row and adds the low-rank term to the image rows only. Either way
every token costs the LLM's FLOPs (plus, for image tokens, the low-rank product). Attention itself is shared (one
sequence, one KV cache, the hybrid mask). Which tokens are "image" tokens: exactly the patch tokens (those that
form the bidirectional image blocks and feed the diffusion head). `<boi>`, `<eoi>`, padding and the `"token"`-mode
timestep token take the text path: they are causal tokens, and the timestep token's input comes from the trained
`t_projector`, so only the patch tokens need different weights.

Text exactness: a forward without images runs each original module's own `forward` on the whole input, i.e. the very
same kernels as the plain LLM, so its logits equal the base LLM's bit for bit as long as the text weights are frozen
(`freeze_text_weights`: embeddings, `lm_head`, the body's original projections and norms). With images in the
sequence, text tokens read the image tokens' keys and values through the shared attention (that is how understanding
works), so "exact" is a statement about text-only inputs.

Mechanics: the routed modules keep their class's own `forward` (any Linear, any norm class: Llama, Qwen2, Mistral, ...)
through a generated subclass, the way `torch.nn.utils.parametrize` does it, so the original weights keep their
state-dict names (`layers.0.self_attn.q_proj.weight`) and the image weights sit next to them
(`...q_proj.image.weight`, `...q_proj.image_lora_A.weight`). The decoder layer's subclass receives the routing as the
keyword argument `image_routing` (the body forwards extra keyword arguments to its layers) and lends it to its routed
modules for the duration of its own `forward`, which is also what activation checkpointing replays.
"""

import copy

import torch
from torch import nn
from transformers import initialization as init

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")


# ----------------------------------------------------------------------------------------------------------------------
# Which rows are image tokens
# ----------------------------------------------------------------------------------------------------------------------
class ImageTokenRouting:
    """Row indices of image patch tokens and of all other tokens in a flattened `(B * L, D)` layer input.

    Built once per forward from the boolean patch-token mask `(B, L)`; every routed module of every layer reuses it.
    """

    def __init__(self, patch_mask: torch.Tensor):
        flat = patch_mask.reshape(-1).bool()
        self.num_tokens = flat.numel()
        self.image_index = flat.nonzero().squeeze(-1)  # (n_image,)
        self.text_index = (~flat).nonzero().squeeze(-1)  # (n_text,)
        self.all_text = self.image_index.numel() == 0
        self.all_image = self.text_index.numel() == 0


class _RoutingSlot:
    """The routing of the layer call in progress, shared by one decoder layer and its routed modules."""

    routing: ImageTokenRouting | None = None


def _check_routing_covers(module: nn.Module, x: torch.Tensor, routing: ImageTokenRouting) -> None:
    if x.shape[:-1].numel() != routing.num_tokens:
        raise ValueError(
            f"{type(module).__name__} got {x.shape[:-1].numel()} tokens but the image routing covers "
            f"{routing.num_tokens}: the body must keep the (batch, sequence) layout inside its layers."
        )


def _route(module: nn.Module, x: torch.Tensor, text_forward, image_forward) -> torch.Tensor:
    """Run `text_forward` on the text rows of `x` (..., D) and `image_forward` on the image rows; one pass per token."""
    routing = module._image_routing_slot.routing
    if routing is None or routing.all_text:
        return text_forward(x)  # the plain module on the whole input: bit-identical to the LLM
    if routing.all_image:
        return image_forward(x)  # e.g. the pipeline's cached denoising block
    _check_routing_covers(module, x, routing)
    flat = x.reshape(-1, x.shape[-1])  # (B * L, D)
    text_out = text_forward(flat.index_select(0, routing.text_index))  # (n_text, D_out)
    image_out = image_forward(flat.index_select(0, routing.image_index))  # (n_image, D_out)
    out = text_out.new_empty(flat.shape[0], text_out.shape[-1])
    out.index_copy_(0, routing.text_index, text_out)
    out.index_copy_(0, routing.image_index, image_out.to(text_out.dtype))
    return out.reshape(*x.shape[:-1], out.shape[-1])


class ImageExpertMixin:
    """`"full"` mode: image rows go through `self.image`, a copy of the module (any Linear or norm class)."""

    def forward(self, x):
        return _route(self, x, super().forward, self.image)


class ImageLoraMixin:
    """`"lora"` mode (Linear only): image rows see `W x + scaling * B(A(x))`, text rows `W x`.

    `W` is shared, so it runs once on every row (one GEMM, as in the LLM) and only the low-rank term is routed: it is
    computed on the image rows alone and added to them. Against splitting `W x` by token type too, that is 3 kernels
    per projection instead of 6 (no text gather, one GEMM, one scatter); what each row computes is the same.
    """

    def lora_delta(self, x):
        return self.image_lora_B(self.image_lora_A(x)) * self.image_lora_scaling

    def forward(self, x):
        out = super().forward(x)  # (..., D_out): W x on every row, the plain Linear (bit-identical on text-only input)
        routing = self._image_routing_slot.routing
        if routing is None or routing.all_text:
            return out
        if routing.all_image:
            return out + self.lora_delta(x)  # e.g. the pipeline's cached denoising block
        _check_routing_covers(self, x, routing)
        delta = self.lora_delta(x.reshape(-1, x.shape[-1]).index_select(0, routing.image_index))  # (n_image, D_out)
        flat = out.reshape(-1, out.shape[-1]).index_add(0, routing.image_index, delta.to(out.dtype))
        return flat.reshape(out.shape)


class ImageRoutedDecoderLayerMixin:
    """Takes `image_routing` from the body's keyword arguments and lends it to the layer's routed modules."""

    def forward(self, *args, image_routing: ImageTokenRouting | None = None, **kwargs):
        slot = self._image_routing_slot
        slot.routing = image_routing
        try:
            return super().forward(*args, **kwargs)
        finally:
            slot.routing = None


_ROUTED_CLASSES: dict[tuple[type, type], type] = {}


def _routed_class(mixin: type, base: type) -> type:
    """`ImageRouted<Base>`: `mixin` in front of `base`, created once per pair (as torch's parametrize does)."""
    key = (mixin, base)
    if key not in _ROUTED_CLASSES:
        _ROUTED_CLASSES[key] = type(f"ImageRouted{base.__name__}", (mixin, base), {})
    return _ROUTED_CLASSES[key]


def is_image_routed(module: nn.Module) -> bool:
    return isinstance(module, (ImageExpertMixin, ImageLoraMixin))


# ----------------------------------------------------------------------------------------------------------------------
# Building the routed body
# ----------------------------------------------------------------------------------------------------------------------
def _decoder_layers(body: nn.Module, mode: str) -> nn.ModuleList:
    layers = getattr(body, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(
            f"`image_experts={mode!r}` needs an LLM body with a `layers` list of decoder layers; "
            f"{type(body).__name__} has none. Use `image_experts='none'` for this LLM."
        )
    return layers


def _routed_parts(layer: nn.Module, mode: str) -> dict[str, nn.Module]:
    """Path inside `layer` -> module to route, checked: q/k/v/o and the MLP's Linear projections (+ norms in "full")."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    parts, missing = {}, []
    for name in ATTENTION_PROJECTIONS:
        proj = getattr(attn, name, None) if attn is not None else None
        if isinstance(proj, nn.Linear):
            parts[f"self_attn.{name}"] = proj
        else:
            missing.append(f"self_attn.{name} (nn.Linear)")
    mlp_linears = {n: m for n, m in mlp.named_children() if isinstance(m, nn.Linear)} if mlp is not None else {}
    if not mlp_linears:
        missing.append("mlp with nn.Linear projections")
    parts.update({f"mlp.{n}": m for n, m in mlp_linears.items()})
    if mode == "full":
        for name in LAYER_NORMS:
            norm = getattr(layer, name, None)
            if isinstance(norm, nn.Module) and len(list(norm.children())) == 0:
                parts[name] = norm
            else:
                missing.append(name)
    if missing:
        raise ValueError(
            f"`image_experts={mode!r}` routes a decoder layer's attention projections, MLP projections and norms, but "
            f"{type(layer).__name__} lacks: {', '.join(missing)}. Use `image_experts='none'` for this LLM."
        )
    return parts


def add_image_experts(body: nn.Module, mode: str, lora_rank: int = 16, lora_alpha: float = 16.0) -> nn.Module:
    """Give every decoder layer of `body` (in place) its image weights for `mode` ("full" or "lora").

    "full" copies each routed module (so the image path starts equal to the text path); "lora" adds `A` (rank x in)
    and a zero `B` (out x rank). The text modules keep their parameters and names.
    """
    if mode not in ("full", "lora"):
        raise ValueError(f"`image_experts` must be 'full' or 'lora' to add image weights, got {mode!r}.")
    for layer in _decoder_layers(body, mode):
        if isinstance(layer, ImageRoutedDecoderLayerMixin):
            raise ValueError(f"{type(layer).__name__} already has image experts.")
        parts = _routed_parts(layer, mode)
        slot = _RoutingSlot()
        for module in parts.values():
            if mode == "full":
                module.image = copy.deepcopy(module)
                module.__class__ = _routed_class(ImageExpertMixin, type(module))
            else:
                module.image_lora_A = nn.Linear(module.in_features, lora_rank, bias=False).to(module.weight)
                module.image_lora_B = nn.Linear(lora_rank, module.out_features, bias=False).to(module.weight)
                nn.init.kaiming_uniform_(module.image_lora_A.weight, a=5**0.5)  # PEFT's LoRA init
                nn.init.zeros_(module.image_lora_B.weight)
                module.image_lora_scaling = lora_alpha / lora_rank
                module.__class__ = _routed_class(ImageLoraMixin, type(module))
            module._image_routing_slot = slot
        layer._image_routing_slot = slot
        layer.__class__ = _routed_class(ImageRoutedDecoderLayerMixin, type(layer))
    # Device maps and FSDP auto-wrap find decoder layers by class name.
    names = list(getattr(body, "_no_split_modules", None) or [])
    body._no_split_modules = names + [f"ImageRouted{n}" for n in names if not n.startswith("ImageRouted")]
    return body


def routed_modules(body: nn.Module):
    """(name, module) of every routed module of `body`."""
    return [(n, m) for n, m in body.named_modules() if is_image_routed(m)]


def init_image_experts(body: nn.Module, respect_loaded: bool = True) -> None:
    """(Re)initialise the image weights from the text weights: "full" copies them, "lora" zeroes `B`.

    With `respect_loaded` (in `_init_weights`), `transformers.initialization` leaves tensors that were loaded from a
    checkpoint alone; `from_llm` passes False after copying the LLM's weights in.
    """
    copy_, zeros_ = (init.copy_, init.zeros_) if respect_loaded else (torch.Tensor.copy_, torch.Tensor.zero_)
    with torch.no_grad():
        for _, module in routed_modules(body):
            if isinstance(module, ImageExpertMixin):
                for name, param in module.image.named_parameters(recurse=False):
                    copy_(param, getattr(module, name))
            else:
                zeros_(module.image_lora_B.weight)


def is_image_expert_parameter(name: str) -> bool:
    """Whether a parameter name of the LLM body belongs to its routed image weights."""
    return ".image." in f".{name}" or ".image_lora_" in f".{name}"


def freeze_text_weights(model: nn.Module) -> list[str]:
    """Freeze the LLM's text weights of a MonoFormer (`requires_grad=False`), leave everything else trainable.

    Frozen: the LLM body (embeddings, every original projection and norm) except its routed image weights, and
    `lm_head` (all rows, the new special tokens' too, so no text logit can move). Trainable: the image weights of the
    body and every image-path module (patch embedder, timestep embedder and conditioning, diffusion head), whatever
    they are called. Returns the names of the trainable parameters.
    """
    inner = getattr(model, "model", model)
    body = inner.language_model
    text_ids = {id(p) for n, p in body.named_parameters() if not is_image_expert_parameter(n)}
    lm_head = getattr(model, "lm_head", None)
    if lm_head is not None:
        text_ids.update(id(p) for p in lm_head.parameters())
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(id(param) not in text_ids)
        if param.requires_grad:
            trainable.append(name)
    return trainable


def enable_image_experts(model: nn.Module, mode: str, lora_rank: int = 16, lora_alpha: float = 16.0) -> nn.Module:
    """Give a loaded `image_experts="none"` MonoFormer (in place) its image weights, copied from its text weights.

    Use this to start image experts from an existing checkpoint: `from_pretrained(path, image_experts="full")` on a
    checkpoint saved without them builds the image weights before the text weights are loaded, so they would not
    start as copies. (`from_llm(llm, image_experts=...)` and checkpoints saved with experts need nothing.)
    """
    inner = getattr(model, "model", model)
    if model.config.image_experts != "none":
        raise ValueError(f"The model already has `image_experts={model.config.image_experts!r}`.")
    add_image_experts(inner.language_model, mode, lora_rank, lora_alpha)
    init_image_experts(inner.language_model, respect_loaded=False)
    model.config.image_experts = mode
    model.config.image_lora_rank, model.config.image_lora_alpha = lora_rank, float(lora_alpha)
    return model


def merge_image_lora(model: nn.Module) -> nn.Module:
    """Turn a `"lora"` MonoFormer into a `"full"` one in place: image projections `W + scaling * B @ A`, norm copies.

    The text weights are untouched (merging into `W` would change the LLM's text), so the result computes the same
    outputs with plain image copies and saves/loads as `image_experts="full"`.
    """
    inner = getattr(model, "model", model)
    if model.config.image_experts != "lora":
        raise ValueError(f"`merge_image_lora` needs `image_experts='lora'`, got {model.config.image_experts!r}.")
    body = inner.language_model
    for layer in _decoder_layers(body, "lora"):
        slot = layer._image_routing_slot
        for name, module in _routed_parts(layer, "full").items():
            if isinstance(module, ImageLoraMixin):
                base = type(module).__bases__[1]  # ImageRouted<Base> derives from (ImageLoraMixin, Base)
                with torch.no_grad():
                    delta = module.image_lora_B.weight @ module.image_lora_A.weight * module.image_lora_scaling
                    del module.image_lora_A, module.image_lora_B, module.image_lora_scaling
                    module.__class__ = base
                    image = copy.deepcopy(module)
                    image.weight += delta.to(image.weight.dtype)
            else:  # a norm, shared in "lora" mode
                image = copy.deepcopy(module)
            module.image = image
            module.__class__ = _routed_class(ImageExpertMixin, type(module))
            module._image_routing_slot = slot
    model.config.image_experts = "full"
    if inner is not model:
        inner.config.image_experts = "full"
    return model


__all__ = [
    "ImageTokenRouting",
    "add_image_experts",
    "init_image_experts",
    "enable_image_experts",
    "freeze_text_weights",
    "merge_image_lora",
    "is_image_expert_parameter",
]
