"""Reliability (issue 15): defined losses, checkpoints that resume what they say, clear errors on bad input."""

import json
import pathlib

import pytest
import torch
from diffusers import DDPMScheduler

from modeling_monoformer import (
    MonoFormerDataCollator,
    MonoFormerForConditionalGeneration,
    MonoFormerImageProcessor,
    MonoFormerProcessor,
    default_noise_scheduler,
)
from modeling_monoformer.training_data_monoformer import (
    MonoFormerTrainingDataset,
    encode_images,
    load_image_caption_records,
)
from tests.conftest import make_tokenizer, tiny_llama
from tests.test_finetune import (  # noqa: F401  (assets and the accelerate-state fixture are used by name)
    assets,
    fresh_accelerate_state_one_thread,
    make_imagefolder,
    script_args,
    train,
)


def set_captions(folder: pathlib.Path, caption) -> pathlib.Path:
    """Rewrite every caption of an imagefolder's metadata.jsonl (a value, or None to drop the key)."""
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    rows = [{**r, "text": caption} if caption is not None else {"file_name": r["file_name"]} for r in rows]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


# ----------------------------------------------------------------------------------------------------------------------
# 1. An empty-text batch gives a defined loss; the script and Trainer log the same thing
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def pixel_model():
    tok = make_tokenizer()  # no BOS is added: an empty prompt leaves no text token to predict
    model = MonoFormerForConditionalGeneration.from_llm(
        tiny_llama(vocab_size=len(tok)), tokenizer=tok, latent_channels=3, patch_size=2, vae_scale_factor=1
    )
    processor = MonoFormerProcessor(MonoFormerImageProcessor(), tok).configure_for_model(model.config)
    return model, processor


def test_batch_without_predicted_text_gives_zero_lm_loss_not_nan(pixel_model):
    model, processor = pixel_model
    collator = MonoFormerDataCollator(processor, DDPMScheduler(), "epsilon", cfg_dropout=0.0, seed=0)
    batch = collator([{"text": "", "pixel_values": torch.rand(3, 4, 4) * 2 - 1}])
    assert (batch["labels"][:, 1:] != -100).sum() == 0  # `<boi>` comes first: nothing is predicted
    out = model(**batch)
    assert out.lm_loss is not None and out.lm_loss.item() == 0.0
    assert torch.isfinite(out.loss) and out.loss.item() == pytest.approx(
        model.config.diffusion_loss_weight * out.diffusion_loss.item()
    )
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # Trainer's token count over a window of empty batches is 0 as well
    assert model(**batch, num_items_in_batch=torch.tensor(0)).lm_loss.item() == 0.0
    # a batch with text still gets the plain mean over its tokens
    text = collator([{"text": "a photo of a bag"}])
    reference = torch.nn.functional.cross_entropy(
        model(**text).logits[0, :-1], text["labels"][0, 1:], ignore_index=-100
    )
    assert model(**text).lm_loss.item() == pytest.approx(reference.item(), rel=1e-6)


def test_script_trains_batches_of_one_empty_caption(assets, tmp_path):
    """The README's fine-tune with `--train_batch_size 1` crashed at the first empty prompt (NaN, then a format
    error in the progress bar); with accumulation the NaN reached the weights."""
    images = set_captions(make_imagefolder(tmp_path / "images", n=4), "")
    data = {**assets, "images": images}
    result = train.main(script_args(data, tmp_path / "out", "--train_batch_size", "1", "--logging_steps", "1", steps=3))
    assert len(result["history"]) == 3
    for h in result["history"]:
        assert h["lm_loss"] == 0.0 and h["loss"] == pytest.approx(h["diffusion_loss"]), h
    result = train.main(script_args(data, tmp_path / "accum", "--train_batch_size", "1",
                                    "--gradient_accumulation_steps", "4", steps=1))
    assert all(v is not None and v == v for v in result["history"][0].values())  # no None, no NaN


def test_trainer_logs_the_mean_model_loss_like_the_script(assets, tmp_path):
    """`Trainer` must average the model's loss over accumulated micro-batches, as the script does. The model's
    diffusion term is a per-batch mean, so Trainer's token-count path (`num_items_in_batch`: no division by the
    accumulation steps) would log and train it `gradient_accumulation_steps` times too large."""
    from transformers import Trainer, TrainingArguments

    model = MonoFormerForConditionalGeneration.from_pretrained(assets["pixel"], lm_loss_weight=0.0)
    processor = MonoFormerProcessor.from_pretrained(assets["pixel"]).configure_for_model(model.config)
    records = load_image_caption_records(train_data_dir=str(assets["images"]))
    latents = encode_images(records, MonoFormerImageProcessor(num_channels=3), model.config)
    dataset = MonoFormerTrainingDataset([r["text"] for r in records], latents, seed=0)
    collator = MonoFormerDataCollator(processor, default_noise_scheduler("epsilon"), "epsilon", seed=0)
    with torch.no_grad():  # every image once; all images share one size, so the mean does not depend on grouping
        expected = model(**collator([dataset[i] for i in range(len(dataset))])).loss.item()
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=1, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, learning_rate=0.0, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, disable_tqdm=True, remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert logged == [pytest.approx(expected, rel=1e-4)]


