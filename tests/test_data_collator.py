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
    default_noise_scheduler,
)
from modeling_monoformer.configuration_monoformer import PREDICTION_TYPES
from modeling_monoformer.scheduler_rules_monoformer import SCHEDULER_PREDICTION_TYPES
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


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("learn_sigma", [False, True])
def test_default_scheduler_of_an_epsilon_or_v_model_is_ddpm_from_the_last_step(prediction_type, learn_sigma):
    sched = default_noise_scheduler(prediction_type, num_train_timesteps=500, learn_sigma=learn_sigma)
    assert type(sched) is DDPMScheduler
    cfg = sched.config
    assert (cfg.num_train_timesteps, cfg.prediction_type, cfg.beta_schedule) == (500, prediction_type, "linear")
    assert cfg.variance_type == ("learned_range" if learn_sigma else "fixed_small") and cfg.clip_sample is False
    sched.set_timesteps(10)
    assert sched.timesteps[0] == 499  # "trailing": sampling starts at t = T - 1 whatever the number of steps
    _, t, _ = add_training_noise(sched, torch.randn(3, 1, 2, 2), prediction_type)  # accepted for training
    assert (t < 500).all()


def test_default_scheduler_of_a_flow_model_is_flow_matching_euler():
    sched = default_noise_scheduler("flow", num_train_timesteps=500)
    assert type(sched) is FlowMatchEulerDiscreteScheduler
    assert sched.config.num_train_timesteps == 500 and sched.config.shift == 1.0
    _, t, _ = add_training_noise(sched, torch.randn(3, 1, 2, 2), "flow")
    assert t.is_floating_point() and (t <= 500).all()


def test_default_scheduler_covers_every_prediction_type_of_the_config_and_refuses_others():
    assert SCHEDULER_PREDICTION_TYPES == PREDICTION_TYPES
    with pytest.raises(ValueError, match="`prediction_type`.*'sample'"):
        default_noise_scheduler("sample")
    with pytest.raises(ValueError, match="`num_train_timesteps`"):
        default_noise_scheduler("epsilon", num_train_timesteps=0)


