"""Training inputs: scheduler-drawn noise and targets, collator layouts, packing with identical loss."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

from modeling_monoformer import (
    MonoFormerDataCollator,
    MonoFormerForConditionalGeneration,
    MonoFormerImageProcessor,
    MonoFormerProcessor,
    add_training_noise,
)
from modeling_monoformer.packing_monoformer import pack_batch


def test_ddpm_noise_and_targets_follow_the_scheduler():
    sched = DDPMScheduler()
    x0 = torch.randn(8, 4, 4, 4)
    gen = torch.Generator().manual_seed(0)
    noisy, t, target = add_training_noise(sched, x0, "epsilon", gen)
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(noisy, a.sqrt() * x0 + (1 - a).sqrt() * target, atol=1e-5)
    assert t.dtype == torch.long and (0 <= t).all() and (t < 1000).all()
    gen = torch.Generator().manual_seed(0)
    _, t_v, v = add_training_noise(DDPMScheduler(prediction_type="v_prediction"), x0, "v_prediction", gen)
    assert torch.equal(t_v, t)
    eps = target
    assert torch.allclose(v, a.sqrt() * eps - (1 - a).sqrt() * x0, atol=1e-5)


def test_flow_noise_is_linear_interpolation_with_velocity_target():
    sched = FlowMatchEulerDiscreteScheduler()
    x0 = torch.randn(6, 1, 4, 4)
    noisy, t, target = add_training_noise(sched, x0, "flow", torch.Generator().manual_seed(1))
    sigma = (t / 1000).view(-1, 1, 1, 1)
    eps = target + x0
    assert torch.allclose(noisy, (1 - sigma) * x0 + sigma * eps, atol=1e-5)
    assert t.is_floating_point() and (t > 0).all() and (t <= 1000).all()


def test_mismatched_scheduler_is_refused():
    with pytest.raises(ValueError, match="scheduler"):
        add_training_noise(DDPMScheduler(), torch.randn(1, 1, 2, 2), "flow")
    with pytest.raises(ValueError, match="scheduler"):
        add_training_noise(FlowMatchEulerDiscreteScheduler(), torch.randn(1, 1, 2, 2), "epsilon")
    with pytest.raises(ValueError, match="prediction_type"):
        add_training_noise(DDIMScheduler(prediction_type="epsilon"), torch.randn(1, 1, 2, 2), "v_prediction")


@pytest.fixture
def pixel_model_and_processor(llama, tokenizer):
    model = MonoFormerForConditionalGeneration.from_llm(
        llama, tokenizer=tokenizer, latent_channels=1, patch_size=2, vae_scale_factor=1, timestep_conditioning="token"
    )
    processor = MonoFormerProcessor(MonoFormerImageProcessor(num_channels=1), tokenizer).configure_for_model(model.config)
    return model, processor


def test_collator_layouts_and_labels(pixel_model_and_processor):
    model, processor = pixel_model_and_processor
    collator = MonoFormerDataCollator(processor, DDPMScheduler(), "epsilon", cfg_dropout=0.0, seed=0)
    img = torch.rand(1, 4, 4) * 2 - 1
    batch = collator([
        {"text": "a dress", "pixel_values": img},
        {"text": "a coat", "pixel_values": img, "task": "caption"},
        {"text": "a photo of a bag"},
    ])
    ids, labels = batch["input_ids"], batch["labels"]
    n = model.config.num_image_tokens(4, 4)
    assert ((ids == model.config.image_token_id).sum(1) == torch.tensor([n, n, 0])).all()
    assert (labels[ids == model.config.image_token_id] == -100).all()
    assert (labels[batch["attention_mask"] == 0] == -100).all()
    assert isinstance(batch["latents"], list) and batch["diffusion_target"][1] is None
    assert batch["timesteps"][1] == 0 and torch.equal(batch["latents"][1], img)  # caption image stays clean
    out = model(**batch)
    assert torch.isfinite(out.loss) and out.lm_loss is not None and out.diffusion_loss is not None


def test_collator_cfg_dropout_drops_prompts(pixel_model_and_processor):
    _, processor = pixel_model_and_processor
    collator = MonoFormerDataCollator(processor, DDPMScheduler(), "epsilon", cfg_dropout=0.5, seed=0)
    samples = [{"text": "a photo of a sneaker", "pixel_values": torch.zeros(1, 4, 4)}] * 200
    batch = collator(samples)
    prompt_lengths = batch["attention_mask"].sum(1)
    dropped = (prompt_lengths == prompt_lengths.min()).float().mean().item()
    assert 0.35 < dropped < 0.65


def test_collator_errors_name_the_problem(pixel_model_and_processor):
    _, processor = pixel_model_and_processor
    collator = MonoFormerDataCollator(processor, DDPMScheduler(), "epsilon")
    with pytest.raises(ValueError, match="`text`"):
        collator([{"caption": "x"}])
    with pytest.raises(ValueError, match="multiple of"):
        collator([{"text": "x", "pixel_values": torch.zeros(1, 5, 4)}])
    with pytest.raises(ValueError, match="task"):
        collator([{"text": "x", "task": "caption"}])


def test_packed_batch_gives_the_same_loss_as_padded(pixel_model_and_processor):
    model, processor = pixel_model_and_processor
    model.eval()
    collator = MonoFormerDataCollator(processor, DDPMScheduler(), "epsilon", cfg_dropout=0.0, seed=0)
    samples = [
        {"text": "a photo of a sneaker", "pixel_values": torch.rand(1, 4, 4)},
        {"text": "It is a truth universally acknowledged, that a single man"},
        {"text": "a coat", "pixel_values": torch.rand(1, 4, 4), "task": "caption"},
        {"text": "a dress", "pixel_values": torch.rand(1, 4, 4)},
    ]
    padded = collator(samples)
    packed = pack_batch(padded, max_length=60, pad_token_id=processor.tokenizer.pad_token_id)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    results = {}
    for impl in ("sdpa", "eager"):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            a, b = model(**padded), model(**packed)
        assert torch.allclose(a.lm_loss, b.lm_loss, atol=1e-5), impl
        assert torch.allclose(a.diffusion_loss, b.diffusion_loss, atol=1e-5), impl
        for x, y in zip(a.diffusion_output, b.diffusion_output):
            assert torch.allclose(x, y, atol=1e-5)
        results[impl] = b.lm_loss
    assert torch.allclose(results["sdpa"], results["eager"], atol=1e-5)