# ----------------------------------------------------------------------------------------------------------------------
# 3. Checkpoints of an abandoned future never win
# ----------------------------------------------------------------------------------------------------------------------
def checkpoint_names(out: pathlib.Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint"))


def test_resume_from_an_older_checkpoint_moves_the_abandoned_ones_aside(assets, tmp_path):
    out = tmp_path / "out"
    train.main(script_args(assets, out, "--checkpointing_steps", "1", steps=3))
    assert checkpoint_names(out) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    old_3 = (out / "checkpoint-3" / "model.safetensors").read_bytes()
    # go back to step 1 with other settings, keep one checkpoint, stop at step 2 (as a kill would)
    train.main(script_args(assets, out, "--checkpointing_steps", "1", "--checkpoints_total_limit", "1",
                           "--resume_from_checkpoint", str(out / "checkpoint-1"), "--cfg_dropout", "0.5", steps=2))
    assert checkpoint_names(out) == ["checkpoint-2"]  # the new run's, not the abandoned run's checkpoint-3
    (abandoned,) = out.glob("abandoned-*")
    assert sorted(p.name for p in abandoned.iterdir()) == ["checkpoint-2", "checkpoint-3"]
    assert (abandoned / "checkpoint-3" / "model.safetensors").read_bytes() == old_3
    resumed = train.main(script_args(assets, out, "--resume_from_checkpoint", "latest", steps=2))
    assert resumed["global_step"] == 2  # "latest" is the new run's step 2, not the abandoned step 3


# ----------------------------------------------------------------------------------------------------------------------
# 4. Optimisation flags changed on resume are applied, said, and recorded
# ----------------------------------------------------------------------------------------------------------------------
def test_learning_rate_changed_on_resume_is_applied_and_recorded(assets, tmp_path, caplog):
    out = tmp_path / "out"
    train.main(script_args(assets, out, "--checkpointing_steps", "2", steps=2))  # --learning_rate 3e-3
    args = script_args(assets, out, "--resume_from_checkpoint", "latest", "--adam_weight_decay", "0.1", steps=4)
    args[args.index("--learning_rate") + 1] = "1e-3"
    with caplog.at_level("WARNING"):
        result = train.main(args)
    assert [h["lr"] for h in result["history"]] == [3e-3, 3e-3, 1e-3, 1e-3]
    assert "--learning_rate 0.001 (checkpoint: 0.003)" in caplog.text and "--adam_weight_decay 0.1" in caplog.text
    card = (out / "pipeline" / "README.md").read_text()
    assert "learning rate 0.003 (steps 1-2), 0.001 (steps 3-4)" in card


def test_adam_settings_changed_on_resume_reach_the_optimizer(assets, tmp_path):
    out = tmp_path / "out"
    train.main(script_args(assets, out, "--checkpointing_steps", "1", steps=1))
    train.main(script_args(assets, out, "--resume_from_checkpoint", "latest", "--adam_weight_decay", "0.5",
                           "--adam_beta1", "0.5", "--adam_epsilon", "1e-6", "--checkpointing_steps", "2", steps=2))
    (group,) = torch.load(out / "checkpoint-2" / "optimizer.bin", weights_only=True)["param_groups"]
    assert (group["weight_decay"], group["betas"][0], group["eps"]) == (0.5, 0.5, 1e-6)


def test_batch_shape_changed_on_resume_is_refused_not_silently_ignored(assets, tmp_path):
    out = tmp_path / "out"
    train.main(script_args(assets, out, "--checkpointing_steps", "1", steps=1))
    with pytest.raises(ValueError, match="gradient_accumulation_steps 2 \\(checkpoint: 1\\)"):
        train.main(script_args(assets, out, "--resume_from_checkpoint", "latest",
                               "--gradient_accumulation_steps", "2", steps=2))
    assert checkpoint_names(out) == ["checkpoint-1"]  # nothing written, nothing moved aside


# ----------------------------------------------------------------------------------------------------------------------
# 10. A half-written folder of a killed run is never carried into a new save
# ----------------------------------------------------------------------------------------------------------------------
def test_stale_temporary_folders_of_a_killed_run_are_removed(assets, tmp_path):
    out = tmp_path / "out"
    (out / "checkpoint-2.tmp").mkdir(parents=True)
    (out / "checkpoint-2.tmp" / ".model.safetensors.partial").write_bytes(b"\0" * 1024)
    (out / "pipeline" / "model").mkdir(parents=True)
    (out / "pipeline" / "model" / "model-00002-of-00002.safetensors").write_bytes(b"\0" * 1024)
    (out / "pipeline.tmp" / "model").mkdir(parents=True)
    (out / "checkpoint-1.delete").mkdir()  # killed while --checkpoints_total_limit deleted it
    train.main(script_args(assets, out, "--checkpointing_steps", "2", steps=2))
    assert not (out / "checkpoint-2" / ".model.safetensors.partial").exists()
    assert not list(out.glob("*.tmp"))
    assert not (out / "pipeline" / "model" / "model-00002-of-00002.safetensors").exists()
    assert (out / "pipeline" / "model" / "model.safetensors").is_file()


# ----------------------------------------------------------------------------------------------------------------------
# 12. A damaged newest checkpoint falls back to the previous one; a damaged latent cache is rebuilt
# ----------------------------------------------------------------------------------------------------------------------
def test_truncated_latest_checkpoint_falls_back_to_the_previous_one(assets, tmp_path, caplog):
    out = tmp_path / "out"
    straight = train.main(script_args(assets, tmp_path / "straight", steps=4))
    train.main(script_args(assets, out, "--checkpointing_steps", "2", steps=4))
    optimizer = out / "checkpoint-4" / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    with caplog.at_level("WARNING"):
        resumed = train.main(script_args(assets, out, "--resume_from_checkpoint", "latest",
                                         "--checkpointing_steps", "2", steps=4))
    assert "Cannot resume from" in caplog.text and "checkpoint-4" in caplog.text
    assert "Falling back to the previous checkpoint" in caplog.text
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]
    assert checkpoint_names(out) == ["checkpoint-2", "checkpoint-4"]  # checkpoint-4 rewritten by the resumed run
    (abandoned,) = out.glob("abandoned-*")
    assert (abandoned / "checkpoint-4" / "optimizer.bin").stat().st_size == 100