def test_collator_and_pipeline_apply_one_scheduler_rule_and_the_collator_needs_no_pipeline():
    import ast
    import pathlib

    from modeling_monoformer import data_collator_monoformer, pipeline_monoformer, scheduler_rules_monoformer

    rule = scheduler_rules_monoformer.check_scheduler_matches
    assert data_collator_monoformer.check_scheduler_matches is rule
    assert pipeline_monoformer.check_scheduler_matches is rule
    tree = ast.parse(pathlib.Path(data_collator_monoformer.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "pipeline_monoformer" not in imported and "scheduler_rules_monoformer" in imported


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


def test_caption_word_dropout_keeps_ordered_subsets_of_the_prompt_and_only_for_generation(pixel_model_and_processor):
    _, processor = pixel_model_and_processor
    collator = MonoFormerDataCollator(processor, DDPMScheduler(), "epsilon", cfg_dropout=0.0, seed=0,
                                      caption_word_dropout=0.3)
    words = "a photo of a pair of trousers".split()
    img = torch.zeros(1, 4, 4)
    batch = collator([{"text": " ".join(words), "pixel_values": img}] * 300)
    boi = processor.boi_token_id
    prompts = [processor.tokenizer.decode(row[: int((row == boi).nonzero()[0])], skip_special_tokens=True).split()
               for row in batch["input_ids"]]
    dropped = 0
    for prompt in prompts:
        assert prompt, "a kept prompt never loses every word"
        it = iter(words)
        assert all(w in it for w in prompt), f"{prompt} is not an ordered subset of {words}"
        dropped += len(words) - len(prompt)
    assert 0.25 < dropped / (len(words) * len(prompts)) < 0.35
    # captions are targets, not conditioning: never thinned; a seeded sample thins the same way every time
    caption = collator([{"text": "a coat", "pixel_values": img, "task": "caption"}])
    assert processor.tokenizer.decode(caption["input_ids"][0], skip_special_tokens=True).strip() == "a coat"
    seeded = [{"text": " ".join(words), "pixel_values": img, "seed": 3}]
    assert torch.equal(collator(seeded)["input_ids"], collator(seeded)["input_ids"])
    with pytest.raises(ValueError, match="caption_word_dropout"):
        MonoFormerDataCollator(processor, DDPMScheduler(), "epsilon", caption_word_dropout=1.0)


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



def test_packed_any_to_any_mix_gives_the_same_loss_as_padded(pixel_model_and_processor):
    """The recipe's `--pack_length`: edits (a clean source and a noised target in one sample), interleaved text and
    image, a question before an answer, text-to-image and plain text packed several to a row train on exactly the
    losses of the padded batch."""
    model, processor = pixel_model_and_processor
    model.eval()
    collator = MonoFormerDataCollator(processor, FlowMatchEulerDiscreteScheduler(), "flow", cfg_dropout=0.0, seed=0,
                                      caption_max_noise=0.5)
    img = lambda: torch.rand(1, 4, 4) * 2 - 1  # noqa: E731
    samples = [
        {"text": "flip it horizontally", "source": img(), "pixel_values": img(), "task": "edit"},
        {"text": "a photo of a sneaker", "pixel_values": img()},
        {"text": f"Show me a dress.{processor.image_token} Here is a dress.", "images": [img()], "task": "interleaved"},
        {"text": " It is a coat.", "prompt": "What is this?", "pixel_values": img(), "task": "caption"},
        {"text": "It is a truth universally acknowledged", "task": "text"},
        {"text": "a bag", "pixel_values": img(), "task": "caption"},
    ]
    padded = collator(samples)
    longest = int(padded["attention_mask"].sum(1).max())
    packed = pack_batch(padded, max_length=2 * longest, pad_token_id=processor.tokenizer.pad_token_id)
    assert packed["input_ids"].shape[0] < len(samples) and packed["input_ids"].numel() < padded["input_ids"].numel()
    with torch.no_grad():
        a, b = model(**padded), model(**packed)
    assert torch.allclose(a.lm_loss, b.lm_loss, atol=1e-5)
    assert torch.allclose(a.diffusion_loss, b.diffusion_loss, atol=1e-5)

# ----------------------------------------------------------------------------------------------------------------------
# Any-to-any layouts: noise-capped captions, edits, interleaved samples
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheduler,prediction_type", [(DDPMScheduler(), "epsilon"),
                                                       (FlowMatchEulerDiscreteScheduler(), "flow")])
def test_noise_cap_keeps_timesteps_in_the_first_half_of_the_schedule(scheduler, prediction_type):
    x0 = torch.randn(2000, 1, 2, 2)
    _, t, _ = add_training_noise(scheduler, x0, prediction_type, torch.Generator().manual_seed(0), max_noise=0.5)
    assert t.max() <= 500 and t.float().mean() < 300  # uniform over [0, 500]: mean ~250
    _, t_full, _ = add_training_noise(scheduler, x0, prediction_type, torch.Generator().manual_seed(0))
    assert t_full.max() > 900
    with pytest.raises(ValueError, match="`max_noise`"):
        add_training_noise(scheduler, x0, prediction_type, max_noise=0.0)


def test_caption_images_are_clean_or_noised_under_the_cap(pixel_model_and_processor):
    model, processor = pixel_model_and_processor
    img = torch.rand(1, 4, 4) * 2 - 1
    samples = [{"text": "a coat", "pixel_values": img, "task": "caption"}] * 64
    clean = MonoFormerDataCollator(processor, DDPMScheduler(), "epsilon", seed=0)(samples)
    assert (clean["timesteps"] == 0).all() and clean["diffusion_target"] is None
    capped = MonoFormerDataCollator(processor, DDPMScheduler(), "epsilon", seed=0, caption_max_noise=0.5)(samples)
    assert capped["timesteps"].max() < 500 and capped["timesteps"].max() > 0
    assert capped["diffusion_target"].shape == (64, 1, 4, 4) and not torch.equal(capped["latents"][0], img)
    # the caption is still the LM's target after the (noised) image
    assert torch.equal(capped["labels"], clean["labels"])
    out = model(**capped)
    assert out.lm_loss is not None and out.diffusion_loss is not None
    with pytest.raises(ValueError, match="`caption_max_noise`"):
        MonoFormerDataCollator(processor, DDPMScheduler(), "epsilon", caption_max_noise=1.5)


