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
    collator = MonoFormerDataCollator(processor, train.default_noise_scheduler(model.config), "epsilon", seed=0)
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
