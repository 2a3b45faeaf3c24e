#!/usr/bin/env python
"""Fine-tune a MonoFormer on your own images and captions (full fine-tune or LoRA), with `accelerate`.

Data: a `datasets` imagefolder (`metadata.jsonl` with `file_name` + caption) or a JSONL of `{"text", "image"}`;
optionally a plain text file mixed in at `--text_ratio` to keep the LLM's language ability. Images are checked and
encoded with the VAE once (pixel-space models skip it) and the latents cached under `--cache_dir`.

Training: `MonoFormerDataCollator` draws noise, timesteps and targets from the checkpoint's diffusers scheduler and
drops prompts for classifier-free guidance; the model's own loss (`lm_loss_weight * lm + diffusion_loss_weight *
diffusion`) is minimised. Full fine-tune, or LoRA (`--lora_rank`, PEFT `get_peft_model`) on the LLM's projections with
the image heads trained fully (`modules_to_save`) and the `<boi>`/`<eoi>` rows of the embeddings trainable
(`trainable_token_indices`). Or image experts (`--image_experts full|lora`, or a checkpoint converted with them):
the LLM's text weights stay frozen (text-only output stays the base LLM's exactly) and only the image tokens' own
weights and the image heads train; checkpoints then hold the whole model. Mixed precision, gradient accumulation, activation checkpointing, EMA,
`--checkpointing_steps` / `--resume_from_checkpoint`, samples and a loss curve every `--validation_steps`.

Output (`--output_dir`): `checkpoint-<step>/` (accelerate state: model or adapter, optimizer, LR scheduler, RNG,
sampler, loss history), `samples/step-<step>.png`, `loss_curve.png`, `loss_history.json`, and at the end `pipeline/`
(a self-contained `MonoFormerPipeline` folder, LoRA merged, with a model card) plus `adapter/` for LoRA runs.

    # one process
    python examples/train_text_to_image.py --pretrained_model_name_or_path ./monoformer-base \\
        --train_data_dir ./my_images --resolution 32 --max_train_steps 200 --output_dir ./out
    # LoRA, two processes (on a CPU-only machine this uses gloo), push the result to the Hub
    accelerate launch --multi_gpu --num_processes 2 examples/train_text_to_image.py \\
        --pretrained_model_name_or_path ./monoformer-base --train_data_file data.jsonl --lora_rank 8 \\
        --output_dir ./out --push_to_hub --hub_model_id me/monoformer-lora
    # image experts (LMFusion) in bf16 autocast: the LLM's text is kept exactly
    python examples/train_text_to_image.py --pretrained_model_name_or_path ./monoformer-base \\
        --train_data_dir ./my_images --image_experts full --mixed_precision bf16 --output_dir ./out
"""

import argparse
import json
import logging
import math
import os
import pathlib
import re
import shutil
import sys
import time

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, ProjectConfiguration, set_seed
from tqdm.auto import tqdm

try:
    import modeling_monoformer  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from modeling_monoformer import (  # noqa: E402
    MonoFormerDataCollator,
    MonoFormerForConditionalGeneration,
    MonoFormerImageProcessor,
    MonoFormerProcessor,
    add_lora,
    default_noise_scheduler,
    enable_image_experts,
    freeze_text_weights,
)
from modeling_monoformer.lora_monoformer import DEFAULT_LORA_TARGET_MODULES  # noqa: E402
from modeling_monoformer.precision_monoformer import bf16_supported  # noqa: E402
from modeling_monoformer.training_data_monoformer import (  # noqa: E402
    MonoFormerTrainingDataset,
    check_no_special_tokens,
    encode_images,
    load_image_caption_records,
    load_text_samples,
)

