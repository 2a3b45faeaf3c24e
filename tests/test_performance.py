"""Performance contracts that can be checked fast: no KV-cache growth while sampling, flat peak memory, masks that stay
boolean (sdpa) or block-sparse (flex) instead of a float L x L matrix."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch.nn.attention.flex_attention import BlockMask

from modeling_monoformer import (
    MonoFormerForConditionalGeneration,
    MonoFormerImageProcessor,
    MonoFormerPipeline,
    MonoFormerProcessor,
)
from tests.conftest import make_tokenizer, tiny_llama


def make_pixel_pipe(image_size: int = 8, patch_size: int = 2, **llama_kwargs) -> MonoFormerPipeline:
    """A tiny pixel-space flow pipeline (no VAE, so the denoising loop is all that runs)."""
    tok = make_tokenizer()
    model = MonoFormerForConditionalGeneration.from_llm(
        tiny_llama(**llama_kwargs), tokenizer=tok, latent_channels=3, patch_size=patch_size, vae_scale_factor=1,
        sample_size=image_size, prediction_type="flow",
    ).eval()
    processor = MonoFormerProcessor(MonoFormerImageProcessor(num_channels=3), tok)
    pipe = MonoFormerPipeline(model=model, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(), processor=processor)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


# ----------------------------------------------------------------------------------------------------------------------
# No cache growth across denoising steps
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_kv_cache_does_not_grow_across_denoising_steps(guidance_scale):
    pipe = make_pixel_pipe()
    seen = []  # (cache length, cache bytes) on entry to every model call that carries the cache

    def record(module, args, kwargs):
        cache = kwargs.get("cache")
        if cache is not None:
            seen.append((cache.get_seq_length(), cache_bytes(cache) if cache.get_seq_length() else 0))

    hook = pipe.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        pipe(["a photo of a sneaker", "a coat"], num_inference_steps=12, guidance_scale=guidance_scale,
             generator=torch.manual_seed(0), output_type="latent")
    finally:
        hook.remove()
    assert seen[0] == (0, 0)  # the prefix pass fills an empty cache
    steps = seen[1:]
    assert len(steps) == 12
    prefix_len = steps[0][0]
    assert prefix_len > 0
    assert steps == [steps[0]] * 12, f"the cache changed across steps: {steps}"


_RSS_CHILD = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    sys.path.insert(0, {root!r})
    from tests.test_performance import make_pixel_pipe
    torch.set_num_threads(1)
    pipe = make_pixel_pipe(image_size=16, patch_size=1, hidden_size=128, intermediate_size=256)
    def run(steps):
        pipe(["a photo of a sneaker", "a coat"], num_inference_steps=steps, guidance_scale=4.0,
             generator=torch.manual_seed(0), output_type="latent")
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    before = run(3)
    after = run({steps})
    print(json.dumps({{"before": before, "after": after}}))
    """
)


def test_peak_rss_is_flat_in_num_inference_steps():
    """Fresh process: peak RSS after a 3-step run vs after a long run. A cache that kept each step's image block
    (4 rows x 256 tokens x 2 layers x K and V x 128 floats = 2 MiB a step) would add > 100 MiB over 60 steps; with
    `DynamicCache.crop` disabled the growth measured 270 MiB, against 1 MiB with it."""
    steps = 60
    leak_per_step = 4 * 256 * 2 * 2 * 128 * 4
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", _RSS_CHILD.format(root=root, steps=steps)], capture_output=True, text=True,
        timeout=120, cwd=root,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rss = json.loads(out.stdout.strip().splitlines()[-1])
    growth = rss["after"] - rss["before"]
    assert growth < 0.2 * steps * leak_per_step, f"peak RSS grew by {growth / 2**20:.1f} MiB over {steps} steps"


# ----------------------------------------------------------------------------------------------------------------------
# The hybrid mask stays boolean / block-sparse
# ----------------------------------------------------------------------------------------------------------------------
def capture_body_masks(model):
    masks = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: masks.append(kwargs.get("attention_mask")), with_kwargs=True
    )
    return masks, hook


def image_batch(model, padded: bool):
    c = model.config
    n = c.num_image_tokens(8, 8)
    row = [5, 6, c.boi_token_id] + [c.image_token_id] * n + [c.eoi_token_id, 7]
    ids = torch.tensor([row, [0] + row[1:]])
    attention_mask = torch.ones_like(ids)
    if padded:
        attention_mask[1, 0] = 0
    return dict(input_ids=ids, attention_mask=attention_mask, latents=torch.randn(2, 4, 8, 8),
                timesteps=torch.tensor([500, 20]))


@pytest.mark.parametrize("padded", [False, True])
def test_sdpa_body_gets_a_boolean_mask_for_sequences_with_images(padded):
    model = MonoFormerForConditionalGeneration.from_llm(tiny_llama(), latent_channels=4, patch_size=2).eval()
    model.set_attn_implementation("sdpa")
    masks, hook = capture_body_masks(model)
    try:
        with torch.no_grad():
            model(**image_batch(model, padded))
    finally:
        hook.remove()
    (mask,) = masks
    assert isinstance(mask, torch.Tensor) and mask.dtype == torch.bool, f"got {type(mask)} {getattr(mask, 'dtype', '')}"
    assert mask.ndim == 4


def test_sdpa_masks_in_the_cached_pipeline_are_boolean():
    pipe = make_pixel_pipe()
    masks, hook = capture_body_masks(pipe.model)
    try:
        pipe(["a photo of a sneaker", "a coat"], num_inference_steps=2, guidance_scale=4.0,
             generator=torch.manual_seed(0), output_type="latent")
    finally:
        hook.remove()
    four_d = [m for m in masks if isinstance(m, torch.Tensor) and m.ndim == 4]
    assert len(four_d) == 2  # one per denoising step; the text-only prefix pass leaves the mask to the LLM
    assert all(m.dtype == torch.bool for m in four_d), [m.dtype for m in four_d]


class _MaskCaptured(Exception):
    pass


def test_flex_attention_body_gets_a_block_mask():
    """Stops at the LLM body's door: running flex attention itself (compiled on CPU) is test_modeling's job."""
    model = MonoFormerForConditionalGeneration.from_llm(tiny_llama(), latent_channels=4, patch_size=2).eval()
    model.set_attn_implementation("flex_attention")
    masks = []

    def capture_and_stop(module, args, kwargs):
        masks.append(kwargs.get("attention_mask"))
        raise _MaskCaptured

    hook = model.model.language_model.register_forward_pre_hook(capture_and_stop, with_kwargs=True)
    try:
        with torch.no_grad(), pytest.raises(_MaskCaptured):
            model(**image_batch(model, padded=True))
    finally:
        hook.remove()
    (mask,) = masks
    assert isinstance(mask, BlockMask), f"got {type(mask)}"
