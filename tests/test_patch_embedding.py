"""U-Net patch path (`patch_embedder="unet"`): shapes, placeholder counts, prefix cache, training signal, round trips."""

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from modeling_monoformer import (
    MonoFormerConfig,
    MonoFormerForConditionalGeneration,
    MonoFormerImageProcessor,
    MonoFormerProcessor,
    add_lora,
    add_training_noise,
)
from modeling_monoformer import modeling_monoformer as modeling
from tests.conftest import make_tokenizer, tiny_llama
from tests.test_modeling import assert_fresh_process_load_matches, image_row
from tests.test_pipeline import PROMPTS, generate, make_pipe


def unet(llm=None, patch_size=4, channels=(8, 16), **overrides):
    config = dict(
        latent_channels=1, patch_size=patch_size, patch_embedder="unet", unet_block_channels=list(channels),
        sample_size=4 * patch_size,
    )
    config.update(overrides)
    return MonoFormerForConditionalGeneration.from_llm(llm or tiny_llama(), **config).eval()


# ----------------------------------------------------------------------------------------------------------------------
# Shapes and token counts
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "patch_size, channels, sizes, mode",
    [
        (2, (8, 16), [(8, 8), (4, 10)], "adaln"),  # downsample 2, no residual patch
        (4, (8, 16), [(8, 12), (4, 4)], "token"),  # downsample 2, residual 2x2 patch
        (7, (8,), [(28, 28), (14, 21)], "add"),  # one level, a 7x7 patch (28x28 images -> 16 tokens)
        (8, (8, 8, 8, 8), [(16, 8), (8, 16)], "adaln"),  # downsample 8, no residual patch
    ],
)
def test_unet_output_has_the_latents_shape_for_every_size_and_patch(patch_size, channels, sizes, mode):
    model = unet(patch_size=patch_size, channels=channels, timestep_conditioning=mode, learn_sigma=True)
    cfg = model.config
    (h1, w1), (h2, w2) = sizes
    assert cfg.num_image_tokens(h1, w1) == (h1 // patch_size) * (w1 // patch_size) + (mode == "token")
    same = torch.tensor([image_row(cfg, [5, 6], h1, w1, suffix=[7])] * 2)
    with torch.no_grad():
        out = model(input_ids=same, latents=torch.randn(2, 1, h1, w1), timesteps=torch.tensor([10, 900]))
    assert out.diffusion_output.shape == (2, 2, h1, w1)  # learn_sigma: 2 x latent_channels
    # several images of different sizes in one sequence: the list form, each decoded with its own skips
    row = [5] + image_row(cfg, [], h1, w1) + image_row(cfg, [6], h2, w2, suffix=[7])
    latents = [torch.randn(1, h1, w1), torch.randn(1, h2, w2)]
    with torch.no_grad():
        mixed = model(input_ids=torch.tensor([row]), latents=latents, timesteps=torch.tensor([10, 900]))
        alone = model(input_ids=torch.tensor([[5] + image_row(cfg, [], h1, w1)]), latents=latents[:1],
                      timesteps=torch.tensor([10]))
    assert [tuple(x.shape) for x in mixed.diffusion_output] == [(2, h1, w1), (2, h2, w2)]
    # the first image cannot see the second (causal across images), so its output is the same alone
    torch.testing.assert_close(mixed.diffusion_output[0], alone.diffusion_output[0], rtol=1e-4, atol=1e-5)


def test_processor_placeholders_follow_the_unet_token_count():
    tok = make_tokenizer()
    model = MonoFormerForConditionalGeneration.from_llm(
        tiny_llama(), tokenizer=tok, latent_channels=1, patch_size=7, patch_embedder="unet",
        unet_block_channels=[8], vae_scale_factor=1, sample_size=28,
    )
    processor = MonoFormerProcessor(MonoFormerImageProcessor(num_channels=1), tok).configure_for_model(model.config)
    ids = processor(text=["a coat <image>"], image_sizes=[[(28, 28)]], return_tensors="pt")["input_ids"]
    assert int((ids == model.config.image_token_id).sum()) == model.config.num_image_tokens(28, 28) == 16
    with torch.no_grad():
        out = model(input_ids=ids, latents=torch.randn(1, 1, 28, 28), timesteps=torch.tensor([500]))
    assert out.diffusion_output.shape == (1, 1, 28, 28)
    too_many = torch.cat([ids[:, :-1], ids[:, -2:]], dim=1)  # one placeholder more than the image needs
    with pytest.raises(ValueError, match="placeholders"):
        model(input_ids=too_many, latents=torch.randn(1, 1, 28, 28), timesteps=torch.tensor([500]))


def test_unet_levels_must_divide_the_patch():
    from huggingface_hub.errors import StrictDataclassError

    with pytest.raises(StrictDataclassError, match="unet_block_channels"):
        MonoFormerConfig(patch_size=7, patch_embedder="unet", unet_block_channels=[8, 16], sample_size=28)
    with pytest.raises(StrictDataclassError, match="patch_embedder"):
        MonoFormerConfig(patch_embedder="conv")


def test_text_only_logits_stay_the_base_llms():
    llm = tiny_llama()
    model = unet(llm)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits[..., :300], llm(input_ids=ids).logits, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------------
# Pipeline: prefix cache
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["adaln", "token"])
def test_unet_prefix_cached_sampling_equals_full_recompute(mode):
    pipe = make_pipe(
        pixel_space=True, num_channels=1, latent_channels=1, patch_size=4, sample_size=8, patch_embedder="unet",
        unet_block_channels=[8, 16], timestep_conditioning=mode,
    )
    kw = dict(steps=3, output_type="latent", guidance_scale=3.0, guidance_start=0.3, guidance_stop=1.0)
    cached = generate(pipe, use_prefix_cache=True, **kw)
    naive = generate(pipe, use_prefix_cache=False, **kw)
    assert cached.shape == (len(PROMPTS), 1, 8, 8)
    torch.testing.assert_close(cached, naive, rtol=1e-4, atol=1e-5)