logger = get_logger(__name__, log_level="INFO")

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TEMPORARY_RE = re.compile(r"^(checkpoint-\d+|pipeline|adapter)\.(tmp|delete)$")
OPTIMISATION_FLAGS = ("learning_rate", "lr_scheduler", "lr_warmup_steps", "adam_beta1", "adam_beta2",
                      "adam_weight_decay", "adam_epsilon", "max_grad_norm")


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    g = parser.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", required=True,
                   help="A MonoFormer checkpoint folder (model + processor [+ scheduler/], e.g. from "
                        "conversion/convert_llm_to_monoformer.py) or a saved MonoFormerPipeline folder.")
    g.add_argument("--vae", default=None, help="AutoencoderKL folder, for latent models whose folder has no vae/.")
    g.add_argument("--attn_implementation", default=None, choices=["eager", "sdpa", "flex_attention"],
                   help="Attention kernel passed to from_pretrained (default: transformers' choice, sdpa). On CPU "
                        "with short sequences 'eager' may be faster; measure it for your setup.")

    g = parser.add_argument_group("data")
    g.add_argument("--train_data_dir", default=None, help="A datasets imagefolder with a metadata.jsonl of captions.")
    g.add_argument("--train_data_file", default=None, help='A JSONL of {"text": ..., "image": path} (paths relative '
                                                            "to the file).")
    g.add_argument("--caption_column", default="text")
    g.add_argument("--image_column", default="image")
    g.add_argument("--max_train_samples", type=int, default=None)
    g.add_argument("--resolution", type=int, default=None,
                   help="Resize every image to this square size (a multiple of patch_size * vae_scale_factor); "
                        "default: keep each image's size.")
    g.add_argument("--text_data_file", default=None, help="Text-only samples: a .txt (one per line) or a JSONL.")
    g.add_argument("--text_column", default="text")
    g.add_argument("--text_ratio", type=float, default=0.0, help="Fraction of samples that are text-only.")
    g.add_argument("--caption_ratio", type=float, default=0.0,
                   help="Fraction of image samples trained image -> caption (understanding) instead of text -> image.")
    g.add_argument("--cfg_dropout", type=float, default=0.1, help="Prompt dropout for classifier-free guidance.")
    g.add_argument("--caption_word_dropout", type=float, default=0.0,
                   help="Drop each word of a text-to-image prompt with this probability (at least one stays): the "
                        "image path cannot key on one exact wording. No new words are made.")
    g.add_argument("--cache_dir", default=None, help="Where cached latents go (default: <output_dir>/latent_cache).")
    g.add_argument("--dataloader_num_workers", type=int, default=0)

    g = parser.add_argument_group("optimisation")
    g.add_argument("--train_batch_size", type=int, default=8, help="Per process.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--max_train_steps", type=int, default=None, help="Optimizer steps (overrides epochs).")
    g.add_argument("--num_train_epochs", type=int, default=1)
    g.add_argument("--max_train_minutes", type=float, default=None,
                   help="Also stop after this much training time (this run's wall-clock, checked every step): a "
                        "checkpoint and the pipeline are written as at the step limit. The LR schedule still spans "
                        "the step limit, so pair it with a constant schedule (and --use_ema) for a time-boxed run.")
    g.add_argument("--learning_rate", type=float, default=1e-4)
    g.add_argument("--lr_scheduler", default="constant",
                   help='"constant", "constant_with_warmup", "linear", "cosine", ... (diffusers get_scheduler).')
    g.add_argument("--lr_warmup_steps", type=int, default=0)
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=0.0)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
                   help="Default: accelerate's config / `accelerate launch --mixed_precision`.")
    g.add_argument("--gradient_checkpointing", action="store_true", help="Activation checkpointing of the LLM layers.")
    g.add_argument("--use_ema", action="store_true", help="Keep an EMA of the trained weights; it is what is saved.")
    g.add_argument("--ema_decay", type=float, default=0.9999)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--cpu", action="store_true", help="Train on CPU even if an accelerator is present.")

    g = parser.add_argument_group("LoRA (PEFT)")
    g.add_argument("--lora_rank", type=int, default=0, help="0: full fine-tune; > 0: LoRA of this rank.")
    g.add_argument("--lora_alpha", type=float, default=None, help="Default: equal to --lora_rank.")
    g.add_argument("--lora_dropout", type=float, default=0.0)
    g.add_argument("--lora_target_modules", default=",".join(DEFAULT_LORA_TARGET_MODULES),
                   help="Comma-separated module names inside the LLM (e.g. add gate_proj,up_proj,down_proj).")

    g = parser.add_argument_group("image experts (text weights frozen; exclusive with --lora_rank)")
    g.add_argument("--image_experts", default=None, choices=["full", "lora"],
                   help="Add image-token weights to a checkpoint saved without them: 'full' copies every layer's "
                        "attention, MLP and norms (LMFusion), 'lora' adds an image-only LoRA (Partial LoRA). A "
                        "checkpoint converted with `--image_experts` already has them (then this must match or be "
                        "left out). Either way only the image weights and heads train.")
    g.add_argument("--image_lora_rank", type=int, default=16)
    g.add_argument("--image_lora_alpha", type=float, default=None, help="Default: equal to --image_lora_rank.")

    g = parser.add_argument_group("checkpoints, samples, logging")
    g.add_argument("--output_dir", required=True)
    g.add_argument("--checkpointing_steps", type=int, default=500)
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep only this many checkpoints.")
    g.add_argument("--resume_from_checkpoint", default=None, help='A checkpoint folder or "latest".')
    g.add_argument("--validation_prompts", nargs="*", default=None,
                   help="Prompts for sample images (default: the first two captions).")
    g.add_argument("--validation_steps", type=int, default=500, help="Samples + loss curve every N steps (0: end only).")
    g.add_argument("--num_inference_steps", type=int, default=25)
    g.add_argument("--guidance_scale", type=float, default=4.0)
    g.add_argument("--logging_steps", type=int, default=10, help="Loss printed / curve points every N steps.")

    g = parser.add_argument_group("Hub")
    g.add_argument("--push_to_hub", action="store_true", help="Upload pipeline/ (with its model card) at the end.")
    g.add_argument("--hub_model_id", default=None, help="Repo id (default: the output folder's name).")
    g.add_argument("--hub_token", default=None, help="Default: the token from `hf auth login` / HF_TOKEN.")
    g.add_argument("--hub_private", action="store_true")

    args = parser.parse_args(argv)
    if (args.train_data_dir is None) == (args.train_data_file is None):
        parser.error("give exactly one of --train_data_dir or --train_data_file")
    if args.lora_rank < 0:
        parser.error(f"--lora_rank must be >= 0, got {args.lora_rank}")
    if args.lora_alpha is None:
        args.lora_alpha = float(args.lora_rank)
    if args.image_experts and args.lora_rank:
        parser.error("--image_experts and --lora_rank exclude each other: image experts keep the LLM's text weights "
                     "frozen, plain LoRA changes them for every token. Pick one.")
    if args.image_lora_alpha is None:
        args.image_lora_alpha = float(args.image_lora_rank)
    return args


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------------
def load_component(folder, config_name="scheduler_config.json"):
    """A saved diffusers scheduler or guider, of the class its config names."""
    import diffusers

    with open(os.path.join(folder, config_name)) as f:
        class_name = json.load(f)["_class_name"]
    return getattr(diffusers, class_name).from_pretrained(folder)


