"""The Fashion-MNIST demo: the shipped checkpoint loads and samples deterministically, and the recipe runs end to end.

Needs the Debian Fashion-MNIST files (`apt-get install -y dataset-fashion-mnist`, done by .ci/run): when they are
missing these tests fail with that command, they do not skip. The Austen loader test needs the unpacked
r-cran-janeaustenr package (see `examples/train_fashion_mnist.py`).
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "examples" / "monoformer-fashion-mnist"
sys.path.insert(0, str(ROOT / "examples"))

import train_fashion_mnist as recipe  # noqa: E402


def require_fashion_mnist():
    files = [f"{p}-ubyte.gz" for p in ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1")]
    missing = [f for f in files if not os.path.isfile(os.path.join(recipe.FASHION_MNIST_DIR, f))]
    if missing:
        pytest.fail(f"Fashion-MNIST files {missing} are missing: {recipe.FASHION_MNIST_INSTALL}")


@pytest.fixture(scope="module")
def pipe():
    pipe = DiffusionPipeline.from_pretrained(CHECKPOINT, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, seed: int) -> np.ndarray:
    prompts = ["a photo of a sneaker", "a photo of a pair of trousers"]
    return pipe(
        prompts, num_images_per_prompt=2, num_inference_steps=4, guidance_scale=3.0,
        generator=torch.Generator().manual_seed(seed), output_type="np",
    ).images


def test_shipped_checkpoint_is_small_safetensors():
    weights = list(CHECKPOINT.rglob("*.safetensors"))
    assert weights, f"no safetensors under {CHECKPOINT}"
    assert sum(w.stat().st_size for w in weights) <= 50 * 2**20
    assert not list(CHECKPOINT.rglob("*.bin"))
    index = json.loads((CHECKPOINT / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_monoformer", "MonoFormerPipeline"]
    assert index["vae"][0] is None  # pixel space


def test_shipped_checkpoint_grid_is_deterministic_for_a_seed(pipe):
    a, b, c = sample(pipe, 0), sample(pipe, 0), sample(pipe, 1)
    assert a.shape == (4, 28, 28, 1)
    assert np.isfinite(a).all()
    assert a.min() >= 0.0 and a.max() <= 1.0
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 0.05
    assert a.std() > 0.05  # not a constant image


def test_shipped_checkpoint_call_defaults_are_its_tuned_sampler(pipe):
    """`pipe(prompt)` with no sampler arguments is, bit for bit, the call the README's numbers were measured with."""
    defaults = recipe.SAMPLER_DEFAULTS
    guider = pipe.guider.config
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"  # the sweep's choice (README)
    assert pipe.config.default_num_inference_steps == defaults["num_inference_steps"]
    assert (guider.guidance_scale, guider.start, guider.stop) == (
        defaults["guidance_scale"], defaults["guidance_start"], defaults["guidance_stop"]
    )
    prompts = ["a photo of an ankle boot", "a photo of a bag"]
    kw = dict(num_images_per_prompt=2, output_type="np")
    plain = pipe(prompts, generator=torch.manual_seed(0), **kw).images
    tuned = pipe(prompts, generator=torch.manual_seed(0), **defaults, **kw).images
    np.testing.assert_array_equal(plain, tuned)