def test_caption_prompt_is_conditioning_and_the_answer_is_the_target(pixel_model_and_processor):
    model, processor = pixel_model_and_processor
    collator = MonoFormerDataCollator(processor, DDPMScheduler(), "epsilon", seed=0)
    img = torch.rand(1, 4, 4) * 2 - 1
    batch = collator([
        {"text": " It is a coat.", "prompt": "What is this?", "pixel_values": img, "task": "caption"},
        {"text": "a coat", "pixel_values": img, "task": "caption"},
    ])
    ids, labels, tok = batch["input_ids"], batch["labels"], processor.tokenizer
    eoi = int((ids[0] == processor.eoi_token_id).nonzero()[0])
    n_prompt = len(tok("What is this?", add_special_tokens=False)["input_ids"])
    # the question is read, not learnt; every answer token (and <eos>) is learnt
    assert tok.decode(ids[0, eoi + 1 : eoi + 1 + n_prompt]) == "What is this?"
    assert (labels[0, : eoi + 1 + n_prompt] == -100).all()
    answer = labels[0][labels[0] != -100]
    assert tok.decode(answer, skip_special_tokens=True) == " It is a coat."
    assert answer[-1] == tok.eos_token_id
    # a caption without a prompt is unchanged: all its text is the target
    caption = labels[1][labels[1] != -100]
    assert tok.decode(caption, skip_special_tokens=True) == "a coat"
    assert torch.isfinite(model(**batch).loss)
    # a shorter prompted row that is not the first one, padded on the right: its own boundary
    batch = collator([
        {"text": "a photo of a pair of trousers and a dress", "pixel_values": img, "task": "caption"},
        {"text": " A bag.", "prompt": "Which?", "pixel_values": img, "task": "caption"},
    ])
    learnt = batch["labels"][1][batch["labels"][1] != -100]
    assert tok.decode(learnt, skip_special_tokens=True) == " A bag."
    # a prompt whose trailing space the byte-level BPE merges into the answer's first word cannot be split cleanly:
    # a clear error, not a wrong mask (the merge is real for this tokenizer: checked first)
    alone, joined = (tok(t, add_special_tokens=False)["input_ids"] for t in ("What is this? a ", "What is this? a dress"))
    assert joined[: len(alone)] != alone
    with pytest.raises(ValueError, match="`prompt`.*start `text` with a space"):
        collator([{"text": "dress", "prompt": "What is this? a ", "pixel_values": img, "task": "caption"}])
    # a prompt on another task would be silently dropped (or train as an image prompt): refused
    with pytest.raises(ValueError, match="`prompt` but task 'generate'"):
        collator([{"text": " A cat.", "prompt": "What is this?", "pixel_values": img}])


def test_edit_layout_source_clean_instruction_unlabelled_target_noised(pixel_model_and_processor):
    model, processor = pixel_model_and_processor
    source, target = torch.rand(1, 4, 4) * 2 - 1, torch.rand(1, 4, 4) * 2 - 1
    collator = MonoFormerDataCollator(processor, DDPMScheduler(), "epsilon", cfg_dropout=0.0, seed=0)
    batch = collator([{"text": "flip it horizontally", "source": source, "pixel_values": target, "task": "edit"},
                      {"text": "a dress", "pixel_values": target}])
    ids, labels, c = batch["input_ids"][0], batch["labels"][0], model.config
    n = c.num_image_tokens(4, 4)
    boi = (ids == c.boi_token_id).nonzero().squeeze(-1).tolist()
    eoi = (ids == c.eoi_token_id).nonzero().squeeze(-1).tolist()
    assert len(boi) == 2 and len(eoi) == 2 and boi[0] == 0 and eoi[0] == n + 1
    instruction = processor.tokenizer("flip it horizontally", add_special_tokens=False)["input_ids"]
    assert ids[eoi[0] + 1 : boi[1]].tolist() == instruction and eoi[1] == boi[1] + n + 1
    # source, instruction and the target's <boi> are conditioning: a learnt <boi> after a dropped instruction taught
    # "after a clean image, start another" and broke captioning
    assert (labels[: boi[1] + 1] == -100).all()
    assert isinstance(batch["latents"], list) and torch.equal(batch["latents"][0], source)
    assert batch["timesteps"][0] == 0 and batch["diffusion_target"][0] is None  # source: clean context, no loss
    assert batch["timesteps"][1] > 0 and batch["diffusion_target"][1].shape == target.shape
    assert batch["timesteps"][2] > 0  # the generate sample's image
    out = model(**batch)
    assert torch.isfinite(out.loss) and out.diffusion_loss is not None