def test_missing_rng_state_is_not_resumed_silently(assets, tmp_path, caplog):
    """accelerate skips a missing `random_states_<rank>.pkl` without a word; the resumed run would then draw other
    noise than the interrupted one."""
    out = tmp_path / "out"
    train.main(script_args(assets, out, "--checkpointing_steps", "1", steps=2))
    (out / "checkpoint-2" / "random_states_0.pkl").unlink()
    with caplog.at_level("WARNING"):
        resumed = train.main(script_args(assets, out, "--resume_from_checkpoint", "latest", steps=2))
    assert "random_states_0.pkl is missing" in caplog.text and resumed["global_step"] == 2
    (abandoned,) = out.glob("abandoned-*")
    with pytest.raises(ValueError, match="no loadable checkpoint"):
        train.main(script_args(assets, out, "--resume_from_checkpoint", str(abandoned / "checkpoint-2"), steps=2))


def test_truncated_latent_cache_is_named_and_rebuilt(assets, tmp_path, caplog):
    config = MonoFormerForConditionalGeneration.config_class.from_pretrained(assets["pixel"])
    records = load_image_caption_records(train_data_dir=str(assets["images"]))
    processor = MonoFormerImageProcessor(num_channels=3)
    first = encode_images(records, processor, config, cache_dir=str(tmp_path))
    (cache,) = tmp_path.glob("latents-*.safetensors")
    cache.write_bytes(cache.read_bytes()[:50])
    with caplog.at_level("WARNING"):
        again = encode_images(records, processor, config, cache_dir=str(tmp_path))
    assert cache.name in caplog.text and "rebuilt" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert encode_images(records, processor, config, cache_dir=str(tmp_path))[0].shape == first[0].shape


