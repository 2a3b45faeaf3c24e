"""The contracts every transformers model honours (what `ModelTesterMixin` checks), pinned on MonoFormer.

The upstream mixins live in transformers' test tree, which is not installed, so each contract is written out here
against tiny random models.
"""

import inspect
import typing

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs

from modeling_monoformer import MonoFormerForConditionalGeneration, MonoFormerModel
from tests.conftest import tiny_llama


def wrap(llm, **overrides):
    return MonoFormerForConditionalGeneration.from_llm(llm, latent_channels=4, patch_size=2, **overrides).eval()


def image_ids(config, prefix=(5, 6), suffix=(7, 8), side=4):
    n = config.num_image_tokens(side, side)
    return torch.tensor([[*prefix, config.boi_token_id] + [config.image_token_id] * n + [config.eoi_token_id, *suffix]])


@pytest.mark.parametrize("headless", [False, True], ids=["with-heads", "model"])
def test_return_dict_false_gives_the_outputs_as_a_tuple(llama, headless):
    model = wrap(llama)
    ids = image_ids(model.config)
    lat, t = torch.randn(1, 4, 4, 4), torch.tensor([300])
    net = model.model if headless else model
    kwargs = dict(input_ids=ids, latents=lat, timesteps=t)
    if not headless:
        kwargs.update(labels=ids, diffusion_target=torch.randn_like(lat))
    with torch.no_grad():
        as_dict = net(**kwargs)
        as_tuple = net(**kwargs, return_dict=False)
    assert isinstance(as_tuple, tuple)
    expected = as_dict.to_tuple()
    assert len(as_tuple) == len(expected) >= 3
    for a, b in zip(as_tuple, expected):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
        else:  # the cache the LLM body made (use_cache defaults to the LLM's config, as for the LLM itself)
            assert type(a) is type(b) and a.get_seq_length() == b.get_seq_length() == ids.shape[1]


@pytest.mark.parametrize("headless", [False, True], ids=["with-heads", "model"])
def test_past_key_values_alias_fills_the_callers_cache_with_a_deprecation_warning(llama, headless):
    model = wrap(llama)
    net = model.model if headless else model
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    cache = DynamicCache(config=model.config.text_config)
    with pytest.warns(FutureWarning, match="past_key_values"):
        with torch.no_grad():
            net(input_ids=ids[:, :4], past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == 4
    with torch.no_grad():  # the continuation through the caller's cache equals the full forward
        step = model(input_ids=ids[:, 4:], cache=cache, use_cache=True).logits
        full = model(input_ids=ids).logits
    torch.testing.assert_close(step, full[:, 4:], atol=1e-5, rtol=1e-5)


def test_shift_labels_are_what_the_lm_loss_scores(llama):
    model = wrap(llama)
    ids = image_ids(model.config)
    lat, t = torch.randn(1, 4, 4, 4), torch.tensor([0])
    shifted = F.pad(ids[:, 1:], (0, 1), value=-100)  # what sequence-parallel training computes before sharding
    other = shifted.clone()
    other[0, 0] = 11  # a different target for the first position
    with torch.no_grad():
        out_a = model(input_ids=ids, latents=lat, timesteps=t, labels=ids, shift_labels=shifted)
        out_b = model(input_ids=ids, latents=lat, timesteps=t, labels=ids, shift_labels=other)
    assert not torch.equal(out_a.loss, out_b.loss)
    # `<image>` placeholders are never targets, also when they arrive pre-shifted
    target = other.masked_fill(other == model.config.image_token_id, -100)
    expected = F.cross_entropy(out_b.logits[0].float(), target[0], ignore_index=-100)
    torch.testing.assert_close(out_b.lm_loss, expected)


def test_text_longer_than_max_position_embeddings_runs_as_the_base_llm_under_rope_scaling():
    llm = tiny_llama(max_position_embeddings=32, rope_parameters={"rope_type": "linear", "factor": 4.0})
    model = wrap(llm)
    ids = torch.randint(3, 290, (1, 64))
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        theirs = llm(input_ids=ids).logits
    assert torch.equal(ours[..., : theirs.shape[-1]], theirs)  # 3 image-token rows appended
    # images too: the scaled RoPE decides the context, not `max_position_embeddings`
    long_prefix = image_ids(model.config, prefix=range(5, 45))
    with torch.no_grad():
        model(input_ids=long_prefix, latents=torch.randn(1, 4, 4, 4), timesteps=torch.tensor([3]))


def test_sequence_with_images_past_an_unscaled_rope_range_is_refused(llama):
    model = wrap(llama)  # max_position_embeddings=512, default RoPE
    ids = image_ids(model.config, prefix=[5] * 600)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(input_ids=ids, latents=torch.randn(1, 4, 4, 4), timesteps=torch.tensor([1]))


def test_tensor_parallel_plan_shards_the_tied_lm_head_like_llama():
    llm = tiny_llama(tie_word_embeddings=True)
    model = wrap(llm)
    assert model.config.tie_word_embeddings
    ours = model.tp_plan
    for key, style in llm.tp_plan.items():
        ours_key = key if key == "lm_head" else f"model.language_model.{key.removeprefix('model.')}"
        assert ours.get(ours_key) == style, key
    assert ours["lm_head"] == "colwise_gather_output"


@pytest.mark.parametrize("cls", [MonoFormerForConditionalGeneration, MonoFormerModel])
def test_forward_declares_output_attentions_and_typed_kwargs(cls):
    params = inspect.signature(cls.forward).parameters
    assert "output_attentions" in params and "output_hidden_states" in params
    assert typing.get_args(params["kwargs"].annotation) == (TransformersKwargs,)
    assert typing.get_origin(params["kwargs"].annotation) is Unpack


def test_output_attentions_show_the_hybrid_mask(llama):
    model = wrap(llama)
    model.set_attn_implementation("eager")
    ids = image_ids(model.config)  # 5 6 <boi> [4 patches] <eoi> 7 8
    with torch.no_grad():
        out = model(input_ids=ids, latents=torch.randn(1, 4, 4, 4), timesteps=torch.tensor([3]),
                    output_attentions=True, output_hidden_states=True)
    assert len(out.attentions) == llama.config.num_hidden_layers
    assert len(out.hidden_states) == llama.config.num_hidden_layers + 1
    attn = out.attentions[0][0]  # (heads, L, L)
    first_patch, last_patch = 3, 6
    assert attn.shape[-1] == ids.shape[1]
    assert bool((attn[:, first_patch, last_patch] > 0).all())  # bidirectional inside the image
    assert bool((attn[:, 1, first_patch:] == 0).all())  # text before the image never sees it


# ----------------------------------------------------------------------------------------------------------------------
# From a run of transformers' own ModelTesterMixin / GenerationTesterMixin against MonoFormer
# ----------------------------------------------------------------------------------------------------------------------
def test_config_output_flags_return_attentions_and_hidden_states_as_for_the_llm(llama):
    model = wrap(llama)
    model.set_attn_implementation("eager")
    model.config.output_attentions = model.config.output_hidden_states = True
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[5, 6, 7, 8]]))
    n = model.config.text_config.num_hidden_layers
    assert len(out.attentions) == n and len(out.hidden_states) == n + 1
    model.config.output_attentions = model.config.output_hidden_states = False
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[5, 6, 7, 8]]))
    assert out.attentions is None and out.hidden_states is None