def load_base(path, vae_path=None, image_experts=None, image_lora_rank=16, image_lora_alpha=16.0,
              attn_implementation=None):
    """Model (float32), processor, scheduler and VAE (or None) from a checkpoint or a pipeline folder.

    The scheduler is the folder's own (a pipeline's may be a sampler such as DPM-Solver; `training_noise_scheduler`
    derives the training schedule from it).

    `image_experts` ("full" / "lora") gives a checkpoint saved without image experts its image weights, copied from
    its text weights; a checkpoint that has them keeps its own (a different mode is refused).
    """
    if not os.path.isdir(path):
        raise ValueError(f"`--pretrained_model_name_or_path` {path!r} is not a folder.")
    is_pipeline = os.path.isfile(os.path.join(path, "model_index.json"))
    model_dir = os.path.join(path, "model") if is_pipeline else path
    model = MonoFormerForConditionalGeneration.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation=attn_implementation
    )
    if image_experts and model.config.image_experts == "none":
        enable_image_experts(model, image_experts, image_lora_rank, image_lora_alpha)
    elif image_experts and model.config.image_experts != image_experts:
        raise ValueError(
            f"`--image_experts {image_experts}`, but {path!r} was saved with image_experts="
            f"{model.config.image_experts!r}: leave the flag out to train the checkpoint's own image weights."
        )
    processor = MonoFormerProcessor.from_pretrained(os.path.join(path, "processor") if is_pipeline else path)
    processor.configure_for_model(model.config)
    scheduler_dir = os.path.join(path, "scheduler")
    if os.path.isfile(os.path.join(scheduler_dir, "scheduler_config.json")):
        scheduler = load_component(scheduler_dir)
    else:
        scheduler = default_noise_scheduler(
            model.config.prediction_type, model.config.num_train_timesteps, model.config.learn_sigma
        )
    vae = None
    vae_dir = vae_path or (os.path.join(path, "vae") if is_pipeline else None)
    if vae_dir is not None and os.path.isdir(vae_dir):
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(vae_dir).eval().requires_grad_(False)
    elif vae_path is not None:
        raise ValueError(f"`--vae` {vae_path!r} is not a folder.")
    if vae is None and model.config.vae_scale_factor != 1:
        raise ValueError(
            f"{path!r} is a latent model (`vae_scale_factor`={model.config.vae_scale_factor}) without a vae/ folder: "
            "pass `--vae` (the AutoencoderKL it was trained with)."
        )
    return model, processor, scheduler, vae


def training_noise_scheduler(scheduler, config):
    """The schedule training noise is drawn from: `scheduler` itself when it is one the collator draws from
    (FlowMatch for flow models; a DDPM-family scheduler with `add_noise` otherwise), else the model's default one,
    `default_noise_scheduler(config)`. A saved pipeline's sampler (e.g. DPM-Solver++ with flow sigmas, which has no
    `scale_noise`) then still trains, and the output pipeline keeps that sampler."""
    if config.prediction_type == "flow":
        fits = "FlowMatch" in type(scheduler).__name__
    else:  # v-prediction targets also need get_velocity
        fits = hasattr(scheduler, "add_noise") and (
            config.prediction_type == "epsilon" or hasattr(scheduler, "get_velocity")
        )
    if fits:
        return scheduler
    return default_noise_scheduler(config.prediction_type, config.num_train_timesteps, config.learn_sigma)


def load_sampler_settings(path) -> dict:
    """`guider` and `default_num_inference_steps` of a saved pipeline folder (empty for a model checkpoint), so a
    pipeline trained further keeps the sampler settings it was tuned with."""
    index_file = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_file):
        return {}
    with open(index_file) as f:
        index = json.load(f)
    settings = {}
    if "default_num_inference_steps" in index:
        settings["default_num_inference_steps"] = index["default_num_inference_steps"]
    guider_dir = os.path.join(path, "guider")
    if os.path.isfile(os.path.join(guider_dir, "guider_config.json")):
        settings["guider"] = load_component(guider_dir, "guider_config.json")
    return settings


def training_method(args, config) -> str:
    """What a run trains, in words (log line and model card)."""
    if config.image_experts == "full":
        return "image experts (full copy per layer, LMFusion; text weights frozen)"
    if config.image_experts == "lora":
        return f"image-only LoRA (rank {config.image_lora_rank}, Partial LoRA; text weights frozen)"
    return f"LoRA (rank {args.lora_rank})" if args.lora_rank else "full fine-tune"


def build_pipeline(model, vae, scheduler, processor, **sampler_settings):
    """A `MonoFormerPipeline` around `model` (imported here: the pipeline module is optional for training);
    `sampler_settings`: `guider`, `default_num_inference_steps` (from `load_sampler_settings`)."""
    from modeling_monoformer.pipeline_monoformer import MonoFormerPipeline

    sampler = type(scheduler).from_config(scheduler.config)
    pipe = MonoFormerPipeline(model=model, vae=vae, scheduler=sampler, processor=processor, **sampler_settings)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def save_samples(pipe, prompts, path, image_size, num_inference_steps, guidance_scale, seed=0):
    """One image per prompt (fixed seed), side by side in one PNG."""
    from PIL import Image

    was_training = pipe.model.training
    pipe.model.eval()
    images = pipe(
        list(prompts), height=image_size[0], width=image_size[1], num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(seed),
    ).images
    pipe.model.train(was_training)
    grid = Image.new("RGB", (sum(im.width for im in images), max(im.height for im in images)))
    x = 0
    for im in images:
        grid.paste(im.convert("RGB"), (x, 0))
        x += im.width
    os.makedirs(os.path.dirname(path), exist_ok=True)
    grid.save(path)
    return path


