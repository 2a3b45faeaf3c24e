"""MonoFormerPipeline: prefix KV cache = full recompute, seeds, shapes, schedulers, input errors, portable saves."""

import json
import os
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)
from diffusers.guiders import (
    AdaptiveProjectedGuidance,
    AutoGuidance,
    ClassifierFreeGuidance,
    ClassifierFreeZeroStarGuidance,
    MagnitudeAwareGuidance,
    PerturbedAttentionGuidance,
    TangentialClassifierFreeGuidance,
)
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from PIL import Image

from modeling_monoformer import (
    MonoFormerForConditionalGeneration,
    MonoFormerImageProcessor,
    MonoFormerPipeline,
    MonoFormerProcessor,
)
from tests.conftest import make_tokenizer, tiny_llama

PROMPTS = ["a photo of a sneaker", "a dress"]
EPS_SCHEDULERS = [DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler]


def tiny_vae(latent_channels: int = 4) -> AutoencoderKL:
    """Two down blocks (factor 2), so 16x16 images <-> 8x8 latents."""
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 32), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=32, sample_size=32,
    ).eval()


def make_pipe(scheduler=None, pixel_space: bool = False, num_channels: int = 3, **config) -> MonoFormerPipeline:
    """A tiny pipeline: 16x16 RGB images through the tiny VAE (8x8x4 latents, 16 patch tokens), or 8x8 pixel space."""
    tok = make_tokenizer()
    if pixel_space:
        defaults = dict(latent_channels=num_channels, patch_size=2, vae_scale_factor=1, sample_size=8)
    else:
        defaults = dict(latent_channels=4, patch_size=2, vae_scale_factor=2, sample_size=8)
    defaults.update(config)
    model = MonoFormerForConditionalGeneration.from_llm(tiny_llama(), tokenizer=tok, **defaults).eval()
    processor = MonoFormerProcessor(MonoFormerImageProcessor(num_channels=num_channels), tok)
    pipe = MonoFormerPipeline(
        model=model,
        vae=None if pixel_space else tiny_vae(),
        scheduler=scheduler or DDPMScheduler(),
        processor=processor,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return make_pipe()


def generate(pipe, prompt=PROMPTS, seed=0, steps=2, **kwargs):
    return pipe(prompt, num_inference_steps=steps, generator=torch.manual_seed(seed), **kwargs).images


# ----------------------------------------------------------------------------------------------------------------------
# Prefix KV cache
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("timestep_conditioning", ["adaln", "token", "add"])
def test_prefix_cached_sampling_equals_full_recompute(timestep_conditioning):
    pipe = make_pipe(timestep_conditioning=timestep_conditioning)
    # Prompts of different lengths + CFG: a left-padded batch of 4 rows with a negative prompt.
    kwargs = dict(prompt=["a photo of a sneaker", "a coat"], negative_prompt="a bag", steps=3, output_type="latent")
    cached = generate(pipe, use_prefix_cache=True, **kwargs)
    naive = generate(pipe, use_prefix_cache=False, **kwargs)
    assert cached.shape == (2, 4, 8, 8)
    torch.testing.assert_close(cached, naive, rtol=0, atol=1e-5)


def test_prefix_cache_with_sliding_window_llm_equals_full_recompute():
    """A sliding-window cache would drop prefix keys that `crop` cannot bring back; the pipeline's cache must not."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    tok = make_tokenizer()
    llm = MistralForCausalLM(MistralConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, sliding_window=6,
    )).eval()
    model = MonoFormerForConditionalGeneration.from_llm(
        llm, tokenizer=tok, latent_channels=1, patch_size=2, vae_scale_factor=1, sample_size=8
    ).eval()
    processor = MonoFormerProcessor(MonoFormerImageProcessor(num_channels=1), tok)
    pipe = MonoFormerPipeline(model=model, vae=None, scheduler=DDPMScheduler(), processor=processor)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt=["a photo of a sneaker, a photo of a bag", "a coat"], steps=3, output_type="latent")
    torch.testing.assert_close(
        generate(pipe, use_prefix_cache=True, **kwargs), generate(pipe, use_prefix_cache=False, **kwargs),
        rtol=0, atol=1e-5,
    )


def test_prefix_cache_runs_prompt_once_and_image_block_per_step(pipe):
    lengths = []
    hook = pipe.model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        generate(pipe, steps=3, output_type="latent")
    finally:
        hook.remove()
    n_image = pipe.processor.num_image_tokens(16, 16)
    assert lengths[1:] == [n_image] * 3  # one prefix pass, then only the image block
    assert lengths[0] > 1


def test_batched_row_equals_the_prompt_run_alone(pipe, monkeypatch):
    """Left padding in a batch does not change a row: same positions, padding masked (DDIM: no sampling noise)."""
    monkeypatch.setattr(pipe, "scheduler", DDIMScheduler.from_config(pipe.scheduler.config))
    batched = pipe(PROMPTS, num_inference_steps=2, latents=torch.ones(2, 4, 8, 8), output_type="latent").images
    alone = pipe(PROMPTS[1], num_inference_steps=2, latents=torch.ones(1, 4, 8, 8), output_type="latent").images
    torch.testing.assert_close(batched[1:], alone, rtol=0, atol=1e-5)


def test_pipeline_uses_the_processors_own_special_tokens():
    """Checkpoints converted from the original release mark images with <|im_start|> / <|im_end|>."""
    tok = make_tokenizer()
    model = MonoFormerForConditionalGeneration.from_llm(
        tiny_llama(), tokenizer=tok, latent_channels=4, patch_size=2, vae_scale_factor=2, sample_size=8
    ).eval()
    processor = MonoFormerProcessor(MonoFormerImageProcessor(), tok, boi_token="<|im_start|>", eoi_token="<|im_end|>")
    model.resize_token_embeddings(len(tok))
    model.config.boi_token_id, model.config.eoi_token_id = processor.boi_token_id, processor.eoi_token_id
    pipe = MonoFormerPipeline(model=model, vae=tiny_vae(), scheduler=DDIMScheduler(), processor=processor)
    pipe.set_progress_bar_config(disable=True)
    ids, _, n_image = pipe.encode_prompt(PROMPTS, None, 1, True, 16, 16, "cpu")
    assert (ids[:, -n_image - 1] == processor.boi_token_id).all()
    cached = generate(pipe, output_type="latent")
    torch.testing.assert_close(cached, generate(pipe, output_type="latent", use_prefix_cache=False), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="prompt"):
        pipe("a <|im_start|> b", num_inference_steps=1)


# ----------------------------------------------------------------------------------------------------------------------
# Seeds, shapes, output types
# ----------------------------------------------------------------------------------------------------------------------
def test_same_seed_same_image_different_seed_different(pipe):
    a = generate(pipe, seed=0, output_type="np")
    b = generate(pipe, seed=0, output_type="np")
    c = generate(pipe, seed=1, output_type="np")
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_num_images_per_prompt_and_batched_prompts_give_right_shapes(pipe):
    out = pipe(PROMPTS, num_inference_steps=2, num_images_per_prompt=3, output_type="np")
    assert isinstance(out, ImagePipelineOutput)
    assert out.images.shape == (6, 16, 16, 3)
    assert 0.0 <= out.images.min() and out.images.max() <= 1.0
    images = pipe("a coat", height=32, width=16, num_inference_steps=2, num_images_per_prompt=2).images
    assert len(images) == 2 and all(isinstance(im, Image.Image) and im.size == (16, 32) for im in images)
    pt = pipe("a coat", num_inference_steps=1, output_type="pt", return_dict=False)[0]
    assert pt.shape == (1, 3, 16, 16)
    latent = pipe("a coat", num_inference_steps=1, output_type="latent").images
    assert latent.shape == (1, 4, 8, 8)
    # per-image generators: image k only depends on generator k
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    pair = pipe("a coat", num_inference_steps=2, num_images_per_prompt=2, generator=gens, output_type="latent").images
    single = pipe("a coat", num_inference_steps=2, generator=torch.Generator().manual_seed(6), output_type="latent")
    torch.testing.assert_close(pair[1:], single.images, rtol=0, atol=1e-5)


def test_callback_on_step_end_sees_and_replaces_latents(pipe):
    seen = []

    def callback(p, i, t, kwargs):
        seen.append((i, kwargs["latents"].shape))
        return {"latents": torch.zeros_like(kwargs["latents"])}

    out = pipe("a coat", num_inference_steps=3, callback_on_step_end=callback, output_type="latent").images
    assert [i for i, _ in seen] == [0, 1, 2] and seen[0][1] == (1, 4, 8, 8)
    assert pipe.num_timesteps == 3
    assert torch.count_nonzero(out) == 0


# ----------------------------------------------------------------------------------------------------------------------
# Schedulers
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheduler_cls", EPS_SCHEDULERS)
def test_every_epsilon_scheduler_runs_end_to_end_with_vae(pipe, scheduler_cls):
    pipe.scheduler = scheduler_cls.from_config(DDPMScheduler().config)
    try:
        images = generate(pipe, steps=3, output_type="np")
    finally:
        pipe.scheduler = DDPMScheduler()
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()
    assert images.std() > 0.0


@pytest.mark.parametrize("scheduler_cls", [DDIMScheduler, EulerDiscreteScheduler])
def test_v_prediction_model_runs_with_v_schedulers(scheduler_cls):
    pipe = make_pipe(scheduler_cls.from_config(DDPMScheduler().config, prediction_type="v_prediction"),
                     prediction_type="v_prediction")
    assert np.isfinite(generate(pipe, output_type="np")).all()


@pytest.mark.parametrize(
    "scheduler",
    [
        FlowMatchEulerDiscreteScheduler(),
        DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction"),
    ],
    ids=["flowmatch_euler", "dpm_flow_sigmas"],
)
def test_flow_model_runs_pixel_space_without_vae(scheduler):
    pipe = make_pipe(scheduler, pixel_space=True, prediction_type="flow")
    images = generate(pipe, output_type="np")
    assert images.shape == (2, 8, 8, 3) and np.isfinite(images).all()


def test_flow_model_receives_sigma_times_1000(monkeypatch):
    pipe = make_pipe(FlowMatchEulerDiscreteScheduler(), pixel_space=True, prediction_type="flow")
    seen = []
    forward = pipe.model.forward
    monkeypatch.setattr(pipe.model, "forward", lambda *a, **kw: seen.append(kw.get("timesteps")) or forward(*a, **kw))
    generate(pipe, prompt="a coat", steps=4, guidance_scale=1.0, output_type="latent")
    got = [float(t[0]) for t in seen if t is not None]
    np.testing.assert_allclose(got, (pipe.scheduler.sigmas[:-1] * 1000).tolist(), rtol=1e-6)


def test_grayscale_pixel_space_gives_mode_L_pil_images():
    pipe = make_pipe(pixel_space=True, num_channels=1, latent_channels=1)
    images = generate(pipe, prompt="a coat", num_images_per_prompt=2)
    assert [(im.mode, im.size) for im in images] == [("L", (8, 8))] * 2
    assert generate(pipe, prompt="a coat", output_type="np").shape == (1, 8, 8, 1)


def test_learned_sigma_variance_reaches_learned_range_scheduler_only(monkeypatch):
    pipe = make_pipe(DDPMScheduler(variance_type="learned_range"), learn_sigma=True)
    received = []

    def spy_on_step(scheduler):
        step = scheduler.step
        def spy(model_output, *args, **kwargs):
            received.append(model_output.shape[1])
            return step(model_output, *args, **kwargs)

        monkeypatch.setattr(scheduler, "step", spy)

    spy_on_step(pipe.scheduler)
    assert np.isfinite(generate(pipe, output_type="np")).all()
    pipe.scheduler = DDIMScheduler.from_config(DDPMScheduler().config)
    spy_on_step(pipe.scheduler)
    generate(pipe, output_type="np")
    assert received == [8, 8, 4, 4]  # 2 steps each: prediction + variance, then prediction only


def _oracle(x0, scheduler_config, prediction_type):
    """A 'model' that knows the clean latents: returns the exact target for whatever noisy input it gets."""
    alphas_cumprod = DDPMScheduler.from_config(scheduler_config).alphas_cumprod.double()

    def predict(context, latents, t, branches=1):
        x = torch.cat([latents] * branches).double()
        if prediction_type == "flow":
            sigma = float(t) / 1000
            return ((x - x0) / sigma).float()
        a = alphas_cumprod[int(round(float(t)))]
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        out = eps if prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
        return out.float()

    return predict


ORACLE_CASES = [(s, "epsilon") for s in EPS_SCHEDULERS] + [(s, "v_prediction") for s in EPS_SCHEDULERS] + [
    (FlowMatchEulerDiscreteScheduler, "flow"),
    (DPMSolverMultistepScheduler, "flow"),
]


@pytest.mark.parametrize("scheduler_cls, prediction_type", ORACLE_CASES)
def test_scheduler_conventions_land_on_x0_with_an_oracle_model(pipe, monkeypatch, scheduler_cls, prediction_type):
    """init_noise_sigma, scale_model_input (Euler), timestep scales (flow: sigma*1000) and guidance are wired so an
    exact predictor reaches the clean latents with every scheduler."""
    x0 = torch.linspace(-0.9, 0.9, 2 * 4 * 8 * 8, dtype=torch.float64).reshape(2, 4, 8, 8)
    if scheduler_cls is FlowMatchEulerDiscreteScheduler:
        scheduler = scheduler_cls()
    elif prediction_type == "flow":
        scheduler = scheduler_cls(use_flow_sigmas=True, prediction_type="flow_prediction")
    else:
        scheduler = scheduler_cls.from_config(
            DDPMScheduler().config, prediction_type=prediction_type, timestep_spacing="trailing"
        )
    monkeypatch.setattr(pipe, "scheduler", scheduler)
    monkeypatch.setattr(pipe.model.config, "prediction_type", prediction_type)
    monkeypatch.setattr(pipe, "predict", _oracle(torch.cat([x0, x0]), scheduler.config, prediction_type))
    out = generate(pipe, steps=4, output_type="latent")
    # DPM-Solver's flow timesteps are int(sigma * 1000): an oracle reading sigma back from t is off by < 1e-3.
    atol = 5e-3 if scheduler_cls is DPMSolverMultistepScheduler and prediction_type == "flow" else 1e-3
    torch.testing.assert_close(out.double(), x0, rtol=0, atol=atol)


# ----------------------------------------------------------------------------------------------------------------------
# Bad arguments: ValueError naming the argument, before any compute
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, scheduler, match",
    [
        (dict(guidance_scale=-1.0), None, "guidance_scale"),
        (dict(num_inference_steps=0), None, "num_inference_steps"),
        (dict(height=15), None, "height"),
        (dict(width=18), None, "width"),
        (dict(negative_prompt=["a bag"]), None, "negative_prompt"),
        (dict(num_images_per_prompt=0), None, "num_images_per_prompt"),
        (dict(output_type="jpeg"), None, "output_type"),
        (dict(latents=torch.randn(1, 4, 8, 8)), None, "latents"),
        (dict(prompt="a <image> here"), None, "prompt"),
        (dict(generator=[torch.manual_seed(0)]), None, "generator"),
        ({}, FlowMatchEulerDiscreteScheduler(), "scheduler"),
        ({}, DDPMScheduler(prediction_type="v_prediction"), "prediction_type"),
        ({}, DPMSolverMultistepScheduler(use_flow_sigmas=True), "scheduler"),
        ({}, DDPMScheduler(variance_type="learned_range"), "variance_type"),
        (dict(guidance_start=0.8, guidance_stop=0.2), None, "guidance_start"),
        (dict(guidance_stop=1.5), None, "guidance_stop"),
    ],
)
def test_bad_arguments_raise_before_any_compute(pipe, monkeypatch, kwargs, scheduler, match):
    if scheduler is not None:
        monkeypatch.setattr(pipe, "scheduler", scheduler)
    calls = []
    hook = pipe.model.register_forward_pre_hook(lambda *a: calls.append(1))
    call = dict(prompt=PROMPTS, num_inference_steps=2)
    call.update(kwargs)
    try:
        with pytest.raises(ValueError, match=match):
            pipe(**call)
    finally:
        hook.remove()
    assert calls == []


def test_non_flow_scheduler_with_flow_model_is_refused():
    pipe = make_pipe(DDPMScheduler(), pixel_space=True, prediction_type="flow")
    with pytest.raises(ValueError, match="flow"):
        pipe("a coat", num_inference_steps=2)


def test_vae_none_requires_pixel_space_model():
    pipe = make_pipe()
    with pytest.raises(ValueError, match="vae_scale_factor"):
        MonoFormerPipeline(model=pipe.model, vae=None, scheduler=DDPMScheduler(), processor=pipe.processor)


# ----------------------------------------------------------------------------------------------------------------------
# Self-contained save / push_to_hub, loaded in a fresh process without this package
# ----------------------------------------------------------------------------------------------------------------------
LOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["modeling_monoformer"] = None  # the package must not be importable
    import numpy as np, torch
    from diffusers import DiffusionPipeline

    folders, prompts, out = json.loads(sys.argv[1])
    report = {}
    for name, folder in folders.items():
        pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
        pipe.set_progress_bar_config(disable=True)
        sampler = {} if name == "tuned" else {"num_inference_steps": 2}  # "tuned": the saved sampler defaults
        images = pipe(prompts, generator=torch.manual_seed(0), output_type="np", **sampler).images
        np.save(f"{out}/{name}.npy", images)
        report[name] = [type(pipe).__module__, type(pipe.model).__module__, type(pipe.processor).__module__,
                        type(pipe.scheduler).__name__, type(pipe.guider).__name__, dict(pipe.guider.config),
                        pipe.config.default_num_inference_steps]
    print(json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def loaded_elsewhere(tmp_path_factory):
    """Save, push (upload patched to a local copy) and save-with-push one pipeline; load all three in one subprocess."""
    from huggingface_hub import ModelCard
    from diffusers.utils import hub_utils

    pipe = make_pipe(DPMSolverMultistepScheduler.from_config(DDPMScheduler().config))
    root = tmp_path_factory.mktemp("pipeline_io")
    hub = root / "hub"
    uploads = []

    def upload_folder(repo_id, folder_path, path_in_repo=None, **kwargs):
        uploads.append(repo_id)
        target = hub / repo_id / (path_in_repo or "")
        __import__("shutil").copytree(folder_path, target, dirs_exist_ok=True)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hub_utils, "create_repo", lambda repo_id, **kw: types.SimpleNamespace(repo_id=repo_id))
        mp.setattr(hub_utils, "upload_folder", upload_folder)
        mp.setattr(hub_utils, "load_or_create_model_card", lambda *a, **kw: ModelCard("---\n---\n# MonoFormer\n"))
        pipe.push_to_hub("user/monoformer-tiny")
        pipe.save_pretrained(root / "saved_and_pushed", push_to_hub=True, repo_id="user/monoformer-tiny-2")
    pipe.save_pretrained(root / "saved")
    pixel_pipe = make_pipe(pixel_space=True, num_channels=1, latent_channels=1)  # vae=None, grayscale
    pixel_pipe.save_pretrained(root / "pixel")
    tuned_guider = ClassifierFreeGuidance(guidance_scale=3.0, start=0.25, stop=0.75)
    tuned = MonoFormerPipeline(**{**pipe.components, "guider": tuned_guider}, default_num_inference_steps=4)
    tuned.set_progress_bar_config(disable=True)
    tuned.save_pretrained(root / "tuned")
    # a folder saved before guiders were components: no guider entry, no default step count
    __import__("shutil").copytree(root / "saved", root / "legacy")
    __import__("shutil").rmtree(root / "legacy" / "guider")
    index = json.loads((root / "legacy" / "model_index.json").read_text())
    del index["guider"], index["default_num_inference_steps"]
    (root / "legacy" / "model_index.json").write_text(json.dumps(index))

    expected = dict.fromkeys(("saved", "pushed", "save_pushed"), generate(pipe, output_type="np"))
    expected["pixel"] = generate(pixel_pipe, output_type="np")
    expected["legacy"] = expected["saved"]
    expected["tuned"] = generate(
        pipe, steps=4, guidance_scale=3.0, guidance_start=0.25, guidance_stop=0.75, output_type="np"
    )
    folders = {
        "saved": str(root / "saved"),
        "tuned": str(root / "tuned"),
        "legacy": str(root / "legacy"),
        "pixel": str(root / "pixel"),
        "pushed": str(hub / "user/monoformer-tiny"),
        "save_pushed": str(hub / "user/monoformer-tiny-2"),
    }
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(root / "hf_home"), HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    result = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, json.dumps([folders, PROMPTS, str(root)])],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    images = {name: np.load(root / f"{name}.npy") for name in folders}
    return dict(root=root, hub=hub, uploads=uploads, expected=expected, report=report, images=images)


def test_saved_folder_is_self_contained(loaded_elsewhere):
    saved = loaded_elsewhere["root"] / "saved"
    index = json.loads((saved / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_monoformer", "MonoFormerPipeline"]
    assert index["model"] == ["modeling_monoformer", "MonoFormerForConditionalGeneration"]
    assert index["processor"] == ["processing_monoformer", "MonoFormerProcessor"]
    assert index["scheduler"] == ["diffusers", "DPMSolverMultistepScheduler"]
    assert index["guider"] == ["diffusers", "ClassifierFreeGuidance"]
    assert index["default_num_inference_steps"] == 50
    for path in ["pipeline_monoformer.py", "scheduler_rules_monoformer.py", "model/modeling_monoformer.py",
                 "model/configuration_monoformer.py", "model/model.safetensors", "processor/processing_monoformer.py",
                 "processor/image_processing_monoformer.py", "vae/config.json", "scheduler/scheduler_config.json",
                 "guider/guider_config.json"]:
        assert (saved / path).is_file(), path


def test_fresh_process_remote_code_load_gives_the_same_image(loaded_elsewhere):
    modules = loaded_elsewhere["report"]["saved"]
    assert all(m.startswith("diffusers_modules") for m in modules[:3]), modules
    assert modules[3] == "DPMSolverMultistepScheduler"
    for name in ("saved", "pixel"):
        got, expected = loaded_elsewhere["images"][name], loaded_elsewhere["expected"][name]
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    assert loaded_elsewhere["images"]["pixel"].shape == (2, 8, 8, 1)


def test_push_to_hub_uploads_the_self_contained_folder(loaded_elsewhere):
    assert loaded_elsewhere["uploads"] == ["user/monoformer-tiny", "user/monoformer-tiny-2"]
    for name in ("pushed", "save_pushed"):
        assert all(m.startswith("diffusers_modules") for m in loaded_elsewhere["report"][name][:3])
        got, expected = loaded_elsewhere["images"][name], loaded_elsewhere["expected"][name]
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    assert (loaded_elsewhere["hub"] / "user/monoformer-tiny/README.md").is_file()


def test_guidance_channels_guides_only_the_first_channels(pipe, monkeypatch):
    """`guidance_channels=3` reproduces the original release's DiT quirk: channel 3 comes from the conditional branch."""
    seen = {}
    real = MonoFormerPipeline.apply_guidance

    def spy(self, model_output, guided=None):
        out = real(self, model_output, guided)
        seen["in"], seen["out"] = model_output.clone(), out.clone()
        return out

    monkeypatch.setattr(MonoFormerPipeline, "apply_guidance", spy)
    generate(pipe, prompt="a coat", steps=1, guidance_scale=4.0, guidance_channels=3, output_type="latent")
    uncond, cond = seen["in"][:, :4].chunk(2)
    expected = torch.cat([uncond[:, :3] + 4.0 * (cond[:, :3] - uncond[:, :3]), cond[:, 3:]], dim=1)
    torch.testing.assert_close(seen["out"], expected)
    with pytest.raises(ValueError, match="guidance_channels"):
        generate(pipe, prompt="a coat", steps=1, guidance_channels=5)


def _count_latent_rows(pipe, monkeypatch) -> list[int]:
    """Rows of every denoising call (model calls that carry latents)."""
    rows = []
    real = type(pipe.model).forward

    def spy(self, *args, **kwargs):
        if kwargs.get("latents") is not None:
            rows.append(len(kwargs["latents"]))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe.model), "forward", spy)
    return rows