# ----------------------------------------------------------------------------------------------------------------------
# 11. Under DDP the checkpoint is renamed only once every process has written its part
# ----------------------------------------------------------------------------------------------------------------------
SLOW_RANK_1 = """
import runpy, sys, time
import accelerate
save_state = accelerate.Accelerator.save_state
def slow_save_state(self, *args, **kwargs):
    if self.process_index == 1:
        time.sleep(3)  # rank 1 is late with its RNG state
    return save_state(self, *args, **kwargs)
accelerate.Accelerator.save_state = slow_save_state
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_two_process_checkpoint_holds_every_rank_state(assets, tmp_path):
    import os
    import subprocess
    import sys

    from tests.test_finetune import REPO, SCRIPT, free_port

    wrapper = tmp_path / "slow_rank_1.py"
    wrapper.write_text(SLOW_RANK_1)
    out = tmp_path / "out"
    args = script_args(assets, out, "--checkpointing_steps", "1", steps=1)
    args[args.index("--train_batch_size") + 1] = "2"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(wrapper), str(SCRIPT), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = {p.name for p in (out / "checkpoint-1").iterdir()}
    assert {"random_states_0.pkl", "random_states_1.pkl", "loss_history.json"} <= files
    assert not list(out.glob("*.tmp"))


# ----------------------------------------------------------------------------------------------------------------------
# 9. Bad metadata lines name the file and line; uncaptioned images are counted
# ----------------------------------------------------------------------------------------------------------------------
def test_bad_metadata_line_names_the_file_and_line(tmp_path):
    folder = make_imagefolder(tmp_path / "images", n=4)
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    broken = '{"file_name": "002.png", "text": "a red'
    (folder / "metadata.jsonl").write_text("\n".join(lines[:2] + [broken] + lines[3:]))
    with pytest.raises(ValueError, match=r"metadata\.jsonl, line 3: not valid JSON"):
        load_image_caption_records(train_data_dir=str(folder))
    rows = [json.loads(line) for line in lines]
    rows[1]["text"] = 7
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"metadata\.jsonl, line 2: the caption 'text' is 7 \(int\); write it as"):
        load_image_caption_records(train_data_dir=str(folder))
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "a", "image": "images/000.png"}\n\n{"text": "b" "image": "images/001.png"}\n')
    with pytest.raises(ValueError, match=r"data\.jsonl, line 3: not valid JSON"):
        load_image_caption_records(train_data_file=str(data))


def test_uncaptioned_images_are_counted_in_one_warning(tmp_path, caplog):
    folder = make_imagefolder(tmp_path / "images", n=4)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    rows[0]["text"], rows[1]["text"] = "", None
    del rows[2]["text"]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level("WARNING"):
        records = load_image_caption_records(train_data_dir=str(folder))
    assert [r["text"] for r in records] == ["", "", "", rows[3]["text"]]
    warnings = [r.getMessage() for r in caplog.records if "unconditional" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("3 of 4 images")


# ----------------------------------------------------------------------------------------------------------------------
# 2 and 13. Loading: a folder without config.json, or weights the config no longer describes, is an error
# ----------------------------------------------------------------------------------------------------------------------
def test_default_config_is_not_a_7b_model():
    from modeling_monoformer import MonoFormerConfig

    text = MonoFormerConfig().text_config
    assert (text.model_type, text.hidden_size, text.num_hidden_layers) == ("llama", 576, 30)


def test_folder_without_config_json_is_refused_before_building(assets, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(assets["pixel"], folder)
    (folder / "config.json").unlink()
    with pytest.raises(ValueError, match=r"has no config\.json"):
        MonoFormerForConditionalGeneration.from_pretrained(folder)


@pytest.mark.parametrize("edit", [{"timestep_conditioning": "token"}, {"text_config": {"num_hidden_layers": 1}},
                                  {"text_config": {"num_hidden_layers": 3}}])
def test_config_edited_after_saving_is_an_error_on_load(assets, tmp_path, edit):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(assets["pixel"], folder)
    config = json.loads((folder / "config.json").read_text())
    for key, value in edit.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"do not match its config \((missing|unexpected) keys"):
        MonoFormerForConditionalGeneration.from_pretrained(folder)
    model, info = MonoFormerForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert info["missing_keys"] or info["unexpected_keys"]


def test_processor_folder_without_tokenizer_json_names_the_file(assets, tmp_path):
    import shutil

    folder = tmp_path / "processor"
    shutil.copytree(assets["pixel"], folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match=r"has no tokenizer\.json"):
        MonoFormerProcessor.from_pretrained(folder)


# ----------------------------------------------------------------------------------------------------------------------
# 5. Float images already in [0, 1] / [-1, 1]: the "already rescaled" warning, and do_rescale=False works
# ----------------------------------------------------------------------------------------------------------------------
def test_image_processor_warns_on_already_rescaled_floats(caplog):
    from transformers.utils import logging as hf_logging

    image = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    processor = MonoFormerImageProcessor()
    with caplog.at_level("WARNING"):
        black = processor(image, return_tensors="pt")["pixel_values"]
    assert black.max() < -0.99  # what the user gets without the flag ...
    assert "already rescaled" in caplog.text and "do_rescale=False" in caplog.text  # ... and is told
    good = processor(image, return_tensors="pt", do_rescale=False)["pixel_values"][0]
    assert torch.allclose(good, image * 2 - 1, atol=1e-6)
    signed = image * 2 - 1
    same = processor(signed, return_tensors="pt", do_rescale=False, do_normalize=False)["pixel_values"][0]
    assert torch.allclose(same, signed, atol=1e-6)
    gray = MonoFormerImageProcessor(num_channels=1)(image, return_tensors="pt", do_rescale=False)["pixel_values"][0]
    luma = (image * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0, keepdim=True)
    assert torch.allclose(gray, luma * 2 - 1, atol=1e-5)  # float luma is not rounded to 0/1
    hf_logging.set_verbosity_warning()


# ----------------------------------------------------------------------------------------------------------------------
# 6 and 14. Pipeline and model arguments are validated up front, naming the argument and what was received
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_pipe():
    from tests.test_pipeline import make_pipe

    return make_pipe(pixel_space=True)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(latents=torch.full((1, 3, 8, 8), float("nan"))), ValueError, "`latents` holds NaN"),
        (dict(latents=torch.full((1, 3, 8, 8), float("inf"))), ValueError, "`latents` holds NaN or infinite"),
        (dict(latents=torch.zeros(1, 3, 8, 8).numpy()), TypeError, r"`latents` must be a torch\.Tensor, got numpy"),
        (dict(guidance_scale=float("nan")), ValueError, "`guidance_scale` must be a number"),
        (dict(guidance_scale=float("inf")), ValueError, "`guidance_scale` must be a number"),
        (dict(height=0), ValueError, "`height` must be a positive multiple .* got 0"),
        (dict(width=0), ValueError, "`width` must be a positive multiple .* got 0"),
        (dict(generator=0), TypeError, r"`generator` must be a torch\.Generator .* got 0"),
        (dict(callback_on_step_end=lambda pipe, i, t, kw: None), TypeError,
         "`callback_on_step_end` must return a dict .* got NoneType"),
    ],
)
def test_bad_pipeline_arguments_name_the_argument(tiny_pipe, kwargs, error, match):
    with pytest.raises(error, match=match):
        tiny_pipe("a red square", num_inference_steps=2, **kwargs)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, 1001.0])
def test_model_refuses_timesteps_off_the_scheduler_scale(pixel_model, bad):
    model, _ = pixel_model
    c = model.config
    ids = torch.tensor([[5, c.boi_token_id] + [c.image_token_id] * c.num_image_tokens(4, 4) + [c.eoi_token_id]])
    with pytest.raises(ValueError, match=r"`timesteps` must be finite and in \[0, 1000\]"):
        model(input_ids=ids, latents=torch.zeros(1, 3, 4, 4), timesteps=torch.tensor([bad]))
    model(input_ids=ids, latents=torch.zeros(1, 3, 4, 4), timesteps=torch.tensor([1000.0]))  # flow: sigma = 1


# ----------------------------------------------------------------------------------------------------------------------
# 7 and 8. Generation: left padding by default, and a too-long request refused before the first token
# ----------------------------------------------------------------------------------------------------------------------
def test_processor_pads_left_even_when_the_tokenizer_pads_right(pixel_model):
    model, processor = pixel_model
    tok = processor.tokenizer
    tok.padding_side = "right"  # as SmolLM2's tokenizer ships
    processor = MonoFormerProcessor(MonoFormerImageProcessor(), tok).configure_for_model(model.config)
    batch = processor(text=["a photo of a sneaker", "a bag"])
    assert batch["attention_mask"][1, 0] == 0 and batch["attention_mask"][1, -1] == 1
    model.eval()
    out = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    alone = model.generate(**processor(text=["a bag"]), max_new_tokens=3, do_sample=False)
    assert torch.equal(out[1, -3:], alone[0, -3:])
    assert processor(text=["a", "a b c"], padding_side="right")["attention_mask"][0, -1] == 0


def test_generate_past_the_position_limit_is_refused_up_front(pixel_model):
    model, processor = pixel_model
    model.eval()
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    prompt = processor(text=["a photo of a bag"])
    n = prompt["input_ids"].shape[1]
    with pytest.raises(ValueError, match=rf"max_new_tokens`=600 needs {n + 600} positions.*at most {512 - n} new"):
        model.generate(**prompt, max_new_tokens=600, do_sample=False)
    assert not calls  # refused before the first forward pass


# ----------------------------------------------------------------------------------------------------------------------
# 15. What the README promises: no file dropped in the checkout, --help as written, portable cards, trained size
# ----------------------------------------------------------------------------------------------------------------------
REPO = pathlib.Path(__file__).resolve().parents[1]


def test_generate_writes_into_the_ignored_outputs_folder():
    import sys

    sys.path.insert(0, str(REPO / "examples"))
    import generate

    output = pathlib.PurePath(generate.parse_args([]).output)
    assert output.parts[0] == "outputs" and "outputs/" in (REPO / ".gitignore").read_text().splitlines()


@pytest.mark.parametrize("script", ["conversion/convert_llm_to_monoformer.py",
                                    "conversion/convert_original_monoformer.py", "examples/train_text_to_image.py",
                                    "examples/train_fashion_mnist.py"])
def test_help_epilog_keeps_the_line_continuations(script):
    import ast

    source = (REPO / script).read_text()
    docstring = ast.get_docstring(ast.parse(source), clean=False)
    written = source.split('"""')[1]  # the docstring as typed in the file
    assert len(docstring.splitlines()) == len(written.splitlines())
    assert sum(line.endswith("\\") for line in docstring.splitlines()) >= 1


