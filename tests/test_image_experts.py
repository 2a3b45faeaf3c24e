"""Image experts (`image_experts="full"`, LMFusion) and image-only LoRA (`"lora"`, Partial LoRA): routing exactness,
frozen text, FLOPs, cache, checkpointing, save/load, merge, errors."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from diffusers import DDPMScheduler
from torch.utils.flop_counter import FlopCounterMode

from modeling_monoformer import (
    MonoFormerForConditionalGeneration,
    MonoFormerImageProcessor,
    MonoFormerPipeline,
    MonoFormerProcessor,
    add_training_noise,
    enable_image_experts,
    freeze_text_weights,
    merge_image_lora,
)
from modeling_monoformer.image_experts_monoformer import is_image_expert_parameter
from tests.conftest import make_tokenizer, tiny_llama, tiny_qwen2


def tiny_mistral(vocab_size: int = 300, seed: int = 0):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    return MistralForCausalLM(MistralConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, sliding_window=16,
    )).eval()


FAMILIES = {"llama": tiny_llama, "qwen2": tiny_qwen2, "mistral": tiny_mistral}


def wrap(llm, **overrides):
    defaults = dict(latent_channels=4, patch_size=2)
    defaults.update(overrides)
    return MonoFormerForConditionalGeneration.from_llm(llm, **defaults).eval()


def image_batch(config, seed=0, h=4, w=4):
    """Two rows: caption, image, caption continuation (right-padded), with labels and a diffusion target."""
    n = config.num_image_tokens(h, w)
    img = [config.boi_token_id] + [config.image_token_id] * n + [config.eoi_token_id]
    rows = [[5, 6, 7] + img + [8, 9], [10, 11] + img + [12, 0, 0]]
    ids = torch.tensor(rows)
    mask = (ids != 0).long()
    mask[1, -2:] = 0
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(2, config.latent_channels, h, w, generator=g)
    sched = DDPMScheduler()
    latents, t, target = add_training_noise(sched, x0, config.prediction_type, generator=g)
    labels = ids.masked_fill(mask == 0, -100)
    return dict(input_ids=ids, attention_mask=mask, latents=latents, timesteps=t, labels=labels,
                diffusion_target=target)


def text_params(model):
    return {n: p for n, p in model.named_parameters() if n.startswith(("model.language_model.", "lm_head"))
            and not is_image_expert_parameter(n)}


# ----------------------------------------------------------------------------------------------------------------------
# Text stays the LLM's, bit for bit, through training
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_text_only_output_equals_base_llm_after_training_on_images(family, mode):
    llm = FAMILIES[family]()
    model = wrap(llm, image_experts=mode, image_lora_rank=4)
    trainable = freeze_text_weights(model)
    assert trainable and all(not n.startswith("lm_head") for n in trainable)
    before = {n: p.detach().clone() for n, p in text_params(model).items()}
    experts_before = {n: p.detach().clone() for n, p in model.named_parameters() if is_image_expert_parameter(n)}
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        out = model(**image_batch(model.config, seed=step))
        out.loss.backward()
        for name, p in text_params(model).items():
            assert p.grad is None, name  # text weights get no gradient at all
        opt.step()
        opt.zero_grad()
    model.eval()
    for name, p in text_params(model).items():
        assert torch.equal(p, before[name]), name
    moved = [n for n, p in model.named_parameters() if n in experts_before and not torch.equal(p, experts_before[n])]
    assert len(moved) == len(experts_before)  # every image weight trained (LoRA: A and B both)

    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [3, 4, 12, 13, 14, 15, 16]])
    rows = llm.get_output_embeddings().weight.shape[0]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits[..., :rows], llm(input_ids=ids).logits)
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **gen), llm.generate(ids, **gen))


def test_image_tokens_reach_only_image_weights_and_flops_stay_the_llms(llama):
    model = wrap(llama, image_experts="full")
    cfg = model.config
    n = cfg.num_image_tokens(4, 4)
    # A sequence of patch tokens only: every text projection and norm of the body stays out of the graph.
    only_image = dict(input_ids=torch.full((1, n), cfg.image_token_id), latents=torch.randn(1, 4, 4, 4),
                      timesteps=torch.tensor([500]))
    model.train()
    model(**only_image).diffusion_output.square().mean().backward()
    body = dict(model.model.language_model.named_parameters())
    for name, p in body.items():
        if name.startswith("layers."):
            assert (p.grad is not None) == is_image_expert_parameter(name), name
    model.zero_grad()
    model.eval()
    # Mixed sequence: each token runs through one set of weights, so the FLOPs are exactly those without experts.
    batch = image_batch(cfg)
    batch = {k: batch[k] for k in ("input_ids", "attention_mask", "latents", "timesteps")}
    plain = wrap(tiny_llama())
    flops = []
    for m in (plain, model):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            m(**batch)
        flops.append(counter.get_total_flops())
    assert flops[0] == flops[1] > 0


def test_routing_equals_per_token_reference(llama):
    """Fresh "full" experts are copies: the routed model equals the plain one; changing the image weights changes the
    image tokens and whatever reads them, never the text before the image."""
    plain = wrap(tiny_llama())
    model = wrap(llama, image_experts="full")
    model.load_state_dict(plain.state_dict(), strict=False)
    batch = image_batch(model.config)
    batch = {k: batch[k] for k in ("input_ids", "attention_mask", "latents", "timesteps")}
    with torch.no_grad():
        ref, got = plain(**batch), model(**batch)
        assert torch.allclose(ref.diffusion_output, got.diffusion_output, atol=1e-5)
        assert torch.allclose(ref.logits, got.logits, atol=1e-5)
        for name, p in model.named_parameters():
            if is_image_expert_parameter(name):
                p.add_(0.05 * torch.randn_like(p))
        changed = model(**batch)
    assert (changed.diffusion_output - ref.diffusion_output).abs().max() > 1e-3
    assert torch.allclose(changed.logits[:, :2], ref.logits[:, :2], atol=1e-5)  # text before the image
    assert (changed.logits[0, -1] - ref.logits[0, -1]).abs().max() > 1e-4  # text after it reads the image


def test_timestep_token_and_special_tokens_take_the_text_path(llama):
    from modeling_monoformer.image_experts_monoformer import ImageTokenRouting

    model = wrap(llama, image_experts="full", timestep_conditioning="token")
    seen = []
    layer = model.model.language_model.layers[0]
    layer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("image_routing")), with_kwargs=True)
    cfg = model.config
    n = cfg.num_image_tokens(4, 4)  # 4 patches + the timestep token
    ids = torch.tensor([[5, cfg.boi_token_id] + [cfg.image_token_id] * n + [cfg.eoi_token_id]])
    with torch.no_grad():
        model(input_ids=ids, latents=torch.randn(1, 4, 4, 4), timesteps=torch.tensor([10]))
    routing = seen[0]
    assert isinstance(routing, ImageTokenRouting)
    assert routing.image_index.tolist() == [3, 4, 5, 6]  # the patches; <boi> at 1, timestep token at 2, <eoi> at 7


# ----------------------------------------------------------------------------------------------------------------------
# Works with generate, the prefix cache, attention kernels, gradient checkpointing
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_generate_with_image_in_prompt_matches_full_recompute(llama, mode):
    model = wrap(llama, image_experts=mode)
    with torch.no_grad():
        for name, p in model.named_parameters():  # trained-looking experts, so a wrong route shows
            if is_image_expert_parameter(name):
                p.add_(0.05 * torch.randn_like(p))
    cfg = model.config
    n = cfg.num_image_tokens(4, 4)
    ids = torch.tensor([[5, 6, cfg.boi_token_id] + [cfg.image_token_id] * n + [cfg.eoi_token_id, 7]])
    lat = torch.randn(1, 4, 4, 4)
    out = model.generate(ids, latents=lat, max_new_tokens=6, do_sample=False, pad_token_id=0)
    seq = ids
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, model(input_ids=seq, latents=lat).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("timestep_conditioning", ["adaln", "token"])
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_prefix_cached_sampling_equals_naive_with_experts(mode, timestep_conditioning):
    tok = make_tokenizer()
    model = MonoFormerForConditionalGeneration.from_llm(
        tiny_llama(), tokenizer=tok, latent_channels=3, patch_size=2, vae_scale_factor=1, sample_size=8,
        image_experts=mode, timestep_conditioning=timestep_conditioning,
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_image_expert_parameter(name):
                p.add_(0.05 * torch.randn_like(p))
    pipe = MonoFormerPipeline(model=model, vae=None, scheduler=DDPMScheduler(),
                              processor=MonoFormerProcessor(MonoFormerImageProcessor(num_channels=3), tok))
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=3, output_type="latent", guidance_scale=3.0)
    cached = pipe(["a dress", "a coat"], generator=torch.manual_seed(0), use_prefix_cache=True, **kwargs).images
    naive = pipe(["a dress", "a coat"], generator=torch.manual_seed(0), use_prefix_cache=False, **kwargs).images
    torch.testing.assert_close(cached, naive, rtol=0, atol=1e-5)


def test_cached_denoising_block_runs_image_weights_only(monkeypatch):
    tok = make_tokenizer()
    model = MonoFormerForConditionalGeneration.from_llm(
        tiny_llama(), tokenizer=tok, latent_channels=3, patch_size=2, vae_scale_factor=1, sample_size=8,
        image_experts="full",
    ).eval()
    q = model.model.language_model.layers[0].self_attn.q_proj
    text_rows, image_rows = [], []
    q.image.register_forward_hook(lambda m, args, out: image_rows.append(args[0].shape[:-1].numel()))
    linear_forward = torch.nn.Linear.forward

    def spy(self, x):  # the routed q_proj's text path is nn.Linear.forward on the routed module itself
        if self is q:
            text_rows.append(x.shape[:-1].numel())
        return linear_forward(self, x)

    monkeypatch.setattr(torch.nn.Linear, "forward", spy)
    pipe = MonoFormerPipeline(model=model, vae=None, scheduler=DDPMScheduler(),
                              processor=MonoFormerProcessor(MonoFormerImageProcessor(num_channels=3), tok))
    pipe.set_progress_bar_config(disable=True)
    pipe("a dress", num_inference_steps=3, output_type="latent", guidance_scale=1.0, generator=torch.manual_seed(0))
    # the prompt once through the text weights; each of the 3 steps sends the 16 patch tokens to the image weights only
    assert len(text_rows) == 1 and image_rows == [16, 16, 16]


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_sdpa_eager_flex_agree_with_experts(llama, mode):
    model = wrap(llama, image_experts=mode)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_image_expert_parameter(name):
                p.add_(0.05 * torch.randn_like(p))
    batch = image_batch(model.config)
    batch = {k: batch[k] for k in ("input_ids", "attention_mask", "latents", "timesteps")}
    results = {}
    for impl in ("sdpa", "eager", "flex_attention"):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            results[impl] = model(**batch)
    valid = batch["attention_mask"].bool()
    for impl in ("eager", "flex_attention"):
        assert torch.allclose(results["sdpa"].diffusion_output, results[impl].diffusion_output, atol=1e-5), impl
        assert torch.allclose(results["sdpa"].logits[valid], results[impl].logits[valid], atol=1e-4), impl


def test_gradient_checkpointing_gives_the_same_gradients(llama):
    model = wrap(llama, image_experts="full")
    freeze_text_weights(model)
    batch = image_batch(model.config)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.activation_checkpointing_enable()
        model.train()
        model.zero_grad()
        model(**batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(is_image_expert_parameter(n) for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0, atol=1e-6, msg=name)


def test_packed_rows_equal_separate_rows_with_experts(llama):
    from modeling_monoformer.packing_monoformer import pack_batch

    model = wrap(llama, image_experts="full")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_image_expert_parameter(name):
                p.add_(0.05 * torch.randn_like(p))
    batch = image_batch(model.config)
    batch = {k: batch[k] for k in ("input_ids", "attention_mask", "latents", "timesteps")}
    packed = pack_batch(batch, max_length=2 * batch["input_ids"].shape[1])
    assert packed["input_ids"].shape[0] == 1
    with torch.no_grad():
        a = model(**batch).diffusion_output
        b = model(**packed).diffusion_output
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# Save / load, merge, starting experts from an existing checkpoint
# ----------------------------------------------------------------------------------------------------------------------
FRESH_LOAD = textwrap.dedent(
    """
    import sys
    sys.modules["modeling_monoformer"] = None  # the package must not be importable
    import torch
    from transformers import AutoModelForCausalLM
    path, inputs = sys.argv[1], torch.load(sys.argv[2], weights_only=True)
    model, info = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, output_loading_info=True)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert type(model.model.language_model.layers[0]).__name__.startswith("ImageRouted")
    with torch.no_grad():
        out = model.eval()(**inputs)
        text = model(input_ids=inputs["input_ids"][:, :2]).logits
    torch.save({"logits": out.logits, "diffusion_output": out.diffusion_output, "text": text}, sys.argv[3])
    """
)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_save_and_load_in_fresh_process_without_package(mode, tmp_path):
    model = wrap(tiny_qwen2(), image_experts=mode, image_lora_rank=4, timestep_conditioning="token")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_image_expert_parameter(name):
                p.add_(0.05 * torch.randn_like(p))
    batch = image_batch(model.config)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "latents", "timesteps")}
    model.save_pretrained(tmp_path / "ckpt")
    assert "image_experts_monoformer.py" in os.listdir(tmp_path / "ckpt")
    torch.save(inputs, tmp_path / "inputs.pt")
    (tmp_path / "load.py").write_text(FRESH_LOAD)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    subprocess.run([sys.executable, str(tmp_path / "load.py"), str(tmp_path / "ckpt"), str(tmp_path / "inputs.pt"),
                    str(tmp_path / "out.pt")], check=True, cwd=tmp_path, env=env, timeout=300)
    res = torch.load(tmp_path / "out.pt", weights_only=True)
    with torch.no_grad():
        ref = model(**inputs)
        text = model(input_ids=inputs["input_ids"][:, :2]).logits
    assert (res["logits"] - ref.logits).abs().max() <= 1e-6
    assert (res["diffusion_output"] - ref.diffusion_output).abs().max() <= 1e-6
    assert (res["text"] - text).abs().max() <= 1e-6


def test_lora_experts_save_load_and_merge_into_full(llama, tmp_path):
    model = wrap(llama, image_experts="lora", image_lora_rank=4, image_lora_alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "image_lora_B" in name:
                p.normal_(0, 0.05)  # a trained-looking adapter (B starts at zero)
    batch = image_batch(model.config)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "latents", "timesteps")}
    model.save_pretrained(tmp_path / "lora")
    loaded, info = MonoFormerForConditionalGeneration.from_pretrained(tmp_path / "lora", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert loaded.config.image_experts == "lora" and loaded.config.image_lora_rank == 4
    with torch.no_grad():
        ref = model(**inputs)
        assert (loaded.eval()(**inputs).diffusion_output - ref.diffusion_output).abs().max() <= 1e-6
    lora_keys = [k for k in model.state_dict() if "image_lora_" in k]
    assert len(lora_keys) == 2 * 7 * 2  # A and B of q/k/v/o/gate/up/down in 2 layers

    merged = merge_image_lora(loaded)
    assert merged.config.image_experts == "full" and not any("image_lora_" in k for k in merged.state_dict())
    with torch.no_grad():
        out = merged(**inputs)
    torch.testing.assert_close(out.diffusion_output, ref.diffusion_output, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    again, info = MonoFormerForConditionalGeneration.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        assert (again.eval()(**inputs).diffusion_output - out.diffusion_output).abs().max() <= 1e-6


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_enable_image_experts_on_a_saved_checkpoint_starts_from_its_text_weights(llama, tmp_path, mode):
    plain = wrap(llama)
    plain.save_pretrained(tmp_path)
    model = enable_image_experts(MonoFormerForConditionalGeneration.from_pretrained(tmp_path).eval(), mode)
    assert model.config.image_experts == mode
    batch = image_batch(model.config)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "latents", "timesteps")}
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).diffusion_output, plain(**inputs).diffusion_output,
                                   rtol=0, atol=1e-5)


def test_plain_peft_lora_still_works_on_a_plain_model(llama):
    from peft import LoraConfig, get_peft_model

    model = wrap(llama)
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["final_layer"]))
    batch = image_batch(model.config)
    pm.train()
    pm(**batch).loss.backward()
    assert any(p.grad is not None for n, p in pm.named_parameters() if "lora_" in n)


# ----------------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------------
def test_config_rejects_unknown_expert_mode_and_bad_rank():
    from huggingface_hub.errors import StrictDataclassError

    from modeling_monoformer import MonoFormerConfig

    with pytest.raises(StrictDataclassError, match="image_experts"):
        MonoFormerConfig(image_experts="moe")
    with pytest.raises(StrictDataclassError, match="image_lora_rank"):
        MonoFormerConfig(image_experts="lora", image_lora_rank=0)


def test_body_without_the_expected_projections_is_refused_by_class_name():
    from transformers import Phi3Config, Phi3ForCausalLM

    llm = Phi3ForCausalLM(Phi3Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)).eval()
    with pytest.raises(ValueError, match="Phi3DecoderLayer lacks: self_attn.q_proj"):
        wrap(llm, image_experts="full")
    wrap(llm)  # "none" keeps working for it


def test_training_script_refuses_plain_lora_with_experts():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train_text_to_image.py"
    spec = importlib.util.spec_from_file_location("train_text_to_image_experts", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit):
        script.parse_args(["--pretrained_model_name_or_path", "x", "--train_data_dir", "y", "--output_dir", "z",
                           "--image_experts", "full", "--lora_rank", "4"])


# ----------------------------------------------------------------------------------------------------------------------
# The fine-tuning script: image weights only, one process = two DDP processes (gloo on CPU)
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_script_trains_only_image_weights_and_two_processes_match_one(tmp_path, fresh_accelerate_state):
    import json

    from safetensors.torch import load_file

    from tests import test_finetune as ft

    base = ft.make_base(tmp_path / "base", latent=False)
    images = ft.make_imagefolder(tmp_path / "images", n=8)
    rows = [json.loads(line) for line in (images / "metadata.jsonl").read_text().splitlines()]
    (images / "metadata.jsonl").write_text("".join(json.dumps({**r, "text": "a small shape"}) + "\n" for r in rows))
    assets = {"pixel": base, "images": images}
    extra = ("--cfg_dropout", "0", "--image_experts", "full")
    single = ft.train.main(ft.script_args(assets, tmp_path / "single", *extra, steps=3))
    args = ft.script_args(assets, tmp_path / "multi", *extra, steps=3)
    args[args.index("--train_batch_size") + 1] = "2"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ft.REPO)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(ft.free_port()), str(ft.SCRIPT), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    multi = json.loads((tmp_path / "multi" / "loss_history.json").read_text())
    for s, m in zip(single["history"], multi, strict=True):
        for key in ("loss", "diffusion_loss"):
            assert m[key] == pytest.approx(s[key], rel=1e-4), (key, s, m)

    before = load_file(base / "model.safetensors")
    for run in ("single", "multi"):
        after = load_file(tmp_path / run / "pipeline" / "model" / "model.safetensors")
        config = json.loads((tmp_path / run / "pipeline" / "model" / "config.json").read_text())
        assert config["image_experts"] == "full"
        for name, tensor in before.items():
            if name.startswith(("model.language_model.", "lm_head")):
                assert torch.equal(after[name], tensor), (run, name)  # the LLM's text weights, bit for bit
        image_keys = [k for k in after if is_image_expert_parameter(k)]
        text_of = {k: k.replace(".image.", ".") for k in image_keys}
        assert image_keys and all(not torch.equal(after[k], after[text_of[k]]) for k in image_keys), run


def test_script_refuses_text_only_samples_with_experts(tmp_path, fresh_accelerate_state):
    from tests import test_finetune as ft

    base = ft.make_base(tmp_path / "base", latent=False)
    assets = {"pixel": base, "images": ft.make_imagefolder(tmp_path / "images", n=4)}
    text = tmp_path / "text.txt"
    text.write_text("It is a truth universally acknowledged.\n")
    with pytest.raises(ValueError, match="--text_ratio"):
        ft.train.main(ft.script_args(assets, tmp_path / "out", "--image_experts", "lora", "--text_data_file", text,
                                     "--text_ratio", "0.2", steps=1))


FSDP_STEP = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist
    sys.path.insert(0, sys.argv[1])
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from modeling_monoformer import MonoFormerForConditionalGeneration, freeze_text_weights
    from modeling_monoformer.image_experts_monoformer import is_image_expert_parameter
    from tests.conftest import tiny_llama
    from tests.test_image_experts import image_batch

    dist.init_process_group("gloo")
    torch.manual_seed(0)

    def build():
        model = MonoFormerForConditionalGeneration.from_llm(tiny_llama(), image_experts="full")
        freeze_text_weights(model)
        return model, type(model.model.language_model.layers[0])

    def local(p):
        return (p.to_local() if hasattr(p, "to_local") else p).detach().clone()

    results = {}
    model, layer_cls = build()
    try:  # FSDP1 refuses a unit that mixes frozen and trainable parameters without use_orig_params
        FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({layer_cls}), use_orig_params=False,
                                 device_id=torch.device("cpu"))
        results["fsdp1_flat_refused"] = False
    except ValueError as err:
        results["fsdp1_flat_refused"] = "requires_grad" in str(err)
    for kind in ("fsdp1_orig_params", "fsdp2"):
        model, layer_cls = build()
        if kind == "fsdp2":
            for layer in model.model.language_model.layers:
                fully_shard(layer)
            wrapped = fully_shard(model)
        else:
            wrapped = FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({layer_cls}),
                                               use_orig_params=True, device_id=torch.device("cpu"))
        named = [(n.replace("_fsdp_wrapped_module.", ""), p) for n, p in wrapped.named_parameters()]
        before = {n: local(p) for n, p in named}
        opt = torch.optim.AdamW([p for _, p in named if p.requires_grad], lr=1e-2)
        wrapped.train()
        wrapped(**image_batch(model.config, seed=dist.get_rank())).loss.backward()
        opt.step()
        text_same = all(torch.equal(local(p), before[n]) for n, p in named if not p.requires_grad)
        moved = sum(int(not torch.equal(local(p), before[n])) for n, p in named if is_image_expert_parameter(n))
        flags = torch.tensor([float(text_same), float(moved)])
        dist.all_reduce(flags)
        results[kind] = (flags[0].item() == dist.get_world_size(), flags[1].item() > 0)
    if dist.get_rank() == 0:
        print("RESULTS", results)
    dist.destroy_process_group()
    """
)


