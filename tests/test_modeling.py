"""Core model: hybrid mask on real outputs, exact text path, training signal, round trip, bad input."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from modeling_monoformer import MonoFormerForConditionalGeneration, add_training_noise
from tests.conftest import tiny_llama, tiny_qwen2


def wrap(llm, **overrides):
    defaults = dict(latent_channels=4, patch_size=2)
    defaults.update(overrides)
    return MonoFormerForConditionalGeneration.from_llm(llm, **defaults).eval()


def image_row(config, prefix, h, w, suffix=(), n_images=1):
    """Token ids: prefix, then n_images blocks of <boi> <image>*N <eoi>, then suffix."""
    n = config.num_image_tokens(h, w)
    block = [config.boi_token_id] + [config.image_token_id] * n + [config.eoi_token_id]
    return list(prefix) + block * n_images + list(suffix)


# ----------------------------------------------------------------------------------------------------------------------
# Mask semantics, measured on real model outputs
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["adaln", "token", "add"])
def test_image_tokens_see_later_tokens_of_same_image(llama, mode):
    model = wrap(llama, timestep_conditioning=mode)
    cfg = model.config
    ids = torch.tensor([image_row(cfg, [5, 6, 7], 4, 4, suffix=[8, 9])])
    lat = torch.randn(1, 4, 4, 4)
    t = torch.tensor([300])
    with torch.no_grad():
        base = model(input_ids=ids, latents=lat, timesteps=t).diffusion_output
        lat2 = lat.clone()
        lat2[..., 3, 3] += 1.0  # last patch of the image
        pert = model(input_ids=ids, latents=lat2, timesteps=t).diffusion_output
    # first patch (top-left 2x2) changes although it precedes the perturbed patch in the sequence
    assert (base[..., :2, :2] - pert[..., :2, :2]).abs().max() > 1e-4


def test_text_and_earlier_images_never_see_the_future(llama):
    model = wrap(llama)
    cfg = model.config
    ids = torch.tensor([image_row(cfg, [5, 6, 7], 4, 4, suffix=[8, 9, 10], n_images=2)])
    lat = torch.randn(2, 4, 4, 4)
    t = torch.tensor([300, 600])
    with torch.no_grad():
        out = model(input_ids=ids, latents=lat, timesteps=t)
        lat2 = lat.clone()
        lat2[1] += 1.0  # change the second image entirely
        out2 = model(input_ids=ids, latents=lat2, timesteps=t)
        ids3 = ids.clone()
        ids3[0, -1] = 11  # change the last text token
        out3 = model(input_ids=ids3, latents=lat, timesteps=t)
    first_block_end = 3 + 1 + cfg.num_image_tokens(4, 4) + 1  # prefix + <boi> + patches + <eoi>
    # text before and the first image are untouched by the second image ...
    assert torch.equal(out.logits[0, :first_block_end], out2.logits[0, :first_block_end])
    assert torch.equal(out.diffusion_output[0], out2.diffusion_output[0])
    # ... but text after the second image sees it
    assert (out.logits[0, -3:] - out2.logits[0, -3:]).abs().max() > 1e-4
    # nothing before the last token sees it
    assert torch.equal(out.logits[0, :-1], out3.logits[0, :-1])
    assert torch.equal(out.diffusion_output, out3.diffusion_output)


def test_padding_never_leaks(llama):
    model = wrap(llama)
    cfg = model.config
    row = image_row(cfg, [5, 6], 4, 4, suffix=[7])
    lat = torch.randn(1, 4, 4, 4)
    t = torch.tensor([200])
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([row]), latents=lat, timesteps=t)
        outs = []
        for pad_token in (0, 9):  # two different padding contents must give the same result
            ids = torch.tensor([[pad_token] * 4 + row])
            mask = torch.tensor([[0] * 4 + [1] * len(row)])
            outs.append(model(input_ids=ids, attention_mask=mask, latents=lat, timesteps=t))
    assert torch.allclose(outs[0].diffusion_output, outs[1].diffusion_output, atol=1e-6)
    assert torch.allclose(outs[0].logits[:, 4:], outs[1].logits[:, 4:], atol=1e-5)
    assert torch.allclose(alone.diffusion_output, outs[0].diffusion_output, atol=1e-5)
    assert torch.allclose(alone.logits, outs[0].logits[:, 4:], atol=1e-5)


def test_sdpa_eager_flex_agree(llama):
    model = wrap(llama)
    cfg = model.config
    rows = [image_row(cfg, [5, 6, 7], 4, 4, suffix=[8]), [0] + image_row(cfg, [5], 4, 4, suffix=[8, 9])]
    ids = torch.tensor(rows)
    mask = (ids != 0).long()
    lat = torch.randn(2, 4, 4, 4)
    t = torch.tensor([100, 900])
    results = {}
    for impl in ("sdpa", "eager", "flex_attention"):
        model.set_attn_implementation(impl)
        assert model.config.text_config._attn_implementation == impl
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, latents=lat, timesteps=t)
        results[impl] = out
    for impl in ("eager", "flex_attention"):
        assert torch.allclose(results["sdpa"].diffusion_output, results[impl].diffusion_output, atol=1e-5), impl
        valid = mask.bool()
        assert torch.allclose(results["sdpa"].logits[valid], results[impl].logits[valid], atol=1e-4), impl


def test_bidirectional_block_differs_from_plain_causal(llama):
    """The mask really matters: a causal-only model would not let the first patch see the last."""
    model = wrap(llama)
    cfg = model.config
    ids = torch.tensor([image_row(cfg, [5], 4, 4)])
    lat = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        out = model(input_ids=ids, latents=lat, timesteps=torch.tensor([10]))
        emb = model.model.get_input_embeddings()(ids)
        # rebuild the same inputs and run the LLM with its default causal mask
        t_emb = model.model.t_embedder(torch.tensor([10]), emb.dtype)
        tokens = model.model.embed_images(lat, t_emb)[0]
        emb[0, 2 : 2 + tokens.shape[0]] = tokens
        causal = model.model.language_model(inputs_embeds=emb).last_hidden_state
        head = model.decode_image_states(causal[:, 2 : 2 + tokens.shape[0]], t_emb, lat)
    assert (out.diffusion_output - head).abs().max() > 1e-4


# ----------------------------------------------------------------------------------------------------------------------
# Text path is the base LLM's, exactly
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2-tied"])
def test_text_logits_and_greedy_generation_equal_base_llm(make, tokenizer):
    llm = make()
    n_vocab_before = len(tokenizer)
    model = MonoFormerForConditionalGeneration.from_llm(llm, tokenizer=tokenizer).eval()
    assert len(tokenizer) == n_vocab_before + 3
    rows = llm.get_input_embeddings().weight.shape[0]
    assert model.get_input_embeddings().weight.shape[0] == max(rows, len(tokenizer))
    assert model.config.tie_word_embeddings == llm.config.tie_word_embeddings
    if llm.config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()

    enc = tokenizer(["a photo of a sneaker", "a dress"], return_tensors="pt", padding=True)
    with torch.no_grad():
        ours = model(**enc).logits
        theirs = llm(**enc).logits
    assert torch.equal(ours[..., : theirs.shape[-1]], theirs)
    gen_kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(model.generate(**enc, **gen_kwargs), llm.generate(**enc, **gen_kwargs))


def test_new_token_rows_are_mean_and_existing_rows_untouched(llama):
    before = llama.get_input_embeddings().weight.clone()
    model = wrap(llama)
    after = model.get_input_embeddings().weight
    assert torch.equal(after[: before.shape[0]], before)
    assert torch.allclose(after[before.shape[0] :], before.mean(0, keepdim=True).expand(3, -1))


def test_generate_with_clean_image_in_prompt_matches_full_recompute(llama):
    model = wrap(llama)
    cfg = model.config
    ids = torch.tensor([image_row(cfg, [5, 6], 4, 4, suffix=[7])])
    lat = torch.randn(1, 4, 4, 4)
    out = model.generate(ids, latents=lat, max_new_tokens=6, do_sample=False, pad_token_id=0)
    seq = ids
    with torch.no_grad():
        for _ in range(6):  # no cache: the whole sequence, image included, every step
            logits = model(input_ids=seq, latents=lat).logits
            seq = torch.cat([seq, logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, seq)


def test_several_images_of_different_sizes_per_sequence(llama):
    model = wrap(llama, timestep_conditioning="token")
    cfg = model.config
    n1, n2 = cfg.num_image_tokens(4, 4), cfg.num_image_tokens(2, 6)
    ids = torch.tensor([[5, cfg.boi_token_id] + [cfg.image_token_id] * n1 + [cfg.eoi_token_id, 6, cfg.boi_token_id]
                        + [cfg.image_token_id] * n2 + [cfg.eoi_token_id]])
    lat = [torch.randn(4, 4, 4), torch.randn(4, 2, 6)]
    target = [None, torch.randn(4, 2, 6)]
    out = model(input_ids=ids, latents=lat, timesteps=torch.tensor([0, 500]), diffusion_target=target)
    assert [tuple(x.shape) for x in out.diffusion_output] == [(4, 4, 4), (4, 2, 6)]
    expected = ((out.diffusion_output[1] - target[1]) ** 2).mean()
    assert torch.allclose(out.diffusion_loss, expected)


def test_learn_sigma_doubles_output_channels(llama):
    model = wrap(llama, learn_sigma=True)
    cfg = model.config
    ids = torch.tensor([image_row(cfg, [5], 4, 4)])
    target = torch.randn(1, 4, 4, 4)
    out = model(input_ids=ids, latents=torch.randn(1, 4, 4, 4), timesteps=torch.tensor([3]), diffusion_target=target)
    assert out.diffusion_output.shape == (1, 8, 4, 4)
    assert torch.allclose(out.diffusion_loss, ((out.diffusion_output[:, :4] - target) ** 2).mean())


# ----------------------------------------------------------------------------------------------------------------------
# Training signal: one fixed batch is overfit for every timestep mode and objective
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["adaln", "token", "add"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "flow"])
def test_overfit_one_batch_drives_both_losses_down_5x(llama, mode, prediction_type):
    torch.manual_seed(0)
    model = wrap(llama, timestep_conditioning=mode, prediction_type=prediction_type, latent_channels=1, patch_size=2)
    model.train()
    cfg = model.config
    if prediction_type == "flow":
        scheduler = FlowMatchEulerDiscreteScheduler()
    else:
        scheduler = DDPMScheduler(prediction_type=prediction_type)
    x0 = torch.zeros(2, 1, 8, 8)
    x0[0, :, 2:6, 2:6] = 1.0  # two simple real shapes: a square and a bar
    x0[1, :, :, 3:5] = 1.0
    x0 = x0 * 2 - 1
    gen = torch.Generator().manual_seed(0)
    noisy, t, target = add_training_noise(scheduler, x0, prediction_type, gen)
    rows = [image_row(cfg, [5, 6, 7, 8], 8, 8, suffix=[9, 10, 11, 2]), image_row(cfg, [12, 13, 14, 15], 8, 8, suffix=[16, 17, 18, 2])]
    ids = torch.tensor(rows)
    batch = dict(input_ids=ids, labels=ids, latents=noisy, timesteps=t, diffusion_target=target)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    first = model(**batch)
    for _ in range(120):
        out = model(**batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    last = model(**batch)
    lm_ratio = first.lm_loss.item() / last.lm_loss.item()
    diff_ratio = first.diffusion_loss.item() / last.diffusion_loss.item()
    print(f"{mode}/{prediction_type}: lm {lm_ratio:.1f}x diffusion {diff_ratio:.1f}x")
    assert lm_ratio >= 5 and diff_ratio >= 5, (lm_ratio, diff_ratio)


# ----------------------------------------------------------------------------------------------------------------------
# Save / load round trip in a fresh process without the package
# ----------------------------------------------------------------------------------------------------------------------
FRESH_LOAD = textwrap.dedent(
    """
    import sys, json
    sys.modules["modeling_monoformer"] = None  # the package must not be importable
    import torch
    from transformers import AutoModel, AutoModelForCausalLM
    path, inputs = sys.argv[1], torch.load(sys.argv[2], weights_only=True)
    results = {}
    for auto in (AutoModel, AutoModelForCausalLM):
        model, info = auto.from_pretrained(path, trust_remote_code=True, output_loading_info=True)
        assert type(model).__name__ == "MonoFormerForConditionalGeneration", type(model)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        with torch.no_grad():
            out = model.eval()(**inputs)
        results[auto.__name__] = {"logits": out.logits, "diffusion_output": out.diffusion_output}
    torch.save(results, sys.argv[3])
    """
)


def assert_fresh_process_load_matches(model, inputs: dict, tmp_path) -> None:
    """Load `tmp_path / "ckpt"` by remote code through each auto class in a process without this package (FRESH_LOAD)
    and check its logits and diffusion output against `model` to 1e-6."""
    torch.save(inputs, tmp_path / "inputs.pt")
    script = tmp_path / "load.py"
    script.write_text(FRESH_LOAD)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    subprocess.run(
        [sys.executable, str(script), str(tmp_path / "ckpt"), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
        check=True, cwd=tmp_path, env=env, timeout=300,
    )
    results = torch.load(tmp_path / "out.pt", weights_only=True)
    with torch.no_grad():
        ref = model(**inputs)
    for name, res in results.items():
        assert (res["logits"] - ref.logits).abs().max() <= 1e-6, name
        assert (res["diffusion_output"] - ref.diffusion_output).abs().max() <= 1e-6, name


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2-tied"])
def test_save_and_load_in_fresh_process_without_package(make, tmp_path):
    model = wrap(make(), timestep_conditioning="token", learn_sigma=True)
    cfg = model.config
    inputs = dict(
        input_ids=torch.tensor([image_row(cfg, [5, 6], 4, 4, suffix=[7])]),
        latents=torch.randn(1, 4, 4, 4),
        timesteps=torch.tensor([321]),
    )
    model.save_pretrained(tmp_path / "ckpt")
    files = set(os.listdir(tmp_path / "ckpt"))
    assert {"model.safetensors", "config.json", "modeling_monoformer.py", "configuration_monoformer.py"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    assert_fresh_process_load_matches(model, inputs, tmp_path)


def test_reload_in_process_has_no_missing_or_unexpected_keys(llama, tmp_path):
    model = wrap(llama, timestep_conditioning="adaln")
    model.save_pretrained(tmp_path)
    loaded, info = MonoFormerForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


# ----------------------------------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument
# ----------------------------------------------------------------------------------------------------------------------
def test_placeholder_count_must_match_images(llama):
    model = wrap(llama)
    ids = torch.tensor([image_row(model.config, [5], 4, 4)])
    with pytest.raises(ValueError, match="placeholders"):
        model(input_ids=ids, latents=torch.randn(2, 4, 4, 4), timesteps=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="latents"):
        model(input_ids=ids)


def test_image_size_not_divisible_by_patch(llama):
    model = wrap(llama)
    with pytest.raises(ValueError, match="`latents`.*patch_size"):
        model(input_ids=torch.tensor([[5, 6]]), latents=torch.randn(1, 4, 5, 4), timesteps=torch.tensor([1]))
    with pytest.raises(ValueError, match="`latents`.*channels"):
        model(input_ids=torch.tensor([[5, 6]]), latents=torch.randn(1, 3, 4, 4), timesteps=torch.tensor([1]))
    with pytest.raises(TypeError, match="`latents`"):
        model(input_ids=torch.tensor([[5, 6]]), latents="not a tensor")


def test_wrong_timesteps_shape(llama):
    model = wrap(llama)
    ids = torch.tensor([image_row(model.config, [5], 4, 4)])
    with pytest.raises(ValueError, match="`timesteps`"):
        model(input_ids=ids, latents=torch.randn(1, 4, 4, 4), timesteps=torch.tensor([[1, 2]]))


def test_flash_attention_with_images_is_refused(llama):
    model = wrap(llama)
    model.config.text_config._attn_implementation = "flash_attention_2"  # no flash-attn on CPU: set the flag only
    ids = torch.tensor([image_row(model.config, [5], 4, 4)])
    with pytest.raises(ValueError, match="attn_implementation"):
        model(input_ids=ids, latents=torch.randn(1, 4, 4, 4), timesteps=torch.tensor([1]))


def test_config_rejects_unknown_modes():
    """`@strict` config (as every 5.x transformers config): `Literal` fields and `validate_*` methods."""
    from huggingface_hub.errors import StrictDataclassError

    from modeling_monoformer import MonoFormerConfig

    with pytest.raises(StrictDataclassError, match="timestep_conditioning"):
        MonoFormerConfig(timestep_conditioning="film")
    with pytest.raises(StrictDataclassError, match="prediction_type"):
        MonoFormerConfig(prediction_type="sample")
    with pytest.raises(StrictDataclassError, match="sample_size"):
        MonoFormerConfig(sample_size=31, patch_size=2)


@pytest.mark.parametrize("family", ["mistral", "qwen2-hybrid"])
def test_sliding_window_layers_keep_their_window_with_images(family):
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, sliding_window=4)
    if family == "mistral":
        llm = MistralForCausalLM(MistralConfig(**common)).eval()
    else:  # every layer sliding through Qwen2's `layer_types`
        llm = Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=True, max_window_layers=0)).eval()
    model = wrap(llm)
    cfg = model.config
    ids = torch.tensor([image_row(cfg, list(range(5, 25)), 4, 4)])
    lat = torch.randn(1, 4, 4, 4)
    t = torch.tensor([100])
    ids2 = ids.clone()
    ids2[0, 0] = 99  # 20 tokens before the image: out of reach of 2 layers with a window of 4
    with torch.no_grad():
        a = model(input_ids=ids, latents=lat, timesteps=t).diffusion_output
        b = model(input_ids=ids2, latents=lat, timesteps=t).diffusion_output
    assert torch.equal(a, b)
    lat2 = lat.clone()
    lat2[..., 3, 3] += 1.0
    with torch.no_grad():
        c = model(input_ids=ids, latents=lat2, timesteps=t).diffusion_output
    assert (a[..., :2, :2] - c[..., :2, :2]).abs().max() > 1e-4  # still bidirectional inside the image


def test_row_sliced_lm_loss_equals_full_logits_cross_entropy(llama):
    """The LM loss runs the head only on target rows; it must equal transformers' loss on full logits."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    torch.manual_seed(0)
    model = wrap(llama, latent_channels=1, patch_size=2)
    cfg = model.config
    ids = torch.tensor([image_row(cfg, [5, 6, 7], 4, 4, suffix=[9, 10, 2]), image_row(cfg, [12, 13, 14], 4, 4, suffix=[16, 17, 2])])
    latents, t = torch.randn(2, 1, 4, 4), torch.tensor([0.3, 0.7])
    with torch.no_grad():
        logits = model(input_ids=ids, latents=latents, timesteps=t).logits.float()
        reference_labels = ids.masked_fill(ids == cfg.image_token_id, -100)
        expected = ForCausalLMLoss(logits, reference_labels, vocab_size=logits.shape[-1])
        got = model(input_ids=ids, latents=latents, timesteps=t, labels=ids).lm_loss
    torch.testing.assert_close(got, expected)