def test_trained_pipeline_card_is_portable_and_samples_the_trained_size(assets, tmp_path):
    out = tmp_path / "out"
    train.main(script_args(assets, out, steps=1))  # pixel base: sample_size 8; the images are 16 x 16
    card = (out / "pipeline" / "README.md").read_text()
    assert str(tmp_path) not in card and "base-pixel" in card
    config = json.loads((out / "pipeline" / "model" / "config.json").read_text())
    assert config["sample_size"] == 16


def test_save_over_a_sharded_folder_leaves_no_stale_index(pixel_model, tmp_path):
    model, _ = pixel_model
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model.save_pretrained(tmp_path, max_shard_size="100KB")  # still sharded: the index stays
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model.save_pretrained(tmp_path)
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert [p.name for p in tmp_path.glob("*.safetensors")] == ["model.safetensors"]
    MonoFormerForConditionalGeneration.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------------------------------------------------
# 16. Found by a user's-eye review (2026-12-06): generation with several images per row, the default cache, packed
#     text, scaled RoPE, masks and labels of the wrong shape, and the pipeline's image and argument handling
# ----------------------------------------------------------------------------------------------------------------------
def _image_block(config, height, width) -> list[int]:
    return [config.boi_token_id] + [config.image_token_id] * config.num_image_tokens(height, width) + [
        config.eoi_token_id]


