"""Plain PEFT LoRA for a MonoFormer: which modules get adapters, which are trained fully, which embedding rows train.

`model.add_adapter` needs peft>=0.22, so this is the `get_peft_model` route; the adapter saves and loads with
`PeftModel.save_pretrained` / `PeftModel.from_pretrained`, and `merge_and_unload` gives back a plain model. `peft` is
imported inside the functions. For LoRA that only image tokens see, use `enable_image_experts(model, "lora")`.
"""

from torch import nn

DEFAULT_LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


def image_head_module_names(config) -> list[str]:
    """The image-path modules a LoRA run trains fully (PEFT `modules_to_save`) for this `MonoFormerConfig`."""
    names = ["x_embedder", "t_embedder", "final_layer"]
    if config.patch_embedder == "unet":  # the U-Net up blocks; its down blocks are `x_embedder`
        names.append("patch_decoder")
    names.append({"adaln": "t_modulation", "token": "t_projector"}.get(config.timestep_conditioning, None))
    return [n for n in names if n is not None]


def build_lora_config(
    config, rank: int, alpha: float | None = None, dropout: float = 0.0, target_modules=DEFAULT_LORA_TARGET_MODULES
):
    """The `peft.LoraConfig` for a model with this `MonoFormerConfig`:

    - LoRA of rank `rank` (scale `alpha / rank`, `alpha` defaults to `rank`) on the LLM's `target_modules` (a list, or
      one comma-separated string as a command line gives it);
    - the new image heads in `modules_to_save` (trained fully, saved with the adapter);
    - the rows of `<boi>` and `<eoi>` in `trainable_token_indices` (input embeddings, and the untied `lm_head`): they
      are the only new tokens the model reads (`<boi>` ends every text -> image prompt) or predicts (`<boi>` starts an
      image), and they start as the mean of all rows. `<image>` placeholders are replaced by patch embeddings and
      never a target, so its row stays frozen. Training just these rows keeps the adapter small; putting the whole
      `embed_tokens`/`lm_head` in `modules_to_save` would copy the full vocabulary matrices into it.
    """
    from peft import LoraConfig

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"`rank` must be a positive int, got {rank!r}.")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"`dropout` must be in [0, 1), got {dropout!r}.")
    if isinstance(target_modules, str):
        target_modules = [t.strip() for t in target_modules.split(",") if t.strip()]
    target_modules = list(target_modules)
    if not target_modules:
        raise ValueError("`target_modules` is empty: name the LLM's projections to adapt, e.g. 'q_proj,v_proj'.")
    token_ids = [config.boi_token_id, config.eoi_token_id]
    trainable_tokens = {"embed_tokens": token_ids}
    if not config.tie_word_embeddings:
        trainable_tokens["lm_head"] = token_ids
    return LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        lora_dropout=dropout,
        target_modules=target_modules,
        modules_to_save=image_head_module_names(config),
        trainable_token_indices=trainable_tokens,
    )


def add_lora(model, rank: int, alpha: float | None = None, dropout: float = 0.0,
             target_modules=DEFAULT_LORA_TARGET_MODULES):
    """Wrap a `MonoFormerForConditionalGeneration` with PEFT LoRA (`get_peft_model` with `build_lora_config`).

    Example:
        ```python
        >>> peft_model = add_lora(model, rank=8)  # LoRA on q/k/v/o, image heads and <boi>/<eoi> rows trained
        >>> peft_model.save_pretrained("adapter")
        ```
    """
    from peft import get_peft_model

    config = build_lora_config(model.config, rank, alpha, dropout, target_modules)
    # PEFT only refuses a list that matches nothing: a typo next to a valid name would silently adapt less. A name
    # matches as PEFT matches it: a module's full name or its dotted suffix.
    names = [name for name, _ in model.get_decoder().named_modules()]
    unknown = sorted(t for t in config.target_modules if not any(n == t or n.endswith("." + t) for n in names))
    if unknown:
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.get_decoder().named_modules()
                         if isinstance(m, nn.Linear)})
        raise ValueError(f"`target_modules` {unknown} name no module of the LLM; its linear layers are {linear}.")
    return get_peft_model(model, config)


__all__ = ["DEFAULT_LORA_TARGET_MODULES", "add_lora", "build_lora_config", "image_head_module_names"]
