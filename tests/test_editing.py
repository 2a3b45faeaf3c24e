"""Instruction-based editing: `pipe(prompt=instruction, image=source, image_guidance_scale=...)`."""

import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_pipeline import make_pipe


@pytest.fixture(scope="module")
def pipe():
    return make_pipe()  # 16x16 RGB through the tiny VAE


def source_image(seed=0, size=16) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


def edit(pipe, image, prompt="flip it horizontally", seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", 2)
    return pipe(prompt=prompt, image=image, generator=torch.manual_seed(seed), **kwargs).images


@pytest.mark.parametrize("output_type", ["pil", "np", "pt", "latent"])
def test_edit_end_to_end_every_output_type(pipe, output_type):
    images = edit(pipe, source_image(), output_type=output_type, guidance_scale=4.0, image_guidance_scale=1.5)
    if output_type == "pil":
        assert len(images) == 1 and images[0].size == (16, 16)
    elif output_type == "np":
        assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()
    elif output_type == "pt":
        assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
    else:
        assert images.shape == (1, 4, 8, 8) and torch.isfinite(images).all()


@pytest.mark.parametrize("scales", [(4.0, 1.5), (4.0, 1.0), (1.0, 1.5), (1.0, 1.0)])
def test_edit_guidance_scales_pick_the_branches(pipe, scales):
    guidance_scale, image_guidance_scale = scales
    images = edit(pipe, source_image(), output_type="pt", guidance_scale=guidance_scale,
                  image_guidance_scale=image_guidance_scale)
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
    assert pipe._num_branches == (3 if image_guidance_scale > 1 else 2 if guidance_scale > 1 else 1)


@pytest.mark.parametrize("scales", [(4.0, 1.5), (4.0, 1.0), (1.0, 2.0)])
def test_edit_prefix_cache_equals_full_recompute(scales):
    pipe = make_pipe(pixel_space=True)
    source = torch.rand(2, 3, 8, 8)  # one source per prompt, in [0, 1] as output_type="pt" returns them
    kwargs = dict(prompt=["flip it horizontally", "invert the colours"], image=source, guidance_scale=scales[0],
                  image_guidance_scale=scales[1], output_type="latent", num_images_per_prompt=2,
                  negative_prompt="blurry", guidance_start=0.0, guidance_stop=0.5, num_inference_steps=4)
    cached = pipe(**kwargs, generator=torch.manual_seed(0)).images
    naive = pipe(**kwargs, generator=torch.manual_seed(0), use_prefix_cache=False).images
    assert cached.shape == (4, 3, 8, 8)
    torch.testing.assert_close(cached, naive, rtol=0, atol=1e-5)


def test_edit_rows_put_the_clean_source_before_the_instruction(pipe):
    pipe._num_branches = 3
    latents = torch.randn(1, 4, 8, 8)
    ids, mask, n, sources = pipe.encode_edit_prompt("flip it", "", latents, 1, 16, 16, torch.device("cpu"))
    p = pipe.processor
    image_counts = (ids == p.image_token_id).sum(1).tolist()
    assert image_counts == [n, 2 * n, 2 * n]  # uncond: no source; source only; source + instruction
    assert sources[0] is None and torch.equal(sources[1], latents[0]) and torch.equal(sources[2], latents[0])
    full = ids[2][mask[2].bool()].tolist()
    instruction = p.tokenizer("flip it", add_special_tokens=False)["input_ids"]
    start = full.index(p.eoi_token_id) + 1  # after the source block: the instruction, then `<boi>` and the image
    assert full[0] == p.boi_token_id and full[start : start + len(instruction)] == instruction
    assert full[start + len(instruction)] == p.boi_token_id and full[-n:] == [p.image_token_id] * n
    assert ids[1][mask[1].bool()].tolist() == full[:start] + full[start + len(instruction) :]


def test_dual_guidance_combines_three_branches(pipe):
    """InstructPix2Pix eq. 3 through the guider: `uncond + s_T (full - image) + s_I (image - uncond)`."""
    u, i, f = torch.randn(3, 2, 4, 8, 8).unbind(0)
    rows = torch.cat([u, i, f])
    pipe._num_branches, pipe._image_guidance_scale = 3, 2.0
    for text_scale, expected in ((5.0, u + 5.0 * (f - i) + 2.0 * (i - u)), (0.5, f + (2.0 - 1.0) * (i - u))):
        pipe._call_guider = pipe.prepare_guider(text_scale, None, None)  # 0.5: text guidance off
        pipe._call_guider.set_state(step=0, num_inference_steps=1, timestep=torch.tensor(999))
        torch.testing.assert_close(pipe.apply_guidance(rows, True), expected)
    torch.testing.assert_close(pipe.apply_dual_guidance(f, i, u), f + (i - u))


def test_edit_reads_the_source_and_the_image_guidance_scale(pipe):
    base = edit(pipe, source_image(0), output_type="latent")
    assert not torch.allclose(base, edit(pipe, source_image(1), output_type="latent"))
    assert not torch.allclose(base, edit(pipe, source_image(0), output_type="latent", image_guidance_scale=3.0))
    # a tensor in [0, 1] and the PIL image it came from are the same source
    as_tensor = torch.from_numpy(np.array(source_image(0))).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(edit(pipe, as_tensor, output_type="latent"), base, rtol=0, atol=1e-5)


def test_edit_errors_name_the_problem(pipe):
    with pytest.raises(ValueError, match="`image_guidance_scale`=1.5 was given without `image`"):
        pipe("flip it horizontally", image_guidance_scale=1.5, num_inference_steps=1)
    with pytest.raises(ValueError, match="`image` has 1 channels but this pipeline's images have 3"):
        edit(pipe, torch.rand(1, 16, 16))
    with pytest.raises(ValueError, match="`image` is 16x16 pixels but `height`x`width` is 32x32"):
        edit(pipe, source_image(), height=32, width=32)
    with pytest.raises(ValueError, match="`image` is 15x15 pixels; both sides must be multiples of"):
        edit(pipe, source_image(size=15))
    with pytest.raises(ValueError, match="`image` holds 3 source images for 2 prompts"):
        edit(pipe, [source_image(i) for i in range(3)], prompt=["a", "b"])
    with pytest.raises(TypeError, match="`image` must be a PIL image"):
        edit(pipe, "source.png")
    with pytest.raises(ValueError, match="`image_guidance_scale` must be a finite number >= 0"):
        edit(pipe, source_image(), image_guidance_scale=-1.0)
    with pytest.raises(ValueError, match="different sizes"):
        edit(pipe, [source_image(0), source_image(1, size=8)], prompt=["a", "b"])


def test_a_grayscale_pipeline_takes_2d_images_as_numpy_gives_them():
    pipe = make_pipe(pixel_space=True, num_channels=1, latent_channels=1)
    gray = Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8), dtype=np.uint8))  # mode "L"
    base = edit(pipe, gray, output_type="latent")
    torch.testing.assert_close(edit(pipe, np.array(gray), output_type="latent"), base, rtol=0, atol=1e-5)
    torch.testing.assert_close(edit(pipe, torch.from_numpy(np.array(gray)), output_type="latent"), base,
                               rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"needs a channel axis"):  # a stack (n, H, W) read as (H, W, C)
        edit(pipe, np.stack([np.array(gray)] * 8))


def test_an_edit_whose_callback_cuts_text_guidance_runs_as_text_guidance_one(pipe):
    def cut_to(value):
        def callback(p, i, t, callback_kwargs):
            if i == 0:
                p._guidance_scale = value
            return callback_kwargs
        return callback

    cut = [edit(pipe, source_image(0), output_type="latent", guidance_scale=4.0, callback_on_step_end=cut_to(v))
           for v in (0.0, 1.0)]
    torch.testing.assert_close(cut[0], cut[1], rtol=0, atol=0)  # <= 1 is "no text guidance", as at the call's start
