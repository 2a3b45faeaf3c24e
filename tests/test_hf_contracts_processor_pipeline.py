"""The processor and pipeline contracts (what `ProcessorTesterMixin` / `PipelineTesterMixin` check), pinned on
MonoFormer. The upstream mixins live in the libraries' test trees, which are not installed."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from modeling_monoformer import (
    MonoFormerForConditionalGeneration,
    MonoFormerImageProcessor,
    MonoFormerPipeline,
    MonoFormerProcessor,
)
from tests.conftest import make_tokenizer, tiny_llama
from tests.test_pipeline import make_pipe

IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8))


def make_processor(**kwargs) -> MonoFormerProcessor:
    return MonoFormerProcessor(MonoFormerImageProcessor(num_channels=3), make_tokenizer(), patch_size=2,
                               vae_scale_factor=1, **kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# Processor
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("style", ["flat", "text_kwargs"])
def test_text_options_reach_the_tokenizer_with_and_without_images(style):
    processor = make_processor()
    options = dict(max_length=40, padding="max_length")
    kwargs = options if style == "flat" else {"text_kwargs": options}
    with_image = processor(text=["a coat<image>"], images=[IMAGE], **kwargs)
    assert with_image["input_ids"].shape == (1, 40)
    assert with_image["pixel_values"].shape == (1, 3, 8, 8)
    assert (with_image["input_ids"] == processor.image_token_id).sum() == 16
    text_only = processor(text=["a coat"], **kwargs)
    assert text_only["input_ids"].shape == (1, 40)


def test_image_options_reach_the_image_processor():
    processor = make_processor()
    resize = {"do_resize": True, "size": {"height": 4, "width": 4}}
    out = processor(text=["<image>"], images=[IMAGE], images_kwargs=resize)
    assert out["pixel_values"].shape == (1, 3, 4, 4)
    assert (out["input_ids"] == processor.image_token_id).sum() == 4


def test_chat_template_and_keyword_overrides_survive_save_and_load(tmp_path):
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    processor = make_processor(chat_template=template)
    processor.save_pretrained(tmp_path)
    loaded = MonoFormerProcessor.from_pretrained(tmp_path)
    assert loaded.chat_template == template
    assert loaded.to_dict() == processor.to_dict()
    assert MonoFormerProcessor.from_pretrained(tmp_path, bos_token="(BOS)").tokenizer.bos_token == "(BOS)"
    reloaded_dir = tmp_path / "again"
    loaded.save_pretrained(reloaded_dir)
    assert MonoFormerProcessor.from_pretrained(reloaded_dir).to_dict() == processor.to_dict()


def test_from_pretrained_opts_into_remote_code_only_when_the_user_does(tmp_path, monkeypatch):
    make_processor().save_pretrained(tmp_path)
    seen = []
    original = AutoTokenizer.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", classmethod(spy))
    MonoFormerProcessor.from_pretrained(tmp_path)
    MonoFormerProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert seen == [False, True]  # never opted in for the user (False: the folder's code is declined, no prompt)


def test_processor_beside_its_model_loads_in_a_fresh_process_without_asking_to_run_the_folders_code(tmp_path):
    # A converted checkpoint keeps config.json (with auto_map) and the tokenizer in one folder: loading the processor
    # must neither run that code nor stop at transformers' interactive "run the custom code? [y/N]".
    import subprocess
    import sys

    tok = make_tokenizer()
    model = MonoFormerForConditionalGeneration.from_llm(tiny_llama(), tokenizer=tok, latent_channels=3, patch_size=2,
                                                        vae_scale_factor=1, sample_size=8)
    model.save_pretrained(tmp_path)
    MonoFormerProcessor(MonoFormerImageProcessor(num_channels=3), tok).save_pretrained(tmp_path)
    code = ("from modeling_monoformer import MonoFormerProcessor; "
            f"p = MonoFormerProcessor.from_pretrained({str(tmp_path)!r}); print(p.tokenizer.convert_tokens_to_ids('<image>'))")
    done = subprocess.run([sys.executable, "-c", code], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "custom code" not in done.stdout + done.stderr
    assert int(done.stdout.split()[-1]) == model.config.image_token_id


def test_generate_takes_the_processor_output_of_a_pixel_space_model():
    tok = make_tokenizer()
    model = MonoFormerForConditionalGeneration.from_llm(
        tiny_llama(), tokenizer=tok, latent_channels=3, patch_size=2, vae_scale_factor=1, sample_size=8
    ).eval()
    processor = MonoFormerProcessor(MonoFormerImageProcessor(num_channels=3), tok).configure_for_model(model.config)
    inputs = processor(text=["<image>a photo of"], images=[IMAGE])
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values"}
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        first = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                      latents=inputs["pixel_values"]).logits[:, -1].argmax(-1)
        other = model(input_ids=inputs["input_ids"], latents=-inputs["pixel_values"]).logits[:, -1]
    prompt_len = inputs["input_ids"].shape[1]
    assert generated.shape == (1, prompt_len + 3)
    assert generated[0, prompt_len] == first[0]  # the prefill saw the image (clean, t = 0) ...
    assert not torch.allclose(other, model(**inputs).logits[:, -1])  # ... and the image matters
    latent_model = MonoFormerForConditionalGeneration.from_llm(tiny_llama(), latent_channels=3, patch_size=2,
                                                               vae_scale_factor=8)
    with pytest.raises(ValueError, match="pixel_values.*latents"):
        latent_model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"])


# ----------------------------------------------------------------------------------------------------------------------
# Pipeline
# ----------------------------------------------------------------------------------------------------------------------
def test_installed_class_loads_a_saved_folder_without_remote_code(tmp_path):
    pipe = make_pipe()
    pipe.save_pretrained(tmp_path)
    loaded = MonoFormerPipeline.from_pretrained(tmp_path)
    assert type(loaded) is MonoFormerPipeline
    assert type(loaded.model) is MonoFormerForConditionalGeneration
    assert type(loaded.processor) is MonoFormerProcessor
    loaded.set_progress_bar_config(disable=True)
    run = dict(num_inference_steps=2, output_type="np")
    expected = pipe("a coat", generator=torch.manual_seed(0), **run).images
    got = loaded("a coat", generator=torch.manual_seed(0), **run).images
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_from_pretrained_takes_diffusers_loading_arguments(tmp_path):
    """`dtype` (and its older name `torch_dtype`, or a dict per component), one-device `device_map`, a missing
    `variant` refused as diffusers refuses it, and a subclass defined outside the package."""
    make_pipe().save_pretrained(tmp_path)
    assert MonoFormerPipeline.from_pretrained(tmp_path, dtype=torch.bfloat16).model.dtype == torch.bfloat16
    assert MonoFormerPipeline.from_pretrained(tmp_path, torch_dtype=torch.bfloat16).model.dtype == torch.bfloat16
    per_component = MonoFormerPipeline.from_pretrained(tmp_path, dtype={"vae": torch.bfloat16, "default": None})
    assert (per_component.vae.dtype, per_component.model.dtype) == (torch.bfloat16, torch.float32)
    with pytest.raises(ValueError, match="not both"):
        MonoFormerPipeline.from_pretrained(tmp_path, dtype=torch.bfloat16, torch_dtype=torch.bfloat16)
    assert MonoFormerPipeline.from_pretrained(tmp_path, device_map="cpu").model.device.type == "cpu"
    with pytest.raises(ValueError, match="one device"):
        MonoFormerPipeline.from_pretrained(tmp_path, device_map="balanced")
    with pytest.raises(ValueError, match="variant=fp16"):
        MonoFormerPipeline.from_pretrained(tmp_path, variant="fp16")

    class MyPipeline(MonoFormerPipeline):
        pass

    assert type(MyPipeline.from_pretrained(tmp_path)) is MyPipeline


def test_latent_pipeline_without_vae_is_refused_before_compute_and_at_save(tmp_path):
    pipe = make_pipe()
    pipe.vae = None
    calls = []
    hook = pipe.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match="vae"):
            pipe("a coat", num_inference_steps=2)
        with pytest.raises(ValueError, match="vae"):
            pipe.save_pretrained(tmp_path)
    finally:
        hook.remove()
    assert calls == []


def test_installed_class_loads_the_shipped_demo_with_its_guider_and_step_count():
    import pathlib

    demo = pathlib.Path(__file__).resolve().parents[1] / "examples" / "monoformer-fashion-mnist"
    pipe = MonoFormerPipeline.from_pretrained(demo)
    assert type(pipe) is MonoFormerPipeline and type(pipe.model) is MonoFormerForConditionalGeneration
    assert type(pipe.processor) is MonoFormerProcessor and pipe.vae is None
    index = __import__("json").loads((demo / "model_index.json").read_text())
    assert pipe.config.default_num_inference_steps == index["default_num_inference_steps"]
    assert type(pipe.guider).__name__ == index["guider"][1]