def test_edit_drops_instruction_and_source_independently(pixel_model_and_processor):
    model, processor = pixel_model_and_processor
    c = model.config
    collator = MonoFormerDataCollator(processor, DDPMScheduler(), "epsilon", cfg_dropout=0.3, seed=0)
    sample = {"text": "invert the colours", "source": torch.zeros(1, 4, 4), "pixel_values": torch.ones(1, 4, 4),
              "task": "edit"}
    batch = collator([sample] * 400)
    n = c.num_image_tokens(4, 4)
    has_source = (batch["input_ids"] == c.image_token_id).sum(1) == 2 * n
    has_text = batch["attention_mask"].sum(1) > (2 * n + 4) * has_source + (n + 2) * ~has_source
    assert 0.6 < has_source.float().mean() < 0.8 and 0.6 < has_text.float().mean() < 0.8
    both_dropped = (~has_source & ~has_text).float().mean()
    assert 0.04 < both_dropped < 0.16  # 0.3 * 0.3 = 0.09: independent draws
    # with or without the instruction, the target's <boi> is never a label: a source followed by a learnt <boi>
    # (instruction dropped) taught "after an image, start another" and broke captioning
    assert not (batch["labels"] == c.boi_token_id).any()
    assert len(batch["latents"]) == 400 + int(has_source.sum())
    with pytest.raises(ValueError, match="no `source`"):
        collator([{"text": "x", "pixel_values": torch.zeros(1, 4, 4), "task": "edit"}])


def test_interleaved_layout_labels_text_and_boi_and_noises_every_image(pixel_model_and_processor):
    model, processor = pixel_model_and_processor
    c = model.config
    collator = MonoFormerDataCollator(processor, DDPMScheduler(), "epsilon", seed=0)
    images = [torch.rand(1, 4, 4) * 2 - 1, torch.rand(1, 4, 8) * 2 - 1]
    batch = collator([{"text": "Show me a dress.<image> Here it is, and a bag:<image>", "images": images,
                       "task": "interleaved"}, {"text": "a photo of a bag"}])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    image_positions = ids == c.image_token_id
    assert int(image_positions.sum()) == c.num_image_tokens(4, 4) + c.num_image_tokens(4, 8)
    assert (labels[image_positions] == -100).all() and (labels[ids == c.eoi_token_id] == -100).all()
    assert (labels[ids == c.boi_token_id] == c.boi_token_id).all()  # the LM learns to start each image
    text = ~image_positions & (ids != c.eoi_token_id) & batch["attention_mask"][0].bool()
    assert torch.equal(labels[text], ids[text]) and ids[batch["attention_mask"][0].bool()][-1] == processor.tokenizer.eos_token_id
    assert [tuple(x.shape) for x in batch["latents"]] == [(1, 4, 4), (1, 4, 8)]
    assert (batch["timesteps"] > 0).all() and all(t is not None for t in batch["diffusion_target"])
    out = model(**batch)
    assert torch.isfinite(out.loss) and out.diffusion_loss is not None
    with pytest.raises(ValueError, match="marker"):
        collator([{"text": "no marker", "images": images, "task": "interleaved"}])