def test_generate_from_inputs_embeds_continues_as_from_input_ids(llama):
    model = wrap(llama)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        from_ids = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
        from_embeds = model.generate(inputs_embeds=model.get_input_embeddings()(ids), max_new_tokens=4, do_sample=False)
    assert torch.equal(from_embeds, from_ids[:, ids.shape[1]:])  # generate returns the new tokens only


def test_images_go_in_with_inputs_embeds_as_with_input_ids(llama):
    model = wrap(llama)
    ids = image_ids(model.config)
    lat, t = torch.randn(1, 4, 4, 4), torch.tensor([300])
    with torch.no_grad(), pytest.raises(ValueError, match="input_ids"):  # new rows are all the mean row
        model(inputs_embeds=model.get_input_embeddings()(ids), latents=lat, timesteps=t)
    with torch.no_grad():  # trained (or from-scratch) embeddings tell the placeholders apart
        model.get_input_embeddings().weight[model.config.image_token_id] += 1.0
        by_ids = model(input_ids=ids, latents=lat, timesteps=t)
        by_embeds = model(inputs_embeds=model.get_input_embeddings()(ids), latents=lat, timesteps=t)
        with pytest.raises(ValueError, match="placeholders"):  # no placeholder embedding in the sequence
            model(inputs_embeds=model.get_input_embeddings()(ids[:, :2]), latents=lat, timesteps=t)
    torch.testing.assert_close(by_embeds.logits, by_ids.logits, rtol=0, atol=0)
    torch.testing.assert_close(by_embeds.diffusion_output, by_ids.diffusion_output, rtol=0, atol=0)
    with torch.no_grad():  # understanding: generate from embeddings with the image in the prompt
        gen_ids = model.generate(input_ids=ids, latents=lat, max_new_tokens=3, do_sample=False)
        gen_embeds = model.generate(inputs_embeds=model.get_input_embeddings()(ids), latents=lat, max_new_tokens=3,
                                    do_sample=False)
    assert torch.equal(gen_embeds, gen_ids[:, ids.shape[1]:])


def test_get_image_features_follows_the_vision_language_api(llama):
    model = wrap(llama, vae_scale_factor=1)
    pixels = torch.randn(2, 4, 4, 4)
    out = model.model.get_image_features(pixel_values=pixels)
    n = model.config.num_image_tokens(4, 4) - model.config.tokens_per_image_extra
    assert len(out.pooler_output) == 2 and out.last_hidden_state.shape == (2, n, model.config.text_config.hidden_size)
    torch.testing.assert_close(out.pooler_output[1], out.last_hidden_state[1])
    as_tuple = model.model.get_image_features(pixel_values=pixels, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.last_hidden_state)
    mixed = model.model.get_image_features(latents=[pixels[0], torch.randn(4, 8, 4)])
    assert mixed.last_hidden_state is None and [f.shape[0] for f in mixed.pooler_output] == [n, 2 * n]