def test_shipped_checkpoint_loads_in_a_process_without_the_package():
    code = (
        "import sys; sys.modules['modeling_monoformer'] = None\n"  # any import of the package now fails
        "import torch; from diffusers import DiffusionPipeline\n"
        f"pipe = DiffusionPipeline.from_pretrained({str(CHECKPOINT)!r}, trust_remote_code=True)\n"
        "pipe.set_progress_bar_config(disable=True)\n"
        "img = pipe('a photo of a bag', num_inference_steps=2, generator=torch.manual_seed(0), output_type='np')\n"
        "print(type(pipe).__module__, img.images.shape)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not result.stdout.startswith("modeling_monoformer")  # the pipeline class came from the folder's code
    assert "(1, 28, 28, 1)" in result.stdout


def test_shipped_checkpoint_captions_and_writes_text(pipe):
    require_fashion_mnist()
    images, _ = recipe.load_fashion_mnist("test")
    processor, model = pipe.processor, pipe.model
    inputs = processor(text=["<image>"] * 2, image_sizes=[[(28, 28)]] * 2, padding_side="left")
    out = model.generate(**inputs, latents=images[:2], max_new_tokens=6, do_sample=False)
    captions = processor.post_process_image_text_to_text(out[:, inputs["input_ids"].shape[1] :])
    assert len(captions) == 2 and all(isinstance(c, str) and c.strip() for c in captions)
    text = processor.tokenizer(["It is a truth"], return_tensors="pt")
    out = model.generate(**text, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, text["input_ids"].shape[1] + 5)


def test_generate_script_samples_with_the_checkpoints_saved_sampler():
    import generate

    args = generate.parse_args([])
    # no second copy of the sampler settings: the script leaves them to the checkpoint's saved ones
    assert (args.steps, args.guidance_scale, args.guidance_start, args.guidance_stop) == (None, None, None, None)
    assert not recipe.parse_args(["--output_dir", "x"]).hflip  # Fashion-MNIST's shoes all face left


def test_caption_class_reads_the_longest_class_name_first():
    assert recipe.caption_class("a photo of a t-shirt") == 0
    assert recipe.caption_class("a grayscale photo of a shirt") == 6
    assert recipe.caption_class("an ankle boot") == 9
    assert recipe.caption_class("a photo of a cat") is None


def test_missing_fashion_mnist_names_the_apt_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        recipe.load_fashion_mnist("train", str(tmp_path))


def test_missing_austen_names_the_commands(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get download r-cran-janeaustenr"):
        recipe.find_austen_dir(str(tmp_path))


def test_recipe_runs_end_to_end_and_is_reproducible(tmp_path):
    require_fashion_mnist()
    tiny = [
        "--subset", "64", "--max_steps", "3", "--hidden_size", "32", "--num_layers", "1", "--num_heads", "2",
        "--vocab_size", "300", "--batch_size", "8", "--text_fraction", "0", "--sample_steps", "2",
        "--warmup_steps", "1",
    ]
    summaries = [recipe.main(tiny + ["--output_dir", str(tmp_path / name)]) for name in ("a", "b")]
    assert summaries[0]["steps"] == 3
    histories = [json.loads((tmp_path / n / "loss_history.json").read_text()) for n in ("a", "b")]
    for key in ("lm_loss", "diffusion_loss"):
        assert [h[key] for h in histories[0]] == [h[key] for h in histories[1]]
        assert all(np.isfinite(h[key]) for h in histories[0])
    out = tmp_path / "a"
    assert (out / "loss_curve.png").is_file() and list((out / "samples").glob("step-*.png"))
    reloaded = DiffusionPipeline.from_pretrained(out / "pipeline", trust_remote_code=True)
    reloaded.set_progress_bar_config(disable=True)
    assert reloaded.config.default_num_inference_steps == 2  # --sample_steps
    assert (reloaded.guider.config.start, reloaded.guider.config.stop) == (
        recipe.SAMPLER_DEFAULTS["guidance_start"], recipe.SAMPLER_DEFAULTS["guidance_stop"]
    )
    images = reloaded("a photo of a bag", num_inference_steps=2, generator=torch.manual_seed(0), output_type="np")
    assert images.images.shape == (1, 28, 28, 1)


def test_a_step_limit_alone_is_not_cut_short_by_the_default_time_budget():
    assert recipe.parse_args(["--output_dir", "x"]).minutes == 20.0
    assert recipe.parse_args(["--output_dir", "x", "--max_steps", "3000"]).minutes is None
    both = recipe.parse_args(["--output_dir", "x", "--max_steps", "3000", "--minutes", "5"])
    assert (both.minutes, both.max_steps) == (5.0, 3000)


def test_recipe_trains_the_unet_patch_path_in_bf16(tmp_path):
    require_fashion_mnist()
    args = [
        "--subset", "32", "--max_steps", "2", "--hidden_size", "32", "--num_layers", "1", "--num_heads", "2",
        "--vocab_size", "300", "--batch_size", "4", "--text_fraction", "0", "--sample_steps", "2", "--warmup_steps", "1",
        "--patch_embedder", "unet", "--patch_size", "7", "--unet_block_channels", "8", "--mixed_precision", "bf16",
        "--output_dir", str(tmp_path),
    ]
    summary = recipe.main(args)
    assert np.isfinite(summary["final_diffusion_loss"])
    reloaded = DiffusionPipeline.from_pretrained(tmp_path / "pipeline", trust_remote_code=True)
    assert reloaded.model.config.patch_embedder == "unet" and reloaded.model.config.num_image_tokens(28, 28) == 16
    reloaded.set_progress_bar_config(disable=True)
    images = reloaded("a photo of a bag", num_inference_steps=2, generator=torch.manual_seed(0), output_type="np")
    assert images.images.shape == (1, 28, 28, 1) and np.isfinite(images.images).all()


def test_austen_loader_reads_the_novels_and_holds_out_persuasion():
    train, test = recipe.load_austen_texts(split="train"), recipe.load_austen_texts(split="test")
    assert len(train) > 5000 and len(test) > 500
    assert all(40 <= len(p) <= 160 for p in train[:200])
    assert not set(train) & set(test)


def test_edit_samples_are_built_from_real_data():
    images = torch.rand(30, 1, 28, 28) * 2 - 1
    labels = torch.arange(30) % 10
    by_class = [torch.nonzero(labels == c).squeeze(-1).tolist() for c in range(10)]
    rng = __import__("random").Random(0)
    kinds = set()
    for _ in range(60):
        s = recipe.make_edit_sample(rng, images, labels, by_class, 7)
        assert s["task"] == "edit" and torch.equal(s["source"], images[7])
        if s["text"] == "flip it horizontally":
            assert torch.equal(s["pixel_values"], images[7].flip(-1))
        elif s["text"] == "invert the colours":
            assert torch.equal(s["pixel_values"], -images[7])
        else:
            name = s["text"].removeprefix("turn it into ")
            target_class = recipe.CLASS_NAMES.index(name)
            assert target_class != 7 and any(torch.equal(s["pixel_values"], images[j]) for j in by_class[target_class])
        kinds.add(s["text"].split(" ")[0])
    assert kinds == {"flip", "invert", "turn"}
    sample = recipe.make_interleaved_sample(rng, images[3], 3, "<image>")
    assert sample["text"].count("<image>") == 1 and sample["text"].count("a dress") == 2
    questions = set()
    for _ in range(30):
        vqa = recipe.make_vqa_sample(rng, images[7], 7)
        assert vqa["task"] == "caption" and torch.equal(vqa["pixel_values"], images[7])
        assert vqa["text"] == " It is a sneaker." and recipe.caption_class(vqa["text"]) == 7
        questions.add(vqa["prompt"])
    assert questions == set(recipe.VQA_QUESTIONS)


def test_recipe_mixes_edit_and_interleaved_samples_behind_flags(tmp_path):
    require_fashion_mnist()
    tiny = [
        "--subset", "64", "--max_steps", "3", "--hidden_size", "32", "--num_layers", "1", "--num_heads", "2",
        "--vocab_size", "400", "--batch_size", "16", "--text_fraction", "0", "--sample_steps", "2",
        "--warmup_steps", "1", "--edit_fraction", "0.25", "--interleaved_fraction", "0.25", "--vqa_fraction", "0.25",
        "--caption_max_noise", "0.5", "--output_dir", str(tmp_path),
    ]
    summary = recipe.main(tiny)
    assert summary["edit_samples_seen"] > 0 and summary["interleaved_samples_seen"] > 0
    assert summary["vqa_samples_seen"] > 0
    with pytest.raises(ValueError, match="--vqa_fraction"):
        recipe.main(tiny[:-2] + ["--vqa_fraction", "0.5", "--output_dir", str(tmp_path / "x")])
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "pipeline", trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    source = torch.rand(1, 1, 28, 28)
    edited = pipe("flip it horizontally", image=source, num_inference_steps=2, output_type="pt").images
    assert edited.shape == (1, 1, 28, 28)
    out = pipe.generate_interleaved("Show me a picture of a sneaker.", max_new_tokens=8, num_inference_steps=2)
    assert out.sequences.shape[1] > pipe.processor(text="Show me a picture of a sneaker.")["input_ids"].shape[1]


def test_init_from_continues_a_checkpoint_with_its_tokenizer_and_architecture(tmp_path):
    require_fashion_mnist()
    tiny = ["--subset", "64", "--batch_size", "8", "--text_fraction", "0", "--sample_steps", "2", "--warmup_steps", "1"]
    recipe.main(tiny + ["--max_steps", "2", "--hidden_size", "32", "--num_layers", "1", "--num_heads", "2",
                        "--vocab_size", "300", "--output_dir", str(tmp_path / "first")])
    first = DiffusionPipeline.from_pretrained(tmp_path / "first" / "pipeline", trust_remote_code=True)
    # the default (192-d, 6-layer) settings are replaced by the checkpoint's; new task wordings reuse its tokenizer
    recipe.main(tiny + ["--max_steps", "1", "--lr", "0", "--edit_fraction", "0.3", "--interleaved_fraction", "0.3",
                        "--init_from", str(tmp_path / "first"), "--output_dir", str(tmp_path / "second")])
    second = DiffusionPipeline.from_pretrained(tmp_path / "second" / "pipeline", trust_remote_code=True)
    saved = json.loads((tmp_path / "second" / "train_args.json").read_text())
    assert (saved["hidden_size"], saved["num_layers"]) == (32, 1)
    assert second.processor.tokenizer.get_vocab() == first.processor.tokenizer.get_vocab()
    a, b = first.model.state_dict(), second.model.state_dict()
    assert a.keys() == b.keys()
    # lr 0: the weights are the checkpoint's; only the EMA's warm-up mixes in (identical) copies
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= 1e-6
    with pytest.raises(ValueError, match="train_args.json"):
        recipe.main(tiny + ["--max_steps", "1", "--init_from", str(tmp_path), "--output_dir", str(tmp_path / "x")])
    # the pieces travel with the weights: arguments and summaries of every earlier piece, totals over all
    first_args = json.loads((tmp_path / "first" / "train_args.json").read_text())
    assert saved["previous_pieces"] == [first_args] and saved["init_from"] == str(tmp_path / "first")
    summary = json.loads((tmp_path / "second" / "summary.json").read_text())
    assert [p["steps"] for p in summary["pieces"]] == [2, 1] and summary["steps"] == 3
    first_summary = json.loads((tmp_path / "first" / "summary.json").read_text())
    assert summary["first_lm_loss"] == first_summary["first_lm_loss"]
    with pytest.raises(SystemExit):  # a piece never overwrites the checkpoint it starts from
        recipe.parse_args(["--init_from", str(tmp_path / "first"), "--output_dir", str(tmp_path / "first")])


def test_edit_samples_of_a_small_subset_only_turn_into_classes_it_has():
    images = torch.rand(5, 1, 28, 28) * 2 - 1
    labels = torch.tensor([9, 0, 0, 3, 9])  # the first five training images: three classes
    by_class = [torch.nonzero(labels == c).squeeze(-1).tolist() for c in range(10)]
    rng = __import__("random").Random(0)
    for _ in range(100):
        s = recipe.make_edit_sample(rng, images, labels, by_class, 1)
        if s["text"].startswith("turn it into"):
            assert recipe.CLASS_NAMES.index(s["text"].removeprefix("turn it into ")) in (3, 9)
    one_class = [list(range(5))] + [[]] * 9
    for _ in range(20):  # no other class at all: flips and inversions only
        sample = recipe.make_edit_sample(rng, images, torch.zeros(5, dtype=torch.long), one_class, 1)
        assert not sample["text"].startswith("turn")


def test_recipe_sizes_the_position_range_for_its_longest_sample():
    from modeling_monoformer.tokenizer_training_monoformer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(["a photo of a sneaker flip it horizontally"] * 10, vocab_size=300)
    args = recipe.parse_args(["--output_dir", "x", "--patch_size", "2", "--hidden_size", "32", "--num_layers", "1",
                              "--num_heads", "2"])
    model = recipe.build_model(args, tok)[0]
    edit_length = 2 * ((28 // 2) ** 2 + 2) + 16  # two 196-token images and an instruction
    assert model.config.text_config.max_position_embeddings >= edit_length
    args = recipe.parse_args(["--output_dir", "x", "--hidden_size", "32", "--num_layers", "1", "--num_heads", "2"])
    assert recipe.build_model(args, tok)[0].config.text_config.max_position_embeddings == 256  # the demo's, as saved
