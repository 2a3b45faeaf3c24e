"""MonoFormerPipeline.generate_interleaved: text, image, text in one call on one KV cache."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList
from transformers.generation.streamers import BaseStreamer

from tests.test_pipeline import make_pipe

PROMPT = "a photo of a"


class ForceTokens(LogitsProcessor):
    """Forces `schedule[length]` as the next token when the sequence is `length` tokens long (else the model's)."""

    def __init__(self, schedule: dict[int, int]):
        self.schedule = schedule

    def __call__(self, input_ids, scores):
        token = self.schedule.get(input_ids.shape[1])
        if token is None:
            return scores
        forced = torch.full_like(scores, -float("inf"))
        forced[:, token] = 0.0
        return forced


class CollectingStreamer(BaseStreamer):
    def __init__(self):
        self.tokens, self.ends = [], 0

    def put(self, value):
        self.tokens += value.reshape(-1).tolist()

    def end(self):
        self.ends += 1


def image_side(pipe) -> int:
    return pipe.model.config.sample_size * pipe.vae_scale_factor


def text_image_text(pipe, prompt=PROMPT, images=None, text_before=2, text_after=2, **kwargs):
    """Forces `<boi>` after `text_before` free tokens and EOS `text_after` tokens after the image's `<eoi>`."""
    sizes = [] if images is None else [tuple(np.asarray(i).shape[:2]) for i in images]
    length = pipe.processor(text=prompt, image_sizes=[sizes])["input_ids"].shape[1]
    n = pipe.processor.num_image_tokens(image_side(pipe), image_side(pipe))
    boi_at = length + text_before
    schedule = {boi_at: pipe.processor.boi_token_id, boi_at + 1 + n + 1 + text_after: pipe.processor.tokenizer.eos_token_id}
    kwargs.setdefault("num_inference_steps", 3)
    return pipe.generate_interleaved(
        prompt, images=images, max_new_tokens=30, logits_processor=LogitsProcessorList([ForceTokens(schedule)]),
        generator=torch.manual_seed(0), **kwargs,
    )


def recompute_cache(pipe, out) -> DynamicCache:
    """The cache of a no-cache full recompute of `out.sequences` minus its last token, images clean."""
    cache = DynamicCache()
    latents = out.image_latents
    same = len({tuple(x.shape) for x in latents}) == 1
    pipe.model(
        input_ids=out.sequences[:, :-1], latents=torch.stack(latents) if same else latents,
        timesteps=torch.zeros(len(latents)), cache=cache, use_cache=True,
    )
    return cache


def assert_cache_equal(a: DynamicCache, b: DynamicCache):
    assert a.get_seq_length() == b.get_seq_length()
    for la, lb in zip(a.layers, b.layers):
        torch.testing.assert_close(la.keys, lb.keys, rtol=0, atol=1e-5)
        torch.testing.assert_close(la.values, lb.values, rtol=0, atol=1e-5)


@pytest.mark.parametrize("pixel_space", [True, False])
def test_forced_boi_gives_text_image_text_and_cache_equals_full_recompute(pixel_space):
    pipe = make_pipe(pixel_space=pixel_space)
    out = text_image_text(pipe, output_type="pil")
    kinds = [type(s) for s in out.segments]
    assert kinds[0] is str and issubclass(kinds[1], Image.Image) and kinds[2] is str and len(kinds) == 3
    assert out.segments[1].size == (image_side(pipe), image_side(pipe))
    ids = out.sequences[0]
    p = pipe.processor
    n = p.num_image_tokens(image_side(pipe), image_side(pipe))
    assert int((ids == p.boi_token_id).sum()) == 1 and int((ids == p.eoi_token_id).sum()) == 1
    assert int((ids == p.image_token_id).sum()) == n and len(out.image_latents) == 1
    assert int(ids[-1]) == p.tokenizer.eos_token_id
    assert_cache_equal(out.cache, recompute_cache(pipe, out))


@pytest.mark.parametrize("timestep_conditioning", ["adaln", "token"])
def test_image_in_context_equals_the_text_to_image_pipeline_on_the_same_prefix(timestep_conditioning):
    """With `<boi>` forced right after the prompt, the sequence before the image is exactly the pipeline's prompt row,
    and the batched CFG rows (the prompt's cache and `<boi>` alone) are its rows: the same seed gives the same image."""
    pipe = make_pipe(timestep_conditioning=timestep_conditioning)
    out = text_image_text(pipe, text_before=0, output_type="latent", guidance_scale=3.0)
    expected = pipe(PROMPT, num_inference_steps=3, guidance_scale=3.0, generator=torch.manual_seed(0),
                    output_type="latent").images
    torch.testing.assert_close(out.segments[0], expected[0], rtol=0, atol=1e-5)
    unguided = text_image_text(pipe, text_before=0, output_type="latent", guidance_scale=3.0, guidance_start=0.5)
    expected = pipe(PROMPT, num_inference_steps=3, guidance_scale=3.0, guidance_start=0.5,
                    generator=torch.manual_seed(0), output_type="latent").images
    torch.testing.assert_close(unguided.segments[0], expected[0], rtol=0, atol=1e-5)


def test_input_images_of_different_sizes_are_read_clean_and_cache_equals_full_recompute():
    pipe = make_pipe(pixel_space=True)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)),
              Image.fromarray(rng.integers(0, 255, (4, 8, 3), dtype=np.uint8))]
    out = text_image_text(pipe, prompt="<image> and <image>: a photo of a", images=images, output_type="np")
    assert [type(s) for s in out.segments] == [str, np.ndarray, str]
    assert [tuple(x.shape) for x in out.image_latents] == [(3, 8, 8), (3, 4, 8), (3, 8, 8)]
    torch.testing.assert_close(out.image_latents[0], pipe.preprocess_image(images[0])[0])
    assert_cache_equal(out.cache, recompute_cache(pipe, out))
    # the input images are read: other pixels, other keys/values for the text after them
    other = [Image.fromarray(255 - np.asarray(images[0])), images[1]]
    greedy = dict(max_new_tokens=4, num_inference_steps=1)
    a = pipe.generate_interleaved("<image> and <image>: a photo of a", images=images, **greedy).cache
    b = pipe.generate_interleaved("<image> and <image>: a photo of a", images=other, **greedy).cache
    assert not torch.allclose(a.layers[-1].keys[..., -1, :], b.layers[-1].keys[..., -1, :])