def plot_losses(history: list[dict], path: str) -> bool:
    """Loss curves (total, LM, diffusion) against the step; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [h["step"] for h in history]
    for key in ("loss", "lm_loss", "diffusion_loss"):
        values = [h.get(key) for h in history]
        if any(v is not None for v in values):
            ax.plot(steps, [float("nan") if v is None else v for v in values], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def summarise_losses(history: list[dict]) -> dict:
    """Mean of the first and last ~10% of logged steps for each loss."""
    out = {}
    window = max(1, len(history) // 10)
    for key in ("loss", "lm_loss", "diffusion_loss"):
        values = [h[key] for h in history if h.get(key) is not None]
        if values:
            out[key] = (sum(values[:window]) / len(values[:window]), sum(values[-window:]) / len(values[-window:]))
    return out


def portable_path(path: str) -> str:
    """A path as a model card may show it: absolute paths (this machine's) shortened to their last two parts."""
    if not path or not os.path.isabs(path):
        return path
    return os.path.join(*pathlib.PurePath(os.path.normpath(path)).parts[-2:])


def describe_learning_rates(settings: list[dict], last_step: int) -> str:
    """`0.001`, or `0.003 (steps 1-4), 0.001 (steps 5-8)` when a resumed run changed it."""
    rates = [(s["from_step"], s["learning_rate"]) for s in settings]
    if len({lr for _, lr in rates}) == 1:
        return f"{rates[0][1]}"
    ends = [start - 1 for start, _ in rates[1:]] + [last_step]
    return ", ".join(f"{lr} (steps {start}-{end})" for (start, lr), end in zip(rates, ends))


def write_model_card(folder, info: dict) -> str:
    """README.md for the trained pipeline: base LLM, data, steps, losses, how to load."""
    from huggingface_hub import ModelCard

    losses = "\n".join(
        f"| {k} | {first:.4f} | {last:.4f} |" for k, (first, last) in info["losses"].items()
    ) or "| - | - | - |"
    hub_id = info.get("base_llm_hub_id")
    base_model_meta = f"base_model: {hub_id}\n" if hub_id and re.fullmatch(r"[\w.-]+/[\w.-]+", hub_id) else ""
    method = info["method"]
    content = f"""---
library_name: diffusers
pipeline_tag: text-to-image
{base_model_meta}tags:
- monoformer
- text-to-image
- diffusers
- trust-remote-code
---

# {info['name']}

A [MonoFormer](https://arxiv.org/abs/2409.16280) pipeline: one causal LLM that writes text and paints images by
diffusion, fine-tuned with `examples/train_text_to_image.py` ({method}).

| | |
|---|---|
| base LLM | `{info['base_llm']}` ({info['llm_type']}, {info['num_params'] / 1e6:.1f} M parameters) |
| base checkpoint | `{info['base_checkpoint']}` |
| data | `{info['data']}`: {info['num_images']} images, {info['num_text']} text-only samples |
| steps | {info['steps']} (global batch {info['global_batch']}, learning rate {info['learning_rate']}) |
| objective | `{info['prediction_type']}`, scheduler `{info['scheduler']}` |

| loss | first steps | last steps |
|---|---|---|
{losses}

## Use

```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{info['repo_or_path']}", trust_remote_code=True)
image = pipe("{info['example_prompt']}", generator=torch.manual_seed(0)).images[0]
```
"""
    card = ModelCard(content)
    path = os.path.join(folder, "README.md")
    card.save(path)
    return path


def push_to_hub(folder, repo_id, token=None, private=False, commit_message="Upload MonoFormer pipeline"):
    """Upload a saved pipeline folder (safetensors weights, code files, processor, scheduler, model card)."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)
    return repo_id


def running_names(values) -> str:
    """`loss 1.2345, lm 0.1234, diffusion 1.1111` (a part the model did not return is left out)."""
    return ", ".join(f"{k} {v:.4f}" for k, v in zip(("loss", "lm", "diffusion"), values) if v is not None)


def list_checkpoints(output_dir) -> list[tuple[int, str]]:
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), os.path.join(output_dir, name))
             for name in os.listdir(output_dir) if (m := CHECKPOINT_RE.match(name)) and os.path.isdir(
                 os.path.join(output_dir, name))]
    return sorted(found)


def remove_stale_temporaries(output_dir) -> list[str]:
    """Delete what a killed run left half-written (`checkpoint-<N>.tmp/`, `pipeline.tmp/`, `adapter.tmp/`) or
    half-deleted (`*.delete/`): a later save must never reuse, and carry over, a partial file."""
    if not os.path.isdir(output_dir):
        return []
    stale = sorted(name for name in os.listdir(output_dir) if TEMPORARY_RE.match(name))
    for name in stale:
        shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    return stale


def move_aside_newer_checkpoints(output_dir, step: int) -> str | None:
    """Checkpoints after `step` belong to a run this one abandons (it resumed from an older checkpoint, or started
    afresh): left in place, `--checkpoints_total_limit` would delete the new checkpoints first and a later
    `--resume_from_checkpoint latest` would silently go back to the abandoned run. Move them into
    `abandoned-<time>/` and return that folder (None when there were none)."""
    newer = [path for s, path in list_checkpoints(output_dir) if s > step]
    if not newer:
        return None
    folder = os.path.join(output_dir, "abandoned-" + time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(folder, exist_ok=True)
    for path in newer:
        os.replace(path, os.path.join(folder, os.path.basename(path)))
    return folder


def replace_folder(tmp: str, final: str) -> None:
    """Put a fully written `tmp` folder at `final`; a crash at any point never leaves a partial folder under `final`."""
    if os.path.isdir(final):
        os.replace(final, final + ".delete")
    os.replace(tmp, final)
    delete_folder(final + ".delete")


def delete_folder(path: str) -> None:
    """Rename, then delete: a crash during the deletion leaves a `*.delete` folder (removed at the next start), never
    a half-deleted folder under a checkpoint's name."""
    if os.path.isdir(path) and not path.endswith(".delete"):
        os.replace(path, path + ".delete")
        path += ".delete"
    shutil.rmtree(path, ignore_errors=True)


def check_batch_shape(saved: dict | None, current: dict, checkpoint: str) -> None:
    """A checkpoint's place in the data is counted in batches of its own shape: resuming with another batch size,
    accumulation or process count would skip the wrong samples, so it is refused rather than applied silently."""
    changed = [f"{k} {current[k]} (checkpoint: {v})" for k, v in (saved or {}).items() if current.get(k) != v]
    if changed:
        raise ValueError(
            f"`--resume_from_checkpoint` {checkpoint} was trained with another batch shape: {', '.join(changed)}. "
            "Resume with the checkpoint's `--train_batch_size`, `--gradient_accumulation_steps` and number of "
            "processes, or start a new run (without `--resume_from_checkpoint`) from its `pipeline/` model."
        )


def check_model_setup(checkpoint: str, current: dict) -> None:
    """A checkpoint holds the trainable modules of its run: another `--use_ema`, `--lora_rank`,
    `--lora_target_modules` or image-expert setup cannot load it, and would otherwise read as a damaged checkpoint
    (and "latest" would fall back, then give up). Refused by name before anything is loaded or moved."""
    try:
        with open(os.path.join(checkpoint, "training_state.json")) as f:
            saved = json.load(f).get("model_setup")
    except (OSError, ValueError):
        return  # unreadable: the loader reports the checkpoint as damaged and falls back
    changed = [f"{k} {current.get(k)!r} (checkpoint: {v!r})" for k, v in (saved or {}).items() if current.get(k) != v]
    if changed:
        raise ValueError(
            f"`--resume_from_checkpoint`: {checkpoint} was trained with another model setup: {', '.join(changed)}. "
            "Resume with the checkpoint's flags, or start a new run (without `--resume_from_checkpoint`, in another "
            "`--output_dir`) from its `pipeline/` model."
        )


def optimisation_settings(args) -> dict:
    """The flags that shape optimisation; a checkpoint records them so a resumed run can say what changed."""
    return {name: getattr(args, name) for name in OPTIMISATION_FLAGS}


def apply_optimisation_settings(optimizer, lr_scheduler, args) -> None:
    """Put the command line's optimiser hyper-parameters in place of the ones `load_state` restored.

    The learning-rate schedule's shape (`--lr_scheduler`, `--lr_warmup_steps`) always follows the command line (its
    functions are rebuilt, not saved); its base rate and AdamW's betas, weight decay and epsilon come back with the
    optimizer state, so they are set here, and the current rate is recomputed at the restored schedule position.
    """
    schedule = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate wraps it
    schedule.base_lrs = [args.learning_rate] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, schedule.lr_lambdas):
        group.update(betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay,
                     eps=args.adam_epsilon, initial_lr=args.learning_rate)
        group["lr"] = args.learning_rate * factor(schedule.last_epoch)
    schedule._last_lr = [group["lr"] for group in optimizer.param_groups]