@pytest.mark.parametrize("as_list", [False, True])
def test_beam_search_gives_every_beam_its_rows_images(pixel_model, as_list):
    """Beams repeat rows; images are listed over the flattened batch, so each row's images must follow it."""
    model, _ = pixel_model
    model.eval()
    c = model.config
    sizes = [(4, 4), (4, 6) if as_list else (4, 4)]
    ids = torch.tensor([[5, 6] + _image_block(c, *sizes[0]) + [7] + _image_block(c, *sizes[1]) + [8]])
    torch.manual_seed(0)
    images = [torch.randn(3, *s) for s in sizes]
    latents = images if as_list else torch.stack(images)
    with torch.no_grad():
        expected = torch.log_softmax(model(input_ids=ids, latents=latents).logits[0, -1], -1)
        out = model.generate(input_ids=ids, latents=latents, max_new_tokens=1, num_beams=2, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)
    torch.testing.assert_close(out.scores[0][0], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.scores[0][1], expected, rtol=1e-5, atol=1e-5)


def test_expanding_rows_repeats_each_rows_images_in_order(pixel_model):
    model, _ = pixel_model
    c = model.config
    block = _image_block(c, 4, 4)
    ids = torch.tensor([[5] + block + block, [6] + block + [7] * len(block)])  # row 0: 2 images, row 1: 1
    latents = torch.arange(3).float().view(3, 1, 1, 1).expand(3, 3, 4, 4)
    _, kwargs = model._expand_inputs_for_generation(
        expand_size=2, input_ids=ids, latents=latents, timesteps=torch.tensor([0.0, 1.0, 2.0])
    )
    assert kwargs["latents"][:, 0, 0, 0].tolist() == [0, 1, 0, 1, 2, 2]
    assert kwargs["timesteps"].tolist() == [0, 1, 0, 1, 2, 2]


def test_forward_returns_the_cache_as_the_base_llm_does(pixel_model):
    model, processor = pixel_model
    model.eval()
    ids = processor(text=["a photo of a bag"])["input_ids"]
    with torch.no_grad():
        first = model(input_ids=ids)  # no use_cache: the LLM's config decides (True), as for the LLM itself
        assert first.cache is not None and first.cache.get_seq_length() == ids.shape[1]
        step = model(input_ids=torch.tensor([[9]]), cache=first.cache).logits[0, -1]
        full = model(input_ids=torch.cat([ids, torch.tensor([[9]])], 1)).logits[0, -1]
        assert model(input_ids=ids, use_cache=False).cache is None
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)


def test_packed_text_only_rows_keep_their_samples_apart(pixel_model):
    from modeling_monoformer.packing_monoformer import pack_batch

    model, _ = pixel_model
    model.eval()
    ids = torch.tensor([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6])
    batch = dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    packed = pack_batch(batch, max_length=12)
    assert packed["use_cache"] is False
    with torch.no_grad():
        padded_out, packed_out = model(**batch), model(**packed)
    torch.testing.assert_close(packed_out.logits[0, 4:10], padded_out.logits[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed_out.loss, padded_out.loss, rtol=1e-5, atol=1e-6)


def test_generate_with_a_scaled_rope_is_not_cut_at_max_position_embeddings():
    tok = make_tokenizer()
    llm = tiny_llama(vocab_size=len(tok), max_position_embeddings=16,
                     rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})
    model = MonoFormerForConditionalGeneration.from_llm(llm, tokenizer=tok, latent_channels=3, patch_size=2).eval()
    llm.eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    kw = dict(max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(model.generate(ids, **kw), llm.generate(ids, **kw))
    assert model.config.trained_position_limit is None


def test_wrong_shapes_of_mask_labels_and_empty_images_get_clear_answers(pixel_model):
    model, _ = pixel_model
    c = model.config
    ids = torch.tensor([[5, 6] + _image_block(c, 4, 4)])
    latents = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match=r"`attention_mask` must have shape \(batch_size, sequence_length\)"):
        model(input_ids=ids, latents=latents, attention_mask=torch.ones(ids.shape[1]))
    with pytest.raises(ValueError, match=r"`labels` must have shape \(1, \d+\)"):
        model(input_ids=ids, latents=latents, labels=torch.zeros(1, 3, dtype=torch.long))
    text = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        plain = model(input_ids=text).logits
        for empty in ([], torch.zeros(0, 3, 4, 4)):
            torch.testing.assert_close(model(input_ids=text, latents=empty).logits, plain, rtol=0, atol=0)