def test_vae_input_image_is_encoded():
    pipe = make_pipe()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    out = text_image_text(pipe, prompt="<image>a photo of a", images=[image], output_type="latent")
    assert out.image_latents[0].shape == (4, 8, 8)
    torch.testing.assert_close(out.image_latents[0], pipe.encode_image(pipe.preprocess_image(image))[0])
    assert_cache_equal(out.cache, recompute_cache(pipe, out))


def test_text_streams_as_one_sequence():
    pipe = make_pipe(pixel_space=True)
    streamer = CollectingStreamer()
    out = text_image_text(pipe, streamer=streamer)
    prompt_length = pipe.processor(text=PROMPT)["input_ids"].shape[1]
    generated = out.sequences[0, prompt_length:]
    text_only = generated[generated != pipe.processor.image_token_id].tolist()
    assert streamer.tokens == text_only and streamer.ends == 1


def test_stops_at_eos_and_budget_without_an_image():
    pipe = make_pipe(pixel_space=True)
    eos = pipe.processor.tokenizer.eos_token_id
    length = pipe.processor(text=PROMPT)["input_ids"].shape[1]
    out = pipe.generate_interleaved(PROMPT, max_new_tokens=5, logits_processor=LogitsProcessorList([
        ForceTokens({length + 1: eos})]))
    assert out.sequences.shape[1] == length + 2 and len(out.segments) <= 1
    out = pipe.generate_interleaved(PROMPT, max_new_tokens=3, suppress_tokens=[eos, pipe.processor.boi_token_id])
    assert out.sequences.shape[1] == length + 3 and [type(s) for s in out.segments] == [str]


def test_bad_inputs_raise_clear_errors():
    pipe = make_pipe(pixel_space=True)
    image = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match="`images` holds 1 image"):
        pipe.generate_interleaved("a photo with no placeholder", images=[image])
    with pytest.raises(ValueError, match="marker"):
        pipe.generate_interleaved("<image> two markers <image>", images=[image])
    with pytest.raises(ValueError, match="`prompt` must be one non-empty string"):
        pipe.generate_interleaved(["a", "b"])
    with pytest.raises(ValueError, match="<boi>"):
        pipe.generate_interleaved("a photo <boi>")
    with pytest.raises(ValueError, match="`max_new_tokens`"):
        pipe.generate_interleaved("a photo", max_new_tokens=0)
    with pytest.raises(ValueError, match=r"`images\[0\]` is 8x7 pixels; both sides must be multiples of"):
        pipe.generate_interleaved("<image> a photo", images=[Image.new("RGB", (7, 8))])
    with pytest.raises(ValueError, match="`num_beams`"):
        pipe.generate_interleaved("a photo", num_beams=2)
    with pytest.raises(ValueError, match="`output_type`"):
        pipe.generate_interleaved("a photo", output_type="jpg")


class BoostTokens(LogitsProcessor):
    """Makes `tokens` the model's favourites without masking anything else."""

    def __init__(self, tokens: list[int]):
        self.tokens = tokens

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, self.tokens] += 1e4
        return scores


def test_text_never_writes_an_image_placeholder_or_eoi():
    """The pipeline writes every image's placeholders and `<eoi>`; a model that favours them in text cannot emit
    them, so `sequences` still recompute with `image_latents`."""
    pipe = make_pipe(pixel_space=True)
    p = pipe.processor
    length = p(text=PROMPT)["input_ids"].shape[1]
    out = pipe.generate_interleaved(
        PROMPT, max_new_tokens=4, suppress_tokens=[p.boi_token_id],  # the user's own list is kept
        logits_processor=LogitsProcessorList([BoostTokens([p.image_token_id, p.eoi_token_id])]),
    )
    new = out.sequences[0, length:]
    assert new.numel() == 4
    assert not bool(((new == p.image_token_id) | (new == p.eoi_token_id) | (new == p.boi_token_id)).any())
    pipe.model(input_ids=out.sequences)  # no placeholder without an image


def test_a_batched_image_tensor_counts_as_its_images():
    pipe = make_pipe(pixel_space=True)
    images = torch.rand(2, 3, 8, 8, generator=torch.manual_seed(0))
    kw = dict(max_new_tokens=2, suppress_tokens=[pipe.processor.boi_token_id])
    batched = pipe.generate_interleaved("<image> and <image>: a", images=images, **kw)
    listed = pipe.generate_interleaved("<image> and <image>: a", images=list(images), **kw)
    assert len(batched.image_latents) == 2 and torch.equal(batched.sequences, listed.sequences)
    for a, b in zip(batched.image_latents, listed.image_latents):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"1 `<image>` marker\(s\) but `images` holds 2 image"):
        pipe.generate_interleaved("<image> a", images=images)