def _encoder_rows(model, monkeypatch) -> list[int]:
    """Rows of every call of the U-Net patch encoder."""
    rows = []
    real = type(model.model.x_embedder).forward
    monkeypatch.setattr(
        type(model.model.x_embedder), "forward", lambda self, x, t: rows.append(x.shape[0]) or real(self, x, t)
    )
    return rows


def test_an_image_given_twice_as_one_object_at_one_timestep_is_embedded_once(monkeypatch):
    """Classifier-free guidance passes each noisy image once per branch as the same object: one encoder row, and the
    same outputs as two distinct copies. The same object at another timestep is embedded again."""
    model = unet(timestep_conditioning="adaln")
    cfg = model.config
    ids = torch.tensor([image_row(cfg, [5, 6], 16, 16, suffix=[7]), image_row(cfg, [8], 16, 16, suffix=[7, 9])])
    x = torch.randn(1, 16, 16)
    rows = _encoder_rows(model, monkeypatch)
    with torch.no_grad():
        shared = model(input_ids=ids, latents=[x, x], timesteps=torch.tensor([300, 300])).diffusion_output
        copies = model(input_ids=ids, latents=[x, x.clone()], timesteps=torch.tensor([300, 300])).diffusion_output
        other_t = model(input_ids=ids, latents=[x, x], timesteps=torch.tensor([300, 600])).diffusion_output
        distinct_t = model(input_ids=ids, latents=[x, x.clone()], timesteps=torch.tensor([300, 600])).diffusion_output
    assert rows == [1, 2, 2, 2]
    for a, b in zip(shared, copies):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(shared[0], shared[1])  # two different prompts read the one image differently
    for a, b in zip(other_t, distinct_t):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("use_prefix_cache", [True, False])
