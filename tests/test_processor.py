"""MonoFormerProcessor / MonoFormerImageProcessor: AutoProcessor round trip and `<image>` placeholder expansion."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from modeling_monoformer import (
    MonoFormerForConditionalGeneration,
    MonoFormerImageProcessor,
    MonoFormerProcessor,
    train_bpe_tokenizer,
)
from tests.conftest import make_tokenizer, tiny_llama


def make_processor(num_channels=3, **kwargs) -> MonoFormerProcessor:
    return MonoFormerProcessor(MonoFormerImageProcessor(num_channels=num_channels), make_tokenizer(), **kwargs)


def count_placeholders(processor, input_ids) -> list[int]:
    return (input_ids == processor.image_token_id).sum(-1).tolist()


# ----------------------------------------------------------------------------------------------------------------------
# Round trip
# ----------------------------------------------------------------------------------------------------------------------
def test_autoprocessor_round_trip_with_remote_code_gives_identical_inputs(tmp_path):
    processor = make_processor(patch_size=4, vae_scale_factor=1, timestep_token=True)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "processing_monoformer.py").is_file()
    assert (tmp_path / "image_processing_monoformer.py").is_file()

    loaded = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(loaded).__name__ == "MonoFormerProcessor"
    assert type(loaded).__module__.startswith("transformers_modules")  # the saved code, not this package
    assert (loaded.patch_size, loaded.vae_scale_factor, loaded.timestep_token) == (4, 1, True)
    assert loaded.tokenizer.padding_side == "left"
    assert [loaded.image_token_id, loaded.boi_token_id, loaded.eoi_token_id] == [
        processor.image_token_id, processor.boi_token_id, processor.eoi_token_id
    ]

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (16, 24, 3), dtype=np.uint8)) for _ in range(2)]
    texts = ["a photo of a bag<image>", "<image>a coat"]
    expected = processor(text=texts, images=images)
    got = loaded(text=texts, images=images)
    torch.testing.assert_close(got["input_ids"], expected["input_ids"], rtol=0, atol=0)
    torch.testing.assert_close(got["attention_mask"], expected["attention_mask"], rtol=0, atol=0)
    torch.testing.assert_close(got["pixel_values"], expected["pixel_values"], rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------------
# Placeholder counts
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "patch_size, vae_scale_factor, timestep_token, height, width, expected",
    [
        (2, 8, False, 256, 256, 256),  # SD-VAE latents 32x32, 2x2 patches
        (2, 8, False, 128, 256, 128),  # non-square
        (2, 8, True, 64, 32, 9),  # +1 timestep token
        (2, 1, False, 28, 28, 196),  # pixel-space Fashion-MNIST
        (4, 1, False, 8, 24, 12),
        (2, 2, True, 16, 16, 17),
    ],
)
def test_placeholder_count_matches_patch_grid(patch_size, vae_scale_factor, timestep_token, height, width, expected):
    processor = make_processor(patch_size=patch_size, vae_scale_factor=vae_scale_factor, timestep_token=timestep_token)
    assert processor.num_image_tokens(height, width) == expected
    batch = processor(text=["a dress<image>"], image_sizes=[[(height, width)]])
    assert count_placeholders(processor, batch["input_ids"]) == [expected]
    ids = batch["input_ids"][0].tolist()
    start = ids.index(processor.boi_token_id)
    assert ids[start + 1 : start + 1 + expected] == [processor.image_token_id] * expected
    assert ids[start + 1 + expected] == processor.eoi_token_id


def test_placeholder_counts_follow_each_encoded_images_size():
    processor = make_processor(num_channels=1, patch_size=2, vae_scale_factor=1)
    images = [Image.new("L", (8, 8)), Image.new("L", (12, 4)), Image.new("RGB", (6, 10))]  # PIL sizes are (W, H)
    batch = processor(text=["<image> and <image>", "<image>a bag"], images=images)
    assert count_placeholders(processor, batch["input_ids"]) == [16 + 6 * 2, 3 * 5]
    assert [tuple(p.shape) for p in batch["pixel_values"]] == [(1, 8, 8), (1, 4, 12), (1, 10, 6)]


def test_placeholder_counts_agree_with_model_config():
    tok = make_tokenizer()
    model = MonoFormerForConditionalGeneration.from_llm(
        tiny_llama(), tokenizer=tok, patch_size=2, vae_scale_factor=4, timestep_conditioning="token"
    )
    processor = MonoFormerProcessor(MonoFormerImageProcessor(), tok).configure_for_model(model.config)
    for height, width in [(16, 16), (32, 8), (8, 40)]:
        latent_h, latent_w = height // 4, width // 4
        assert processor.num_image_tokens(height, width) == model.config.num_image_tokens(latent_h, latent_w)


def test_image_size_not_divisible_raises_naming_the_multiple():
    processor = make_processor(patch_size=2, vae_scale_factor=8)
    with pytest.raises(ValueError, match="multiple of 16"):
        processor(text=["a coat<image>"], image_sizes=[[(24, 32)]])


def test_marker_count_mismatch_raises():
    processor = make_processor(vae_scale_factor=1)
    with pytest.raises(ValueError, match="marker"):
        processor(text=["<image><image>"], image_sizes=[[(4, 4)]])


def test_configure_for_model_refuses_a_foreign_tokenizer():
    model = MonoFormerForConditionalGeneration.from_llm(tiny_llama(vocab_size=320), tokenizer=None)  # ids 320..
    with pytest.raises(ValueError, match="image_token_id"):
        make_processor().configure_for_model(model.config)


def test_image_processor_outputs_grayscale_and_rgb_in_minus_one_one():
    image = Image.fromarray(np.full((4, 6, 3), 255, dtype=np.uint8))
    gray = MonoFormerImageProcessor(num_channels=1)(image, return_tensors="pt")["pixel_values"]
    rgb = MonoFormerImageProcessor()(image, return_tensors="pt")["pixel_values"]
    assert gray.shape == (1, 1, 4, 6) and rgb.shape == (1, 3, 4, 6)
    torch.testing.assert_close(gray, torch.ones_like(gray))
    torch.testing.assert_close(rgb, torch.ones_like(rgb))


# ----------------------------------------------------------------------------------------------------------------------
# The BPE tokenizer for models built from scratch
# ----------------------------------------------------------------------------------------------------------------------
def test_trained_bpe_tokenizer_is_deterministic_byte_level_with_special_tokens_first():
    corpus = ["a photo of a sneaker", "an ankle boot", "the quick brown fox"] * 10
    tok = train_bpe_tokenizer(corpus, vocab_size=280, padding_side="left")
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "<s>", "</s>"]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token) == (0, 1, 2, None)
    assert tok.padding_side == "left" and len(tok) == 280
    assert train_bpe_tokenizer(corpus, vocab_size=280).get_vocab() == tok.get_vocab()
    assert len(tok("a photo of a sneaker").input_ids) < len("a photo of a sneaker")  # merges were learnt
    unseen = "naïve 🙂 {x: 1}\n"
    assert tok.decode(tok(unseen).input_ids) == unseen  # every byte is in the alphabet: nothing is unknown


def test_trained_bpe_tokenizer_options_and_bad_input():
    tok = train_bpe_tokenizer(["hello world"] * 5, vocab_size=270, pad_token=None, unk_token="<unk>")
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"] and tok.pad_token is None
    with pytest.raises(TypeError, match="`corpus`"):
        train_bpe_tokenizer("hello world")
    with pytest.raises(ValueError, match="`vocab_size` must be at least 259"):
        train_bpe_tokenizer(["hello"], vocab_size=100)
    with pytest.raises(ValueError, match="`padding_side`"):
        train_bpe_tokenizer(["hello"], padding_side="middle")


def test_a_2d_array_or_tensor_is_one_grayscale_image():
    from PIL import Image

    proc = MonoFormerImageProcessor(num_channels=1)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 12), dtype=np.uint8))  # mode "L"
    expected = proc(image, return_tensors="pt")["pixel_values"]
    for given in (np.array(image), [np.array(image)], torch.from_numpy(np.array(image))):
        torch.testing.assert_close(proc(given, return_tensors="pt")["pixel_values"], expected, rtol=0, atol=0)


def test_the_multimodal_processor_takes_2d_grayscale_arrays():
    proc = MonoFormerProcessor(MonoFormerImageProcessor(num_channels=1), make_tokenizer())
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16), dtype=np.uint8))
    expected = proc(text="<image>", images=[image])["pixel_values"]
    for given in ([np.array(image)], np.array(image), [torch.from_numpy(np.array(image))]):
        torch.testing.assert_close(proc(text="<image>", images=given)["pixel_values"], expected, rtol=0, atol=0)