# slow until a rank's intermittent SIGABRT under 2-process gloo FSDP (1 of 3 clean CI runs, 0 of 3 alone) is found.
@pytest.mark.slow
def test_fsdp1_with_orig_params_and_fsdp2_train_image_weights_only_on_two_cpu_processes(tmp_path):
    from tests import test_finetune as ft

    script = tmp_path / "fsdp_step.py"
    script.write_text(FSDP_STEP)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(ft.free_port()), str(script), str(ft.REPO)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ft.REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULTS"))
    assert line == ("RESULTS {'fsdp1_flat_refused': True, 'fsdp1_orig_params': (True, True), "
                    "'fsdp2': (True, True)}"), line


def test_fashion_mnist_export_is_an_imagefolder_with_exactly_the_demos_captions(tmp_path):
    import json
    import pathlib

    import numpy as np
    from PIL import Image

    from modeling_monoformer.training_data_monoformer import load_image_caption_records

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
    import train_fashion_mnist as recipe

    result = recipe.main(["--export_data", str(tmp_path), "--output_dir", str(tmp_path), "--subset", "40",
                          "--text_fraction", "0"])
    assert result["num_images"] == 40 and "text_data_file" not in result
    records = load_image_caption_records(result["train_data_dir"])
    allowed = {t.format(n) for t in recipe.CAPTION_TEMPLATES for n in recipe.CLASS_NAMES}
    assert len(records) == 40 and {r["text"] for r in records} <= allowed
    assert len({r["text"] for r in records}) > 4  # drawn templates and classes, not one caption
    images, labels = recipe.load_fashion_mnist("train")
    rows = [json.loads(line) for line in (tmp_path / "images" / "metadata.jsonl").read_text().splitlines()]
    for i in (0, 17, 39):
        assert recipe.CLASS_NAMES[rows[i]["label"]] in rows[i]["text"] and rows[i]["label"] == int(labels[i])
        pixels = np.asarray(Image.open(tmp_path / "images" / rows[i]["file_name"]))
        expected = images[i, 0].add(1).mul(127.5).round().to(torch.uint8).numpy()
        assert pixels.shape == (28, 28) and np.array_equal(pixels, expected)