@pytest.mark.parametrize("use_prefix_cache", [True, False])
def test_guidance_interval_guides_only_its_steps(pipe, monkeypatch, use_prefix_cache):
    """Steps outside [start, stop) run the conditional rows alone (1 evaluation per image instead of 2)."""
    kw = dict(prompt=PROMPTS, steps=4, guidance_scale=4.0, output_type="latent", use_prefix_cache=use_prefix_cache)
    full = generate(pipe, **kw)
    torch.testing.assert_close(generate(pipe, guidance_start=0.0, guidance_stop=1.0, **kw), full, rtol=0, atol=0)
    rows = _count_latent_rows(pipe, monkeypatch)
    partial = generate(pipe, guidance_start=0.25, guidance_stop=0.75, **kw)
    n = len(PROMPTS)
    assert rows == [n, 2 * n, 2 * n, n]  # steps 0 and 3 unguided
    assert (partial - full).abs().max() > 1e-4
    # no guided step at all = the conditional branch alone (guidance_scale 1), up to padding numerics
    rows.clear()
    none = generate(pipe, guidance_start=0.5, guidance_stop=0.5, **kw)
    assert rows == [n] * 4
    cond_only = generate(pipe, **{**kw, "guidance_scale": 1.0})
    torch.testing.assert_close(none, cond_only, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# Guidance as a diffusers guider component
# ----------------------------------------------------------------------------------------------------------------------
def test_saved_guider_and_step_count_are_the_call_defaults_in_a_fresh_process(loaded_elsewhere):
    """`pipe(prompt)` without sampler arguments runs the saved guider (scale, interval) and the saved step count."""
    _, _, _, _, guider_name, guider_config, steps = loaded_elsewhere["report"]["tuned"]
    assert guider_name == "ClassifierFreeGuidance" and steps == 4
    assert (guider_config["guidance_scale"], guider_config["start"], guider_config["stop"]) == (3.0, 0.25, 0.75)
    np.testing.assert_array_equal(loaded_elsewhere["images"]["tuned"], loaded_elsewhere["expected"]["tuned"])


def test_folder_saved_without_a_guider_loads_the_old_call_defaults(loaded_elsewhere):
    _, _, _, _, guider_name, guider_config, steps = loaded_elsewhere["report"]["legacy"]
    assert (guider_name, guider_config["guidance_scale"], guider_config["start"], steps) == (
        "ClassifierFreeGuidance", 4.0, 0.0, 50
    )
    np.testing.assert_allclose(loaded_elsewhere["images"]["legacy"], loaded_elsewhere["expected"]["legacy"], atol=1e-5)


@pytest.mark.parametrize("use_prefix_cache", [True, False])
def test_guider_interval_equals_the_guidance_start_stop_arguments(use_prefix_cache, monkeypatch):
    pipe = make_pipe()
    kw = dict(prompt=PROMPTS, steps=4, output_type="latent", use_prefix_cache=use_prefix_cache)
    by_kwargs = generate(pipe, guidance_scale=4.0, guidance_start=0.25, guidance_stop=0.75, **kw)
    pipe.guider = ClassifierFreeGuidance(guidance_scale=4.0, start=0.25, stop=0.75)
    rows = _count_latent_rows(pipe, monkeypatch)
    by_guider = generate(pipe, **kw)
    torch.testing.assert_close(by_guider, by_kwargs, rtol=0, atol=0)
    n = len(PROMPTS)
    assert rows == [n, 2 * n, 2 * n, n]  # the unguided steps still cost one evaluation per image


def test_guider_reproduces_the_hand_written_cfg_formula(monkeypatch):
    """The default guider is `uncond + s * (cond - uncond)` on every step, bit for bit."""
    pipe = make_pipe()
    outputs = []
    real_predict = MonoFormerPipeline.predict

    def spy(self, context, latents, t, branches=1):
        out = real_predict(self, context, latents, t, branches)
        outputs.append(out)
        return out

    steps = []
    real_step = pipe.scheduler.step
    monkeypatch.setattr(pipe.scheduler, "step", lambda out, *a, **k: steps.append(out) or real_step(out, *a, **k))
    monkeypatch.setattr(MonoFormerPipeline, "predict", spy)
    generate(pipe, steps=3, guidance_scale=2.5, output_type="latent")
    assert len(outputs) == len(steps) == 3
    for raw, guided in zip(outputs, steps):
        uncond, cond = raw.chunk(2)
        torch.testing.assert_close(guided, uncond + 2.5 * (cond - uncond), rtol=0, atol=0)


def test_explicit_arguments_override_the_guider_for_one_call_only():
    pipe = make_pipe()
    pipe.guider = ClassifierFreeGuidance(guidance_scale=4.0, start=0.25, stop=0.75)
    kw = dict(prompt=PROMPTS, steps=4, output_type="latent")
    overridden = generate(pipe, guidance_scale=2.0, **kw)
    assert pipe.guidance_scale == 2.0 and pipe.guider.guidance_scale == 4.0
    assert (pipe.guider.config.start, pipe.guider.config.stop) == (0.25, 0.75)
    pipe.guider = ClassifierFreeGuidance(guidance_scale=2.0, start=0.25, stop=0.75)
    torch.testing.assert_close(generate(pipe, **kw), overridden, rtol=0, atol=0)
    # guidance_scale <= 1 and an empty interval both turn guidance off, as before guiders
    off = generate(pipe, guidance_scale=1.0, **kw)
    torch.testing.assert_close(generate(pipe, guidance_start=0.5, guidance_stop=0.5, **kw), off, rtol=1e-4, atol=1e-5)


def test_a_callback_changes_the_guidance_scale_mid_call_as_in_diffusers():
    """diffusers' convention (`SDCFGCutoffCallback`, dynamic CFG): a callback writes `pipe._guidance_scale`; the next
    steps guide with it, <= 1 runs them unguided, and the saved guider component is never changed."""
    pipe = make_pipe()
    kw = dict(prompt=PROMPTS, steps=4, output_type="latent")

    def cut_after_two(p, i, t, callback_kwargs):
        if i == 1:
            p._guidance_scale = 0.0
        return callback_kwargs

    cut = generate(pipe, guidance_scale=3.0, callback_on_step_end=cut_after_two, **kw)
    assert pipe.guidance_scale == 0.0 and pipe.guider.guidance_scale == 4.0
    torch.testing.assert_close(cut, generate(pipe, guidance_scale=3.0, guidance_stop=0.5, **kw), rtol=1e-5, atol=1e-5)

    def one_more_each_step(p, i, t, callback_kwargs):
        p._guidance_scale = p.guidance_scale + 1
        return callback_kwargs

    rising = generate(pipe, guidance_scale=2.0, callback_on_step_end=one_more_each_step, **kw)
    assert pipe.guidance_scale == 2.0 + 4 and pipe.guider.guidance_scale == 4.0
    assert (rising - generate(pipe, guidance_scale=2.0, **kw)).abs().max() > 1e-4


def test_changes_made_to_the_guider_object_hold_for_the_call():
    pipe = make_pipe()
    kw = dict(prompt=PROMPTS, steps=2, output_type="latent")
    pipe.guider.guidance_scale = 7.0  # set on the object, not in its config
    torch.testing.assert_close(generate(pipe, **kw), generate(pipe, guidance_scale=7.0, **kw), rtol=0, atol=0)
    assert pipe.guidance_scale == 7.0
    pipe.guider.disable()
    torch.testing.assert_close(generate(pipe, **kw), generate(pipe, guidance_scale=1.0, **kw), rtol=0, atol=0)


def test_guider_set_to_none_guides_with_the_default_of_a_pipeline_built_without_one(tmp_path):
    pipe = make_pipe()  # built without a guider
    default = generate(pipe, steps=2, output_type="latent")
    pipe.guider = None  # an optional component
    torch.testing.assert_close(generate(pipe, steps=2, output_type="latent"), default, rtol=0, atol=0)
    pipe.save_pretrained(tmp_path)
    reloaded = MonoFormerPipeline.from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    torch.testing.assert_close(generate(reloaded, steps=2, output_type="latent"), default, rtol=0, atol=0)


@pytest.mark.parametrize(
    "guider",
    [
        AdaptiveProjectedGuidance(guidance_scale=4.0, adaptive_projected_guidance_momentum=-0.5),
        ClassifierFreeZeroStarGuidance(guidance_scale=4.0, start=0.25, stop=0.75),
        TangentialClassifierFreeGuidance(guidance_scale=4.0),
    ],
)
def test_other_two_prediction_guiders_swap_in_with_one_line(guider):
    pipe = make_pipe()
    cfg = generate(pipe, steps=4, guidance_scale=4.0, output_type="latent")
    pipe.guider = guider
    swapped = generate(pipe, steps=4, output_type="latent")
    assert torch.isfinite(swapped).all() and (swapped - cfg).abs().max() > 1e-4


@pytest.mark.parametrize(
    "guider",
    [
        PerturbedAttentionGuidance(perturbed_guidance_layers=[0]),
        AutoGuidance(auto_guidance_layers=[0], dropout=0.1),
        MagnitudeAwareGuidance(guidance_scale=4.0),  # two predictions, but its norm fails on (n, C, H, W) in diffusers
    ],
)
def test_guiders_the_pipeline_cannot_run_are_refused_before_sampling(guider):
    pipe = make_pipe()
    with pytest.raises(TypeError, match="guider"):
        pipe.guider = guider
        pipe("a coat", num_inference_steps=1)
    with pytest.raises(TypeError, match="guider"):
        MonoFormerPipeline(**{**pipe.components, "guider": guider})


# ----------------------------------------------------------------------------------------------------------------------
# bfloat16
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("patch_embedder", ["linear", "unet"])
def test_bf16_sampling_runs_finite_and_near_fp32(patch_embedder):
    from modeling_monoformer import bf16_supported, preferred_dtype, resolve_dtype

    pipe = make_pipe(
        DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction"), pixel_space=True,
        num_channels=1, latent_channels=1, prediction_type="flow", patch_size=4, patch_embedder=patch_embedder,
        unet_block_channels=[8, 16],
    )
    kw = dict(steps=4, guidance_scale=3.0, guidance_start=0.25, guidance_stop=0.75, output_type="pt")
    ref = generate(pipe, **kw)
    pipe.to(torch.bfloat16)
    out = generate(pipe, **kw)
    assert pipe.model.dtype == torch.bfloat16 and out.dtype == torch.float32  # postprocessed in fp32
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() < 0.1  # images in [0, 1]; bf16 keeps ~3 significant digits
    assert preferred_dtype("cpu") == (torch.bfloat16 if bf16_supported("cpu") else torch.float32)
    assert resolve_dtype("float32") == torch.float32 and resolve_dtype("auto") == preferred_dtype()
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("fp8")