def check_checkpoint_files(path: str, process_index: int) -> None:
    """Raise if a file this process needs from the checkpoint is missing or unreadable (accelerate skips a missing
    RNG state silently, which would make the resumed run draw different random numbers)."""
    from accelerate.utils import load

    for name in ("loss_history.json", "training_state.json", f"random_states_{process_index}.pkl"):
        if not os.path.isfile(os.path.join(path, name)):
            raise FileNotFoundError(f"{name} is missing")
    load(os.path.join(path, f"random_states_{process_index}.pkl"))


def check_sequence_lengths(records, latents, processor, config):
    """Refuse, before training, a sample whose caption + image is longer than the LLM's context."""
    max_positions = getattr(config.text_config, "max_position_embeddings", None)
    if max_positions is None:
        return
    for record, latent in zip(records, latents):
        n_text = len(processor.tokenizer(record["text"])["input_ids"])
        n_total = n_text + config.num_image_tokens(*latent.shape[-2:]) + 3  # <boi> <eoi> <eos>
        if n_total > max_positions:
            raise ValueError(
                f"Image {record['image_path']!r} with its caption needs {n_total} tokens, more than the LLM's "
                f"max_position_embeddings={max_positions}: lower `--resolution` or shorten the caption."
            )


# ----------------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    start_time = time.time()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        project_config=ProjectConfiguration(project_dir=args.output_dir),
        # A CPU-only machine: gloo under `accelerate launch --multi_gpu` / torchrun (accelerate needs cpu=True for it).
        cpu=args.cpu or not torch.accelerator.is_available(),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        # Text-only / caption-only batches leave the image heads without gradients.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    set_seed(args.seed)
    if accelerator.mixed_precision == "bf16" and not bf16_supported(accelerator.device):
        logger.warning(
            f"bf16 mixed precision on {accelerator.device}, which has no native bfloat16 matmuls (on a CPU: no "
            "AVX512-BF16 or AMX): they are emulated and run several times slower than float32. Drop "
            "`--mixed_precision bf16` (or pass `--mixed_precision no`) on this machine."
        )
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)

    # ---- data records first: a wrong column or path fails before any model is loaded
    records = load_image_caption_records(
        args.train_data_dir, args.train_data_file, args.caption_column, args.image_column, args.max_train_samples
    )
    if args.text_data_file and not args.text_ratio:
        raise ValueError(
            f"`--text_data_file {args.text_data_file}` is given but `--text_ratio` is 0, so no text would be mixed in: "
            "set `--text_ratio` (e.g. 0.1) or drop the file."
        )
    texts = load_text_samples(args.text_data_file, args.text_column) if args.text_data_file else None

    # ---- model, processor, scheduler, VAE
    model, processor, noise_scheduler, vae = load_base(
        args.pretrained_model_name_or_path, args.vae, args.image_experts, args.image_lora_rank, args.image_lora_alpha,
        args.attn_implementation,
    )
    config = model.config
    image_tokens = [processor.boi_token, processor.eoi_token, processor.image_token]
    check_no_special_tokens([r["text"] for r in records], image_tokens,
                            lambda i: f"The caption of {records[i]['image_path']!r}")
    check_no_special_tokens(texts or [], image_tokens, lambda i: f"Text sample {i + 1} of {args.text_data_file!r}")
    sampler_settings = load_sampler_settings(args.pretrained_model_name_or_path)
    if config.image_experts != "none" and args.lora_rank:
        raise ValueError(
            f"{args.pretrained_model_name_or_path!r} has image_experts={config.image_experts!r}: its text weights stay "
            "frozen, so plain LoRA (`--lora_rank`) does not apply. Drop `--lora_rank`."
        )
    if config.image_experts != "none" and args.text_ratio > 0:
        # A text-only sample reaches no trainable weight (and an all-text batch would leave DDP without a backward).
        raise ValueError(
            f"`--text_ratio {args.text_ratio}` with image experts: the text weights are frozen, so text-only samples "
            "train nothing (the LLM's text is kept exactly by construction). Use `--text_ratio 0`; captioning "
            "samples (`--caption_ratio`) do train the image weights."
        )
    num_channels = vae.config.in_channels if vae is not None else config.latent_channels
    resize = {"do_resize": True, "size": {"height": args.resolution, "width": args.resolution}} if args.resolution else {}
    image_processor = MonoFormerImageProcessor(num_channels=num_channels, **resize)

    # ---- latents: encoded once by the main process, read from the cache by the others (and by resumed runs)
    cache_dir = args.cache_dir or os.path.join(args.output_dir, "latent_cache")
    with accelerator.main_process_first():
        latents = encode_images(
            records, image_processor, config, vae=vae, cache_dir=cache_dir,
            show_progress=accelerator.is_local_main_process,
        )
    check_sequence_lengths(records, latents, processor, config)
    dataset = MonoFormerTrainingDataset(
        [r["text"] for r in records], latents, texts, args.text_ratio, args.caption_ratio, seed=args.seed
    )
    collator = MonoFormerDataCollator(
        processor, training_noise_scheduler(noise_scheduler, config), config.prediction_type,
        cfg_dropout=args.cfg_dropout, seed=args.seed,
        caption_word_dropout=args.caption_word_dropout,
    )
    dataloader = torch.utils.data.DataLoader(
        dataset, batch_size=args.train_batch_size, shuffle=True, collate_fn=collator,
        num_workers=args.dataloader_num_workers, drop_last=len(dataset) >= args.train_batch_size * accelerator.num_processes,
    )

    # ---- what is trained
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()
    if args.lora_rank:
        model = add_lora(model, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_target_modules)
        inner_model = model.base_model.model  # LoRA layers are injected in place: sampling uses this one
    else:
        inner_model = model
        if config.image_experts != "none":  # the LLM's text weights stay frozen: text output stays exactly the LLM's
            freeze_text_weights(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    num_trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(
        params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay, eps=args.adam_epsilon,
    )
    ema = None
    if args.use_ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=args.ema_decay)
        accelerator.register_for_checkpointing(ema)

    if args.lora_rank:  # checkpoints hold the adapter, not a copy of the frozen base model
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        def save_model_hook(models, weights, output_dir):
            if accelerator.is_main_process:
                for m in models:
                    accelerator.unwrap_model(m).save_pretrained(os.path.join(output_dir, "adapter"))
            while weights:
                weights.pop()

        def load_model_hook(models, input_dir):
            while models:
                m = accelerator.unwrap_model(models.pop())
                state = load_file(os.path.join(input_dir, "adapter", "adapter_model.safetensors"))
                result = set_peft_model_state_dict(m, state)
                if result.unexpected_keys:
                    raise ValueError(f"Checkpoint {input_dir!r}: unexpected adapter keys {result.unexpected_keys}.")

        accelerator.register_save_state_pre_hook(save_model_hook)
        accelerator.register_load_state_pre_hook(load_model_hook)

    from diffusers.optimization import get_scheduler

    model, optimizer, dataloader = accelerator.prepare(model, optimizer, dataloader)
    steps_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )
    lr_scheduler = accelerator.prepare(lr_scheduler)
    if ema is not None:
        ema.to(accelerator.device)

    global_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    batch_shape = {"train_batch_size": args.train_batch_size, "num_processes": accelerator.num_processes,
                   "gradient_accumulation_steps": args.gradient_accumulation_steps}
    model_setup = {"use_ema": bool(args.use_ema), "lora_rank": args.lora_rank or None,
                   "lora_target_modules": args.lora_target_modules if args.lora_rank else None,
                   "image_experts": config.image_experts,
                   "image_lora_rank": config.image_lora_rank if config.image_experts == "lora" else None}
    logger.info(
        f"{len(records)} images, {dataset.num_text} text samples, {accelerator.num_processes} process(es), global "
        f"batch {global_batch}, {max_train_steps} steps, {training_method(args, config)}"
        f": {num_trainable / 1e6:.3f} M trainable parameters"
    )

    # ---- resume
    global_step, first_epoch, skip_batches, history = 0, 0, 0, []
    settings = [{"from_step": 1, **optimisation_settings(args)}]  # what each stretch of steps was trained with

    def load_checkpoint(path) -> bool:
        """Load `path` on every process; False (each reason logged) if any process could not."""
        error = None
        try:
            check_checkpoint_files(path, accelerator.process_index)
            accelerator.load_state(path)
        except Exception as err:  # a truncated or missing file: "latest" falls back to the previous checkpoint
            error = err
            logger.warning(f"Cannot resume from {path}: {type(err).__name__}: {err}", main_process_only=False)
        failed = accelerator.gather(torch.tensor([float(error is not None)], device=accelerator.device)).sum()
        return failed.item() == 0

    if args.resume_from_checkpoint:
        if args.resume_from_checkpoint == "latest":
            candidates = [path for _, path in reversed(list_checkpoints(args.output_dir))]
            if not candidates:
                logger.info("No checkpoint in the output folder: starting from the base model.")
        else:
            candidates = [args.resume_from_checkpoint]
            if not os.path.isdir(candidates[0]) or not CHECKPOINT_RE.match(os.path.basename(os.path.normpath(
                    candidates[0]))):
                raise ValueError(f"`--resume_from_checkpoint` {candidates[0]!r} is not a checkpoint-<step> folder.")
        resumed = None
        for i, path in enumerate(candidates):
            check_model_setup(path, model_setup)
            if load_checkpoint(path):
                resumed = path
                break
            if i + 1 < len(candidates):
                logger.warning(f"Falling back to the previous checkpoint, {candidates[i + 1]}.")
        if candidates and resumed is None:
            raise ValueError(
                f"`--resume_from_checkpoint {args.resume_from_checkpoint}`: no loadable checkpoint "
                f"({', '.join(os.path.basename(c) for c in candidates)}; the reasons are logged above). Pass an "
                "intact checkpoint folder, or drop the flag to start from the base model."
            )
        if resumed is not None:
            global_step = int(CHECKPOINT_RE.match(os.path.basename(os.path.normpath(resumed))).group(1))
            with open(os.path.join(resumed, "loss_history.json")) as f:
                history = json.load(f)
            with open(os.path.join(resumed, "training_state.json")) as f:
                state = json.load(f)
            settings = state["optimisation"]
            check_batch_shape(state.get("batch_shape"), batch_shape, resumed)
            current = optimisation_settings(args)
            changed = [f"--{k} {v} (checkpoint: {settings[-1].get(k)})" for k, v in current.items()
                       if settings[-1].get(k) != v]
            if changed:
                apply_optimisation_settings(optimizer, lr_scheduler, args)
                settings.append({"from_step": global_step + 1, **current})
                logger.warning(
                    f"Resuming with changed settings, used from step {global_step + 1}: {', '.join(changed)}."
                )
            first_epoch = global_step // steps_per_epoch
            skip_batches = (global_step % steps_per_epoch) * args.gradient_accumulation_steps
            logger.info(f"Resumed from {resumed} at step {global_step}")
            if ema is not None:  # its state is unpickled on the CPU; the trained weights sit on the accelerator
                ema.to(accelerator.device)
    if accelerator.is_main_process:
        stale = remove_stale_temporaries(args.output_dir)
        if stale:
            logger.warning(f"Removed what an interrupted run left half-written: {', '.join(stale)}.")
        abandoned = move_aside_newer_checkpoints(args.output_dir, global_step)
        if abandoned:
            logger.warning(
                f"Checkpoints after step {global_step} belong to an abandoned (or unreadable) run: moved them to "
                f"{abandoned} so that they are neither resumed nor counted by --checkpoints_total_limit. Delete the "
                "folder once you no longer need it."
            )
    accelerator.wait_for_everyone()

    def save_checkpoint(step):
        final = os.path.join(args.output_dir, f"checkpoint-{step}")
        tmp = final + ".tmp"
        accelerator.save_state(tmp)
        accelerator.wait_for_everyone()  # every process has written its part (its RNG state) before the rename
        if accelerator.is_main_process:
            with open(os.path.join(tmp, "loss_history.json"), "w") as f:
                json.dump(history, f)
            with open(os.path.join(tmp, "training_state.json"), "w") as f:
                json.dump({"optimisation": settings, "batch_shape": batch_shape, "model_setup": model_setup}, f)
            replace_folder(tmp, final)  # a crash while saving never damages the previous checkpoints
            if args.checkpoints_total_limit:
                for _, old in list_checkpoints(args.output_dir)[: -args.checkpoints_total_limit]:
                    delete_folder(old)
        accelerator.wait_for_everyone()

    prompts = args.validation_prompts or [r["text"] for r in records[:2]]
    pixel_size = tuple(int(s) * config.vae_scale_factor for s in latents[0].shape[-2:])

    def write_samples_and_curve(step):
        if not accelerator.is_main_process:
            return
        if ema is not None:
            ema.store(params)
            ema.copy_to(params)
        pipe = build_pipeline(inner_model, vae, noise_scheduler, processor)
        save_samples(pipe, prompts, os.path.join(args.output_dir, "samples", f"step-{step:06d}.png"), pixel_size,
                     args.num_inference_steps, args.guidance_scale, seed=args.seed)
        if ema is not None:
            ema.restore(params)
        history_file = os.path.join(args.output_dir, "loss_history.json")
        with open(history_file + ".tmp", "w") as f:
            json.dump(history, f)
        os.replace(history_file + ".tmp", history_file)
        if not plot_losses(history, os.path.join(args.output_dir, "loss_curve.png")):
            logger.warning("matplotlib is not installed: no loss_curve.png (pip install matplotlib).")

    # ---- train
    progress = tqdm(range(max_train_steps), initial=global_step, desc="steps",
                    disable=not accelerator.is_local_main_process)
    nan = torch.tensor(float("nan"), device=accelerator.device)
    running = torch.zeros(3, device=accelerator.device)
    train_start, steps_this_run = time.time(), 0

    def time_is_up() -> bool:
        """The same answer on every process (the main process's clock decides)."""
        if args.max_train_minutes is None:
            return False
        flag = torch.tensor(float(time.time() - train_start >= 60 * args.max_train_minutes), device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="max").item())

    time_up = False
    for epoch in range(first_epoch, num_epochs):
        if global_step >= max_train_steps or time_up:
            break
        dataloader.set_epoch(epoch)  # the sampler's permutation
        dataset.set_epoch(epoch)  # the per-sample noise seeds (accelerate does not forward it in every mode)
        batches = accelerator.skip_first_batches(dataloader, skip_batches) if skip_batches else dataloader
        skip_batches = 0
        for batch in batches:
            with accelerator.accumulate(model):
                out = model(**batch, logits_to_keep=1)  # the loss needs no logits tensor over every position
                accelerator.backward(out.loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            parts = [out.loss, out.lm_loss, out.diffusion_loss]
            parts = torch.stack([nan if p is None else p.detach().float() for p in parts])
            running += accelerator.gather(parts.unsqueeze(0)).nanmean(0) / args.gradient_accumulation_steps
            if not accelerator.sync_gradients:
                continue
            if ema is not None:
                ema.step(params)
            global_step += 1
            steps_this_run += 1
            values = [None if math.isnan(v) else v for v in running.tolist()]
            running.zero_()
            if values[0] is None or math.isinf(values[0]):  # the same gathered value on every process
                raise FloatingPointError(
                    f"The loss is not finite at step {global_step} ({running_names(values)}): training diverged. "
                    "Lower `--learning_rate` (or raise `--lr_warmup_steps`) and resume from the last checkpoint "
                    "with `--resume_from_checkpoint latest`."
                )
            history.append({"step": global_step, "loss": values[0], "lm_loss": values[1],
                            "diffusion_loss": values[2], "lr": lr_scheduler.get_last_lr()[0]})
            progress.update(1)
            progress.set_postfix(loss=f"{values[0]:.4f}")
            if args.logging_steps and global_step % args.logging_steps == 0:
                logger.info(f"step {global_step}: {running_names(values)}")
            if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
                save_checkpoint(global_step)
            if args.validation_steps and global_step % args.validation_steps == 0:
                write_samples_and_curve(global_step)
            if global_step >= max_train_steps:
                break
            time_up = time_is_up()
            if time_up:
                logger.info(f"--max_train_minutes {args.max_train_minutes} reached at step {global_step}.")
                if not (args.checkpointing_steps and global_step % args.checkpointing_steps == 0):
                    save_checkpoint(global_step)  # resumable from exactly here
                break
    progress.close()
    train_seconds = time.time() - train_start

    # ---- final: samples, curve, adapter, self-contained pipeline folder with a model card, Hub
    accelerator.wait_for_everyone()
    result = {"global_step": global_step, "history": history, "steps_per_second": steps_this_run / train_seconds
              if train_seconds > 0 else None, "output_dir": args.output_dir}
    if accelerator.is_main_process:
        if not args.validation_steps or global_step % args.validation_steps:
            write_samples_and_curve(global_step)
        unwrapped = accelerator.unwrap_model(model)
        if ema is not None:
            ema.copy_to(params)
        if args.lora_rank:
            adapter_dir = os.path.join(args.output_dir, "adapter")
            unwrapped.save_pretrained(adapter_dir + ".tmp")
            replace_folder(adapter_dir + ".tmp", adapter_dir)
            final_model = unwrapped.merge_and_unload()
        else:
            final_model = unwrapped
        if args.gradient_checkpointing:
            final_model.activation_checkpointing_disable()
        final_model.eval()
        sizes = {tuple(x.shape[-2:]) for x in latents}
        if len(sizes) == 1 and len({*next(iter(sizes))}) == 1:  # one square size: the pipeline's default
            final_model.config.sample_size = next(iter(sizes))[0]
        pipeline_dir = os.path.join(args.output_dir, "pipeline")
        build_pipeline(final_model, vae, noise_scheduler, processor, **sampler_settings).save_pretrained(
            pipeline_dir + ".tmp"
        )
        text_config = config.text_config
        base_llm = (getattr(text_config, "_name_or_path", "") or getattr(config, "_name_or_path", "")
                    or args.pretrained_model_name_or_path)
        info = {
            "base_llm_hub_id": None if os.path.exists(base_llm) else base_llm,
            "name": args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir)),
            "base_llm": portable_path(base_llm),
            "llm_type": text_config.model_type,
            "num_params": sum(p.numel() for p in final_model.parameters()),
            "base_checkpoint": portable_path(args.pretrained_model_name_or_path),
            "data": portable_path(args.train_data_dir or args.train_data_file),
            "num_images": len(records),
            "num_text": dataset.num_text,
            "steps": global_step,
            "global_batch": global_batch,
            "learning_rate": describe_learning_rates(settings, global_step),
            "prediction_type": config.prediction_type,
            "scheduler": type(noise_scheduler).__name__,
            "lora_rank": args.lora_rank,
            "method": training_method(args, config) + (", merged" if args.lora_rank else ""),
            "losses": summarise_losses(history),
            "repo_or_path": args.hub_model_id or portable_path(pipeline_dir),
            "example_prompt": prompts[0].replace('"', "'") if prompts else "a photo",
        }
        write_model_card(pipeline_dir + ".tmp", info)
        replace_folder(pipeline_dir + ".tmp", pipeline_dir)
        result["pipeline_dir"] = pipeline_dir
        if args.push_to_hub:
            repo_id = args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir))
            result["repo_id"] = push_to_hub(pipeline_dir, repo_id, token=args.hub_token, private=args.hub_private)
            logger.info(f"Pushed to https://huggingface.co/{result['repo_id']}")
        logger.info(f"Done: {global_step} steps, {result['steps_per_second']:.2f} steps/s this run, "
                    f"{time.time() - start_time:.0f} s in all; pipeline in {pipeline_dir}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


if __name__ == "__main__":
    main()
