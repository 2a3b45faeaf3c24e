"""Fine-tuning: Trainer unchanged, LoRA round trips, exact resume, multi-process, push to the Hub, bad input."""

import importlib.util
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler
from PIL import Image
from safetensors.torch import load_file

from modeling_monoformer import (
    MonoFormerDataCollator,
    MonoFormerForConditionalGeneration,
    MonoFormerImageProcessor,
    MonoFormerProcessor,
    add_lora,
    build_lora_config,
    default_noise_scheduler,
)
from modeling_monoformer.training_data_monoformer import (
    MonoFormerTrainingDataset,
    encode_images,
    load_image_caption_records,
)
from tests.conftest import make_tokenizer, tiny_llama

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "train_text_to_image.py"
COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "white": (240, 240, 240)}


def load_script():
    spec = importlib.util.spec_from_file_location("train_text_to_image", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train = load_script()


# ----------------------------------------------------------------------------------------------------------------------
# Tiny on-disk data and base checkpoints
# ----------------------------------------------------------------------------------------------------------------------
def make_imagefolder(folder: pathlib.Path, n: int = 8, size: int = 16) -> pathlib.Path:
    """n real PNGs (a coloured square or bar on black) with captions in metadata.jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        name = list(COLORS)[i % len(COLORS)]
        shape = "square" if i % 2 == 0 else "bar"
        img = Image.new("RGB", (size, size))
        box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4) if shape == "square" else (0, 3 * size // 8, size, 5 * size // 8)
        img.paste(COLORS[name], box)
        img.save(folder / f"{i:03d}.png")
        rows.append({"file_name": f"{i:03d}.png", "text": f"a {name} {shape}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def make_base(folder: pathlib.Path, latent: bool) -> pathlib.Path:
    """A MonoFormer checkpoint folder like the conversion script writes (model + processor + scheduler/); `latent`
    adds a tiny random AutoencoderKL (factor 2, 4 channels) in `<folder>-vae`, else pixel space (3 channels)."""
    tok = make_tokenizer()
    llm = tiny_llama(vocab_size=len(tok))
    overrides = dict(latent_channels=4, vae_scale_factor=2) if latent else dict(latent_channels=3, vae_scale_factor=1)
    model = MonoFormerForConditionalGeneration.from_llm(llm, tokenizer=tok, patch_size=2, sample_size=8, **overrides)
    model.save_pretrained(folder)
    MonoFormerProcessor(MonoFormerImageProcessor(), tok).configure_for_model(model.config).save_pretrained(folder)
    cfg = model.config
    scheduler = default_noise_scheduler(cfg.prediction_type, cfg.num_train_timesteps, cfg.learn_sigma)
    scheduler.save_pretrained(folder / "scheduler")
    if latent:
        torch.manual_seed(0)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 32), layers_per_block=1,
            latent_channels=4, norm_num_groups=32, sample_size=16,
        )
        vae.save_pretrained(f"{folder}-vae")
    return folder


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    return {
        "pixel": make_base(root / "base-pixel", latent=False),
        "latent": make_base(root / "base-latent", latent=True),
        "vae": root / "base-latent-vae",
        "images": make_imagefolder(root / "images"),
    }


@pytest.fixture(autouse=True)
def fresh_accelerate_state_one_thread():
    """Each script run builds its own Accelerator; one torch thread (tiny matmuls on a shared 2-core CI box run
    several times faster than with two competing threads)."""
    from accelerate.state import AcceleratorState, GradientState

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def script_args(assets, out, *extra, latent=False, steps=4):
    args = [
        "--pretrained_model_name_or_path", str(assets["latent" if latent else "pixel"]),
        "--train_data_dir", str(assets["images"]), "--output_dir", str(out),
        "--train_batch_size", "4", "--max_train_steps", str(steps), "--learning_rate", "3e-3",
        "--validation_steps", "0", "--num_inference_steps", "2", "--logging_steps", "0",
        "--checkpointing_steps", "0", "--seed", "0",
    ]
    if latent:
        args += ["--vae", str(assets["vae"])]
    return args + [str(e) for e in extra]


def tiny_inputs(config, processor):
    """A text batch and an image batch to compare models on."""
    text = processor(text=["a red square", "the quick brown fox"], padding_side="left")
    n = config.num_image_tokens(8, 8)
    ids = torch.tensor([[5, 6, config.boi_token_id] + [config.image_token_id] * n + [config.eoi_token_id]])
    image = dict(input_ids=ids, latents=torch.randn(1, config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(1)),
                 timesteps=torch.tensor([400]))
    return text, image


@torch.no_grad()
def outputs(model, text, image):
    model.eval()
    return model(**text).logits, model(**image).diffusion_output


# ----------------------------------------------------------------------------------------------------------------------
# Trainer trains the model unchanged
# ----------------------------------------------------------------------------------------------------------------------
def test_trainer_trains_unchanged_and_loss_falls(assets, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = MonoFormerForConditionalGeneration.from_pretrained(assets["pixel"])
    processor = MonoFormerProcessor.from_pretrained(assets["pixel"]).configure_for_model(model.config)
    records = load_image_caption_records(train_data_dir=str(assets["images"]))
    latents = encode_images(records, MonoFormerImageProcessor(num_channels=3), model.config, cache_dir=str(tmp_path))
    dataset = MonoFormerTrainingDataset([r["text"] for r in records], latents, seed=0)
    collator = MonoFormerDataCollator(processor, default_noise_scheduler("epsilon"), "epsilon",
                                      cfg_dropout=0.1, seed=0)
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=40, per_device_train_batch_size=8, learning_rate=3e-3,
        lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True, seed=0,
        remove_unused_columns=False,  # the collator reads "text"/"task"/"seed", which forward() does not take
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 40 and all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"Trainer loss {first:.3f} -> {last:.3f}")
    assert last < 0.5 * first, (first, last)
    # the cached latents are reused, not re-encoded
    assert len(list(tmp_path.glob("latents-*.safetensors"))) == 1


# ----------------------------------------------------------------------------------------------------------------------
# LoRA: adapter and merged round trips
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("conditioning", "patch_embedder", "tied"), [("adaln", "linear", False),
                                                                      ("token", "unet", True), ("add", "linear", True)])
def test_lora_config_adapts_the_llm_and_trains_the_image_heads_and_boi_eoi_rows(conditioning, patch_embedder, tied):
    tok = make_tokenizer()
    extra = dict(patch_size=4, unet_block_channels=[8, 16]) if patch_embedder == "unet" else {}
    model = MonoFormerForConditionalGeneration.from_llm(
        tiny_llama(vocab_size=len(tok), tie_word_embeddings=tied), tokenizer=tok, latent_channels=1,
        timestep_conditioning=conditioning, patch_embedder=patch_embedder, **extra,
    )
    cfg = model.config
    lora = build_lora_config(cfg, rank=4, target_modules="q_proj, v_proj")
    assert (lora.r, lora.lora_alpha, set(lora.target_modules)) == (4, 4, {"q_proj", "v_proj"})
    heads = {"x_embedder", "t_embedder", "final_layer"} | {"adaln": {"t_modulation"}, "token": {"t_projector"}}.get(
        conditioning, set()) | ({"patch_decoder"} if patch_embedder == "unet" else set())
    assert set(lora.modules_to_save) == heads
    rows = [cfg.boi_token_id, cfg.eoi_token_id]
    assert lora.trainable_token_indices == ({"embed_tokens": rows} if tied else {"embed_tokens": rows, "lm_head": rows})
    module_names = {n.rpartition(".")[2] for n, _ in model.named_modules()}
    assert heads <= module_names  # every named head exists in the model
    for bad, match in (({"rank": 0}, "`rank`"), ({"rank": 4, "dropout": 1.0}, "`dropout`"),
                       ({"rank": 4, "target_modules": " , "}, "`target_modules`")):
        with pytest.raises(ValueError, match=match):
            build_lora_config(cfg, **bad)


def test_lora_adapter_and_merged_round_trips(assets, tmp_path):
    from peft import PeftModel
    from transformers import AutoModel

    base_dir = assets["pixel"]
    model = MonoFormerForConditionalGeneration.from_pretrained(base_dir)
    processor = MonoFormerProcessor.from_pretrained(base_dir).configure_for_model(model.config)
    torch.manual_seed(0)
    peft_model = add_lora(model, rank=4, alpha=8)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("final_layer" in n for n in trainable)
    assert any("trainable_tokens_delta" in n for n in trainable)
    assert not any("language_model.layers.0.mlp" in n and "lora" not in n for n in trainable)

    records = load_image_caption_records(train_data_dir=str(assets["images"]))
    latents = encode_images(records, MonoFormerImageProcessor(num_channels=3), model.config)
    collator = MonoFormerDataCollator(processor, default_noise_scheduler("epsilon"), "epsilon", seed=0)
    batch = collator([{"text": r["text"], "latents": x} for r, x in zip(records, latents)])
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for _ in range(3):  # make LoRA B, the heads and the token rows non-trivial
        peft_model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    text, image = tiny_inputs(model.config, processor)
    ref_logits, ref_diff = outputs(peft_model, text, image)
    base_logits, _ = outputs(MonoFormerForConditionalGeneration.from_pretrained(base_dir), text, image)
    assert (ref_logits - base_logits).abs().max() > 1e-3  # training changed the model

    peft_model.save_pretrained(tmp_path / "adapter")
    fresh = PeftModel.from_pretrained(MonoFormerForConditionalGeneration.from_pretrained(base_dir), tmp_path / "adapter")
    logits, diff = outputs(fresh, text, image)
    assert torch.allclose(logits, ref_logits, atol=1e-6) and torch.allclose(diff, ref_diff, atol=1e-6)

    merged = fresh.merge_and_unload()
    assert not any("lora" in n or "token_adapter" in n or "modules_to_save" in n for n in merged.state_dict())
    logits_m, diff_m = outputs(merged, text, image)
    assert torch.allclose(logits_m, ref_logits, atol=1e-5) and torch.allclose(diff_m, ref_diff, atol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    reloaded, info = AutoModel.from_pretrained(tmp_path / "merged", trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    logits_r, diff_r = outputs(reloaded, text, image)
    assert torch.allclose(logits_r, logits_m, atol=1e-6) and torch.allclose(diff_r, diff_m, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# Resume: 6 straight steps == 3 steps, stop, resume 3 more
# ----------------------------------------------------------------------------------------------------------------------
def test_resume_gives_the_same_weights_as_a_straight_run(assets, tmp_path):
    common = ["--train_batch_size", "2", "--gradient_accumulation_steps", "2", "--checkpointing_steps", "3",
              "--text_data_file", str(write_text_file(tmp_path)), "--text_ratio", "0.2", "--caption_ratio", "0.25",
              "--use_ema", "--ema_decay", "0.9"]
    straight = train.main(script_args(assets, tmp_path / "straight", *common, steps=6))
    train.main(script_args(assets, tmp_path / "split", *common, steps=3))
    assert sorted(os.listdir(tmp_path / "split"))[:1] == ["checkpoint-3"]
    resumed = train.main(script_args(assets, tmp_path / "split", *common, "--resume_from_checkpoint", "latest", steps=6))
    assert straight["global_step"] == resumed["global_step"] == 6
    a = load_file(tmp_path / "straight" / "checkpoint-6" / "model.safetensors")
    b = load_file(tmp_path / "split" / "checkpoint-6" / "model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    start = load_file(assets["pixel"] / "model.safetensors")
    assert max((a[k] - start[k]).abs().max().item() for k in start) > 1e-3  # it did train
    opt_a = torch.load(tmp_path / "straight" / "checkpoint-6" / "optimizer.bin", weights_only=True)["state"]
    opt_b = torch.load(tmp_path / "split" / "checkpoint-6" / "optimizer.bin", weights_only=True)["state"]
    assert opt_a.keys() == opt_b.keys()
    for k in opt_a:
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(opt_a[k][name], opt_b[k][name], atol=1e-6, rtol=1e-5)
    assert [h["loss"] for h in straight["history"]] == pytest.approx([h["loss"] for h in resumed["history"]], abs=1e-5)
    # diffusers' EMAModel is checkpointed with the run (accelerate's custom state) and resumed, not restarted
    ema_a, ema_b = (torch.load(tmp_path / run / "checkpoint-6" / "custom_checkpoint_0.pkl", weights_only=True)
                    for run in ("straight", "split"))
    assert ema_a["optimization_step"] == ema_b["optimization_step"] == 6
    assert len(ema_a["shadow_params"]) == len(ema_b["shadow_params"]) > 0
    for x, y in zip(ema_a["shadow_params"], ema_b["shadow_params"]):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0)
    # the saved pipeline holds the EMA weights, not the last training weights
    names = [n for n, _ in MonoFormerForConditionalGeneration.from_pretrained(assets["pixel"]).named_parameters()]
    saved = load_file(tmp_path / "split" / "pipeline" / "model" / "model.safetensors")
    assert len(names) == len(ema_b["shadow_params"])
    assert all(torch.equal(saved[n], x) for n, x in zip(names, ema_b["shadow_params"]))
    assert max((saved[n] - b[n]).abs().max().item() for n in names) > 1e-4


def write_text_file(folder: pathlib.Path) -> pathlib.Path:
    path = folder / "texts.txt"
    path.write_text("the quick brown fox jumps over the lazy dog\nmust be in want of a wife.\n")
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Multi-process: 2 processes x batch 2 == 1 process x batch 4
# ----------------------------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_time_budget_stops_with_a_checkpoint_and_a_pipeline_and_resumes(assets, tmp_path):
    out = tmp_path / "timed"
    first = train.main(script_args(assets, out, "--max_train_minutes", "0", steps=50))
    assert first["global_step"] == 1  # a zero budget is spent after the first step, not before it
    assert (out / "checkpoint-1").is_dir() and (out / "pipeline" / "model_index.json").is_file()
    resumed = train.main(script_args(assets, out, "--resume_from_checkpoint", "latest", steps=3))
    assert resumed["global_step"] == 3


def test_a_tuned_flow_pipeline_trains_further_and_keeps_its_sampler(assets, tmp_path):
    """A saved pipeline whose sampler is DPM-Solver++ with flow sigmas (no `scale_noise`) trains on the flow schedule
    and its output pipeline keeps that sampler, its guider and its default step count."""
    from diffusers import DPMSolverMultistepScheduler
    from diffusers.guiders import ClassifierFreeGuidance

    from modeling_monoformer import MonoFormerPipeline

    tok = make_tokenizer()
    model = MonoFormerForConditionalGeneration.from_llm(
        tiny_llama(vocab_size=len(tok)), tokenizer=tok, patch_size=2, sample_size=8, latent_channels=3,
        vae_scale_factor=1, prediction_type="flow",
    )
    processor = MonoFormerProcessor(MonoFormerImageProcessor(), tok).configure_for_model(model.config)
    sampler = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")
    guider = ClassifierFreeGuidance(guidance_scale=5.0, start=0.1, stop=0.9)
    MonoFormerPipeline(model=model, vae=None, scheduler=sampler, processor=processor, guider=guider,
                       default_num_inference_steps=7).save_pretrained(tmp_path / "tuned")
    args = script_args(assets, tmp_path / "more", steps=2)
    args[args.index("--pretrained_model_name_or_path") + 1] = str(tmp_path / "tuned")
    assert train.main(args)["global_step"] == 2
    pipe = MonoFormerPipeline.from_pretrained(tmp_path / "more" / "pipeline")
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler) and pipe.scheduler.config.use_flow_sigmas
    assert isinstance(pipe.guider, ClassifierFreeGuidance)
    assert (pipe.guider.guidance_scale, pipe.guider.config.start, pipe.guider.config.stop) == (5.0, 0.1, 0.9)
    assert pipe.config.default_num_inference_steps == 7


def test_bf16_on_a_device_without_native_bf16_is_warned_about(assets, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(train, "bf16_supported", lambda device: False)
    with caplog.at_level("WARNING"):
        train.main(script_args(assets, tmp_path / "bf16", "--mixed_precision", "bf16", steps=1))
    assert any("no native bfloat16" in r.getMessage() for r in caplog.records)


def test_two_processes_match_one_process_with_the_same_global_batch(assets, tmp_path):
    # Every caption the same length: each process's LM token mean then equals the global one, so the two runs are
    # the same computation (DDP averages the gradients of equal halves) up to float summation order.
    images = make_imagefolder(tmp_path / "images", n=8)
    rows = [json.loads(line) for line in (images / "metadata.jsonl").read_text().splitlines()]
    (images / "metadata.jsonl").write_text("".join(json.dumps({**r, "text": "a small shape"}) + "\n" for r in rows))
    assets = {**assets, "images": images}
    single = train.main(script_args(assets, tmp_path / "single", "--cfg_dropout", "0", steps=3))
    args = script_args(assets, tmp_path / "multi", "--cfg_dropout", "0", steps=3)
    args[args.index("--train_batch_size") + 1] = "2"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(SCRIPT), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stderr + proc.stdout
    multi = json.loads((tmp_path / "multi" / "loss_history.json").read_text())
    for s, m in zip(single["history"], multi, strict=True):  # same samples, same noise (per-sample seeds)
        for key in ("loss", "lm_loss", "diffusion_loss"):
            assert m[key] == pytest.approx(s[key], rel=1e-4), (key, s, m)


# ----------------------------------------------------------------------------------------------------------------------
# LoRA run of the script, pushed to a (patched) Hub, loaded in a fresh process without the package
# ----------------------------------------------------------------------------------------------------------------------
FRESH_SAMPLE = textwrap.dedent(
    """
    import sys
    sys.modules["modeling_monoformer"] = None  # the package must not be importable
    import numpy as np, torch
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
    image = pipe("a red square", num_inference_steps=3, generator=torch.manual_seed(0), output_type="np").images[0]
    assert np.isfinite(image).all() and image.shape == (16, 16, 3), image.shape
    print("OK", type(pipe).__name__, type(pipe.model).__module__)
    """
)


def test_lora_script_run_pushes_a_loadable_pipeline(assets, tmp_path, monkeypatch):
    from huggingface_hub import HfApi
    from peft import PeftModel

    hub = tmp_path / "hub"

    def create_repo(self, repo_id, **kwargs):
        class Url(str):
            pass

        url = Url(f"https://huggingface.co/{repo_id}")
        url.repo_id = repo_id
        return url

    def upload_folder(self, repo_id, folder_path, **kwargs):
        shutil.copytree(folder_path, hub / repo_id, dirs_exist_ok=True)

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    out = tmp_path / "out"
    result = train.main(script_args(assets, out, "--lora_rank", "4", "--lora_alpha", "8", "--use_ema", "--ema_decay",
                                    "0.5", "--gradient_checkpointing", "--validation_steps", "2",
                                    "--push_to_hub", "--hub_model_id", "me/monoformer-lora", latent=True, steps=4))
    assert result["repo_id"] == "me/monoformer-lora"
    assert (out / "samples" / "step-000002.png").is_file() and (out / "samples" / "step-000004.png").is_file()
    assert (out / "loss_history.json").is_file()
    assert (out / "loss_curve.png").is_file()

    uploaded = hub / "me" / "monoformer-lora"
    files = {str(p.relative_to(uploaded)) for p in uploaded.rglob("*") if p.is_file()}
    assert {"model_index.json", "pipeline_monoformer.py", "README.md", "model/modeling_monoformer.py",
            "model/configuration_monoformer.py", "processor/processor_config.json",
            "scheduler/scheduler_config.json"} <= files
    assert any(f.startswith("model/") and f.endswith(".safetensors") for f in files)
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    card = (uploaded / "README.md").read_text()
    assert "base LLM" in card and "| steps | 4 " in card and "diffusion_loss" in card and "LoRA (rank 4" in card

    # The merged pipeline model equals base + adapter (EMA weights are what was saved in both).
    merged = MonoFormerForConditionalGeneration.from_pretrained(uploaded / "model")
    adapter = PeftModel.from_pretrained(MonoFormerForConditionalGeneration.from_pretrained(assets["latent"]), out / "adapter")
    processor = MonoFormerProcessor.from_pretrained(assets["latent"]).configure_for_model(merged.config)
    text, image = tiny_inputs(merged.config, processor)
    for x, y in zip(outputs(merged, text, image), outputs(adapter, text, image)):
        assert torch.allclose(x, y, atol=1e-5)

    proc = subprocess.run([sys.executable, "-c", FRESH_SAMPLE, str(uploaded)], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK MonoFormerPipeline" in proc.stdout and "modeling_monoformer" in proc.stdout


# ----------------------------------------------------------------------------------------------------------------------
# Bad input: clear errors, and the last checkpoint survives
# ----------------------------------------------------------------------------------------------------------------------
def test_bad_input_is_refused_clearly_and_keeps_the_last_checkpoint(assets, tmp_path):
    out = tmp_path / "out"
    train.main(script_args(assets, out, "--checkpointing_steps", "2", steps=2))
    checkpoint = out / "checkpoint-2"
    before = load_file(checkpoint / "model.safetensors")

    with pytest.raises(ValueError, match="--caption_column.*'caption'.*columns are"):
        train.main(script_args(assets, out, "--caption_column", "caption", "--resume_from_checkpoint", "latest", steps=4))

    broken = make_imagefolder(tmp_path / "broken", n=4)
    (broken / "002.png").write_bytes(b"this is not a png")
    args = script_args(assets, out, "--resume_from_checkpoint", "latest", steps=4)
    args[args.index("--train_data_dir") + 1] = str(broken)
    with pytest.raises(ValueError, match=r"Cannot read image .*002\.png"):
        train.main(args)

    odd = make_imagefolder(tmp_path / "odd", n=4, size=15)  # 15 px: not a multiple of patch_size * vae factor
    args[args.index("--train_data_dir") + 1] = str(odd)
    with pytest.raises(ValueError, match=r"Image .*000\.png.* 15x15 .*--resolution"):
        train.main(args)
    # ... which `--resolution` fixes
    records = load_image_caption_records(train_data_dir=str(odd))
    config = MonoFormerForConditionalGeneration.config_class.from_pretrained(assets["latent"])
    fixed = encode_images(records, MonoFormerImageProcessor(do_resize=True, size={"height": 16, "width": 16}), config,
                          vae=AutoencoderKL.from_pretrained(assets["vae"]))
    assert fixed[0].shape == (4, 8, 8)

    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2"]
    after = load_file(checkpoint / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    model = MonoFormerForConditionalGeneration.from_pretrained(assets["pixel"])
    result = model.load_state_dict(after, strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= {"lm_head.weight"}