def test_uint8_pixels_read_as_the_pil_image_and_out_of_range_floats_are_refused(tiny_pipe):
    import numpy as np
    from PIL import Image

    pil = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    expected = tiny_pipe.preprocess_image(pil)
    assert expected.min() >= -1 and expected.max() <= 1
    torch.testing.assert_close(tiny_pipe.preprocess_image(np.array(pil)), expected)
    torch.testing.assert_close(tiny_pipe.preprocess_image(torch.from_numpy(np.array(pil)).permute(2, 0, 1)), expected)
    with pytest.raises(ValueError, match=r"`image` holds float values in \[.*\]; float images must be in \[0, 1\]"):
        tiny_pipe.preprocess_image(np.array(pil).astype(np.float32))


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(image_guidance_scale=float("inf")), "`image_guidance_scale` must be a finite number"),
     (dict(image_guidance_scale=float("nan")), "`image_guidance_scale` must be a finite number")],
)
def test_non_finite_image_guidance_is_refused(tiny_pipe, kwargs, match):
    import numpy as np

    with pytest.raises(ValueError, match=match):
        tiny_pipe("flip it", image=np.zeros((8, 8, 3), dtype=np.uint8), num_inference_steps=2, **kwargs)


def test_numpy_scalars_are_accepted_like_python_numbers(tiny_pipe):
    import numpy as np

    kw = dict(output_type="latent", generator=torch.manual_seed(0))
    python = tiny_pipe("a red square", height=8, num_inference_steps=2, guidance_scale=3.0, **kw).images
    kw["generator"] = torch.manual_seed(0)
    numpy = tiny_pipe("a red square", height=np.int64(8), num_inference_steps=np.int64(2),
                      guidance_scale=np.float32(3.0), **kw).images
    torch.testing.assert_close(numpy, python, rtol=0, atol=0)


def test_pipeline_variant_saves_load_and_local_folders_accept_hub_options(tmp_path):
    from modeling_monoformer import MonoFormerPipeline
    from tests.test_pipeline import make_pipe

    pipe = make_pipe()
    pipe.save_pretrained(tmp_path / "v", variant="fp16")
    assert (tmp_path / "v" / "vae" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert (tmp_path / "v" / "model" / "model.fp16.safetensors").is_file()  # the model too, not only the VAE
    loaded = MonoFormerPipeline.from_pretrained(tmp_path / "v", variant="fp16", use_safetensors=True,
                                                local_files_only=True, low_cpu_mem_usage=True)
    for a, b in zip(pipe.model.state_dict().values(), loaded.model.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(TypeError, match=r"Unexpected arguments .*\['not_an_option'\]"):
        MonoFormerPipeline.from_pretrained(tmp_path / "v", variant="fp16", not_an_option=1)


def test_processor_refuses_per_text_image_lists_that_do_not_match_the_markers(pixel_model):
    _, processor = pixel_model
    a, b, c = (torch.rand(3, 4, 4) for _ in range(3))
    with pytest.raises(ValueError, match=r"Text 0 has 1 `<image>` marker\(s\) but its list in `images` holds 2"):
        processor(text=["a<image>", "b<image><image>"], images=[[a, b], [c]])
    ok = processor(text=["a<image>", "b<image><image>"], images=[[a], [b, c]])
    assert ok["pixel_values"].shape[0] == 3


# ----------------------------------------------------------------------------------------------------------------------
# 17. Found by a review of the training and conversion scripts (2026-12-06)
# ----------------------------------------------------------------------------------------------------------------------
def test_a_tokenizer_without_a_pad_token_pads_with_eos():
    """Llama/Mistral tokenizers ship no pad token; batches and guidance branches are padded (pads are masked)."""
    tok = make_tokenizer()
    tok.pad_token = None
    processor = MonoFormerProcessor(MonoFormerImageProcessor(), tok)
    assert tok.pad_token == tok.eos_token
    batch = processor(text=["a photo of a bag", "a"], padding=True)
    assert batch["attention_mask"][1].sum() < batch["attention_mask"].shape[1]


def test_caption_samples_are_drawn_per_image_and_epoch():
    dataset = MonoFormerTrainingDataset([f"c{i}" for i in range(40)], [torch.zeros(1, 2, 2)] * 40, caption_ratio=0.3)
    per_epoch = []
    for epoch in range(3):
        dataset.set_epoch(epoch)
        per_epoch.append({i for i in range(40) if dataset[i]["task"] == "caption"})
    assert all(5 <= len(s) <= 20 for s in per_epoch)  # ~12 of 40 each epoch
    assert per_epoch[0] != per_epoch[1] != per_epoch[2]  # not the same images every epoch
    assert {i for i in range(40) if dataset[i]["task"] == "caption"} == per_epoch[2]  # deterministic per epoch


def test_16_bit_images_keep_their_grey_levels(tmp_path):
    import numpy as np
    from PIL import Image

    from modeling_monoformer.training_data_monoformer import image_to_tensor

    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)).save(path)
    x = image_to_tensor(str(path), MonoFormerImageProcessor(), 2)
    assert x.shape == (3, 4, 4) and x.abs().max() < 0.01  # mid-grey, not clipped to white
    Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)).save(tmp_path / "float.tiff")
    with pytest.raises(ValueError, match=r"Cannot read image .*float\.tiff.*floating-point"):
        image_to_tensor(str(tmp_path / "float.tiff"), MonoFormerImageProcessor(), 2)