def test_guided_sampling_embeds_each_noisy_image_once(monkeypatch, use_prefix_cache):
    """A guided step runs the U-Net encoder on the B noisy images, not on 2B branch rows; the images stay those of
    embedding every row (the sharing turned off)."""
    pipe = make_pipe(
        pixel_space=True, num_channels=1, latent_channels=1, patch_size=4, sample_size=8, patch_embedder="unet",
        unet_block_channels=[8, 16],
    )
    kw = dict(steps=4, output_type="latent", guidance_scale=3.0, guidance_start=0.25, guidance_stop=0.75,
              use_prefix_cache=use_prefix_cache)
    rows = _encoder_rows(pipe.model, monkeypatch)
    shared = generate(pipe, **kw)
    n = len(PROMPTS)
    assert rows[-4:] == [n, n, n, n]  # steps 2 and 3 are guided (2n rows through the transformer): still n here
    monkeypatch.setattr(modeling, "shared_image_sources", lambda images, timesteps: None)
    rows.clear()
    every_row = generate(pipe, **kw)
    assert rows[-4:] == [n, 2 * n, 2 * n, n]
    torch.testing.assert_close(shared, every_row, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# Training signal
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "flow"])
def test_unet_overfits_one_batch_diffusion_loss_down_5x(prediction_type):
    torch.manual_seed(0)
    model = unet(patch_size=4, channels=(8, 16), prediction_type=prediction_type).train()
    scheduler = FlowMatchEulerDiscreteScheduler() if prediction_type == "flow" else DDPMScheduler(
        prediction_type=prediction_type
    )
    x0 = torch.zeros(2, 1, 8, 8)
    x0[0, :, 2:6, 2:6] = 1.0
    x0[1, :, :, 3:5] = 1.0
    noisy, t, target = add_training_noise(scheduler, x0 * 2 - 1, prediction_type, torch.Generator().manual_seed(0))
    cfg = model.config
    ids = torch.tensor([image_row(cfg, [5, 6], 8, 8, suffix=[7]), image_row(cfg, [8, 9], 8, 8, suffix=[7])])
    batch = dict(input_ids=ids, latents=noisy, timesteps=t, diffusion_target=target)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    first = model(**batch).diffusion_loss.item()
    for _ in range(40):  # ~30x on a quiet CPU
        loss = model(**batch).diffusion_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = model(**batch).diffusion_loss.item()
    assert first / last >= 5, (first, last)


# ----------------------------------------------------------------------------------------------------------------------
# Round trips: remote code in a fresh process, LoRA with the U-Net in modules_to_save
# ----------------------------------------------------------------------------------------------------------------------
def test_unet_save_and_load_in_fresh_process_without_package(tmp_path):
    model = unet(patch_size=4, channels=(8, 16), timestep_conditioning="add")
    cfg = model.config
    inputs = dict(
        input_ids=torch.tensor([image_row(cfg, [5, 6], 8, 8, suffix=[7])]),
        latents=torch.randn(1, 1, 8, 8),
        timesteps=torch.tensor([321]),
    )
    model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "patch_embedding_monoformer.py").is_file()
    assert_fresh_process_load_matches(model, inputs, tmp_path)


def test_lora_trains_the_unet_blocks_fully():
    model = unet(patch_size=4, channels=(8, 16))
    peft_model = add_lora(model, rank=2)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    for module in ("x_embedder.modules_to_save", "patch_decoder.modules_to_save", "final_layer.modules_to_save"):
        assert any(module in n and "resnets" in n or module in n and "final_layer" in module for n in trainable), module
    cfg = model.config
    out = peft_model(
        input_ids=torch.tensor([image_row(cfg, [5, 6], 8, 8)]), latents=torch.randn(1, 1, 8, 8),
        timesteps=torch.tensor([100]), diffusion_target=torch.randn(1, 1, 8, 8),
    )
    out.loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    assert all(g is not None for n, g in grads.items() if "down_blocks" in n or "up_blocks" in n)