def test_data_problems_are_named_before_training(assets, tmp_path, caplog):
    folder = make_imagefolder(tmp_path / "tagged", n=4)
    set_captions(folder, "an <image> tag")
    with pytest.raises(ValueError, match=r"The caption of .*000\.png.*contains \['<image>'\]"):
        train.main(script_args(assets, tmp_path / "out", steps=1) + ["--train_data_dir", str(folder)])
    texts = tmp_path / "texts.txt"
    texts.write_text("plain text\nhere <boi> starts\n")
    with pytest.raises(ValueError, match=r"Text sample 2 of .*texts\.txt.*contains \['<boi>'\]"):
        train.main(script_args(assets, tmp_path / "out", "--text_data_file", texts, "--text_ratio", "0.2", steps=1))
    with pytest.raises(ValueError, match=r"`--text_data_file .*` is given but `--text_ratio` is 0"):
        train.main(script_args(assets, tmp_path / "out", "--text_data_file", texts, steps=1))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metadata.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"metadata\.jsonl is empty"):
        load_image_caption_records(train_data_dir=str(empty))
    (tmp_path / "empty.txt").write_text("\n \n")
    from modeling_monoformer.training_data_monoformer import load_text_samples

    with pytest.raises(ValueError, match=r"`--text_data_file` .*empty\.txt' is empty"):
        load_text_samples(str(tmp_path / "empty.txt"))
    unlisted = make_imagefolder(tmp_path / "unlisted", n=4)
    (unlisted / "metadata.jsonl").write_text((unlisted / "metadata.jsonl").read_text().splitlines(True)[0])
    with caplog.at_level("WARNING"):
        assert len(load_image_caption_records(train_data_dir=str(unlisted))) == 1
    assert "3 image file(s)" in caplog.text and "no row in metadata.jsonl" in caplog.text


def test_a_lora_target_module_typo_is_refused(pixel_model):
    from modeling_monoformer import add_lora

    model, _ = pixel_model
    with pytest.raises(ValueError, match=r"`target_modules` \['foo_proj'\] name no module of the LLM"):
        add_lora(model, 4, target_modules="q_proj,foo_proj")
    add_lora(model, 4, target_modules="self_attn.q_proj,v_proj")  # dotted suffixes match as in PEFT


def test_resuming_with_another_model_setup_names_the_flag_and_moves_nothing(assets, tmp_path):
    out = tmp_path / "out"
    train.main(script_args(assets, out, "--checkpointing_steps", "2", steps=2))
    with pytest.raises(ValueError, match=r"another model setup: use_ema True \(checkpoint: False\)"):
        train.main(script_args(assets, out, "--use_ema", "--resume_from_checkpoint", "latest", steps=4))
    with pytest.raises(ValueError, match=r"another model setup: lora_rank 4 \(checkpoint: None\)"):
        train.main(script_args(assets, out, "--lora_rank", "4", "--resume_from_checkpoint", "latest", steps=4))
    assert checkpoint_names(out) == ["checkpoint-2"]  # nothing moved aside as abandoned
    train.main(script_args(assets, out, "--resume_from_checkpoint", "latest", steps=4))  # the same flags resume
    assert (out / "pipeline" / "model_index.json").is_file()


def test_an_llm_without_a_llama_style_body_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = make_tokenizer()
    n = len(tok)
    llm = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=n))
    with pytest.raises(ValueError, match="GPT2LMHeadModel has a GPT2Model body without `embed_tokens` and `layers`"):
        MonoFormerForConditionalGeneration.from_llm(llm, tokenizer=tok, latent_channels=3)
    assert len(tok) == n  # the user's tokenizer is untouched by the refusal


def test_packed_rows_longer_than_the_position_range_are_fine_when_positions_restart(pixel_model):
    from modeling_monoformer.packing_monoformer import pack_batch

    model, _ = pixel_model
    c = model.config
    limit = c.text_config.max_position_embeddings
    row = [5, 6] + _image_block(c, 4, 4)  # one sample; pack enough of them to pass the limit
    n = limit // len(row) + 2
    batch = dict(input_ids=torch.tensor([row] * n), attention_mask=torch.ones(n, len(row), dtype=torch.long),
                 labels=torch.tensor([row] * n), latents=torch.zeros(n, 3, 4, 4), timesteps=torch.full((n,), 500.0))
    packed = pack_batch(batch, max_length=n * len(row))
    assert packed["input_ids"].shape[1] > limit
    with torch.no_grad():
        model(**packed)  # positions restart per sample: no position past the range
    with pytest.raises(ValueError, match="more than the LLM's `max_position_embeddings`"):
        model(input_ids=packed["input_ids"], latents=batch["latents"], timesteps=batch["timesteps"])
