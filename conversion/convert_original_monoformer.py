#!/usr/bin/env python
r"""Convert the original MonoFormer release (github.com/MonoFormer/MonoFormer, HF `MonoFormer/MonoFormer_ImageNet_256`)
into this package's format.

The release's `config.json` says `model_type: "llama"`, so `AutoModel` would load a plain Llama and silently drop the
image heads; this script reads the weights (`model.safetensors`, a sharded index, or `pytorch_model.bin` through
`torch.load(weights_only=True)`) and the config directly and:

* detects the timestep conditioning from the keys: `adaLN_module.1.*` -> `adaln_before_decoder` (the released
  checkpoint) becomes `timestep_conditioning="adaln"`; `t_projector.{0,2}.*` -> `add_before_image_tokens` (the repo's
  configs) becomes `"token"` (the timestep token is the first `<image>` placeholder, causal, as in the original);
* maps every key (a key left over, a key missing or a wrong shape stops the conversion with its name);
* keeps the head's `(ph, pw, c)` output order and the adaLN chunk order (shift first, then scale) unchanged, since the
  MonoFormer modules use the same conventions; `learn_sigma` carries over (8 output channels: eps + variance);
* recomputes the 2D sin-cos position embedding (not stored in the release) and checks it equals DiT's table;
* carries the tokenizer with its added tokens (`<PAD>`, `<image>`, `<|im_start|>` = boi, `<|im_end|>` = eoi);
* writes the scheduler that reproduces the original sampler: IDDPM linear betas (1e-4..0.02, 1000 steps), learned-range
  variance, `clip_denoised=False`, respacing `round(linspace(0, 999, N))` = diffusers `timestep_spacing="linspace"`;
* writes `monoformer_original.json` with the sampling recipe, including `guidance_channels` (3: the original
  classifier-free guidance only mixes the first 3 of the 4 epsilon channels; see `--guidance_channels`).

Output: a `MonoFormerPipeline` folder when the package's pipeline and processor accept the checkpoint as it is (the
pipeline needs the VAE: `--vae`); otherwise the diffusers layout `model/`, `scheduler/`, `tokenizer/` (+ `vae/`), and
always `monoformer_original.json`.

Examples:

    # the released ImageNet 256 checkpoint, EMA weights (what the original README samples with)
    python conversion/convert_original_monoformer.py --checkpoint ./MonoFormer_ImageNet_256 --ema \
        --vae ./sd-vae-ft-mse --out ./monoformer-imagenet256

    # a training checkpoint (pytorch_model.bin + config.json) in bfloat16, guiding all 4 channels
    python conversion/convert_original_monoformer.py --checkpoint ./checkpoint-50000 --out ./mf \
        --dtype bfloat16 --guidance_channels 4

    # then
    from modeling_monoformer import MonoFormerForConditionalGeneration
    model = MonoFormerForConditionalGeneration.from_pretrained("./monoformer-imagenet256/model")
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import re
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local conversion never needs the Hub

import torch  # noqa: E402

try:
    from modeling_monoformer import MonoFormerConfig, MonoFormerForConditionalGeneration
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from modeling_monoformer import MonoFormerConfig, MonoFormerForConditionalGeneration

logger = logging.getLogger("convert_original_monoformer")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Original `decoder_t_embed` -> ours, and the key prefix that reveals it.
TIMESTEP_MODES = {"adaln_before_decoder": "adaln", "add_before_image_tokens": "token"}
MODE_KEY_PREFIXES = {"adaln_before_decoder": "adaLN_module.", "add_before_image_tokens": "t_projector."}

# Original key (regex, matched in full) -> our key. The heads are documented at the top level of
# `MonoFormerForCausalLM`; a `model.` prefix is accepted too, in case they were saved inside the body.
KEY_RULES: list[tuple[str, str]] = [
    (r"model\.embed_tokens\.(weight)", r"model.language_model.embed_tokens.\1"),
    (r"model\.layers\.(\d+)\.(.+)", r"model.language_model.layers.\1.\2"),
    (r"model\.norm\.(weight)", r"model.language_model.norm.\1"),
    (r"lm_head\.(weight)", r"lm_head.\1"),
    (r"(?:model\.)?t_embedder\.mlp\.0\.(weight|bias)", r"model.t_embedder.timestep_embedder.linear_1.\1"),
    (r"(?:model\.)?t_embedder\.mlp\.2\.(weight|bias)", r"model.t_embedder.timestep_embedder.linear_2.\1"),
    (r"(?:model\.)?x_embedder\.(weight|bias)", r"model.x_embedder.\1"),
    (r"(?:model\.)?adaLN_module\.1\.(weight|bias)", r"model.t_modulation.1.\1"),
    (r"(?:model\.)?t_projector\.([02])\.(weight|bias)", r"model.t_projector.\1.\2"),
    (r"final_layer\.adaLN_modulation\.1\.(weight|bias)", r"final_layer.adaLN_modulation.1.\1"),
    (r"final_layer\.linear\.(weight|bias)", r"final_layer.linear.\1"),
]
# Non-persistent buffers of the original code, recomputed here; dropped if an old save happens to hold them.
RECOMPUTED_BUFFERS = re.compile(r"(model\.)?(pos_embed|causal_mask|rotary_emb\.inv_freq|layers\.\d+\.self_attn\.rotary_emb\.inv_freq)")

LLAMA_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "pretraining_tp", "rope_theta", "rope_scaling", "attention_bias", "attention_dropout", "mlp_bias", "head_dim",
    "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings",
)

# Sampling recipe of the original code (`sample_ddp.py`, `infer_dit.py`).
ORIGINAL_VAE = "stabilityai/sd-vae-ft-mse"
ORIGINAL_VAE_SCALING = 0.18215
ORIGINAL_PROMPT = "Please generate an image of {label}."
ORIGINAL_TOKENS = {"image": "<image>", "boi": "<|im_start|>", "eoi": "<|im_end|>", "pad": "<PAD>"}


class ConversionError(ValueError):
    """The checkpoint does not match the documented original layout."""


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="convert_original_monoformer.py",
        description=(
            "Convert an original MonoFormer checkpoint (model_type 'llama' + image heads, safetensors or .bin) into "
            "this package's MonoFormer format, with a scheduler that reproduces the original IDDPM sampler."
        ),
        epilog="Examples:" + __doc__.split("Examples:", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--checkpoint", required=True,
        help="Folder of the original release: config.json, model.safetensors (or model.safetensors.index.json + "
        "shards, or pytorch_model.bin), tokenizer files, optionally ema/.",
    )
    parser.add_argument("--out", required=True, help="Output folder (created; existing files are overwritten).")
    parser.add_argument(
        "--ema", action="store_true",
        help="Convert the EMA weights in <checkpoint>/ema/ (what the original README samples with) instead of the "
        "raw training weights. The architecture is read from the root config.json (ema/config.json as fallback).",
    )
    parser.add_argument(
        "--tokenizer", default=None,
        help="Tokenizer folder, when the checkpoint folder has none. Default: --checkpoint.",
    )
    parser.add_argument(
        "--vae", default=None,
        help="Local folder of the release's VAE (a diffusers AutoencoderKL: stabilityai/sd-vae-ft-mse, scale 0.18215), "
        "saved with the converted model; it is not downloaded. Without it the folder has no vae/.",
    )
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                        help="Weight dtype of the converted model (the release is float32).")
    parser.add_argument(
        "--guidance_channels", type=int, default=3,
        help="Classifier-free guidance channels recorded in monoformer_original.json: 3 (default) reproduces the "
        "original DiT quirk (only epsilon channels 0-2 are guided; channel 3 and the variance come from the "
        "conditional branch); 4 guides every epsilon channel.",
    )
    parser.add_argument("--guidance_scale", type=float, default=4.0,
                        help="Default guidance scale recorded for the pipeline (original infer_dit.py: 4.0).")
    parser.add_argument("--num_inference_steps", type=int, default=20,
                        help="Default number of sampling steps recorded for the pipeline (original: 20).")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------------
# Reading the original checkpoint
# ----------------------------------------------------------------------------------------------------------------------
def read_config(checkpoint: pathlib.Path, ema: bool) -> dict:
    candidates = [checkpoint / "config.json"] + ([checkpoint / "ema" / "config.json"] if ema else [])
    for path in candidates:
        if path.is_file():
            return json.loads(path.read_text())
    raise FileNotFoundError(f"No config.json in {checkpoint}: not an original MonoFormer checkpoint folder.")


def load_state_dict(folder: pathlib.Path) -> dict[str, torch.Tensor]:
    """All tensors of `folder`: single or sharded safetensors, else `pytorch_model.bin` (weights_only)."""
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    if (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    elif (folder / "model.safetensors.index.json").is_file():
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        files = [folder / name for name in sorted(set(index["weight_map"].values()))]
    elif (folder / "pytorch_model.bin").is_file():
        files = [folder / "pytorch_model.bin"]
    elif (folder / "pytorch_model.bin.index.json").is_file():
        index = json.loads((folder / "pytorch_model.bin.index.json").read_text())
        files = [folder / name for name in sorted(set(index["weight_map"].values()))]
    else:
        raise FileNotFoundError(
            f"No weights in {folder}: expected model.safetensors(.index.json) or pytorch_model.bin(.index.json)."
        )
    state: dict[str, torch.Tensor] = {}
    for path in tqdm(files, desc=f"Reading {folder.name or folder}", unit="file", disable=len(files) == 1):
        t0 = time.perf_counter()
        if path.suffix == ".safetensors":
            part = load_file(str(path))
        else:
            part = torch.load(path, map_location="cpu", weights_only=True)
        logger.info("Read %s: %d tensors, %.2f GB in %.1f s", path.name, len(part),
                    sum(t.numel() * t.element_size() for t in part.values()) / 1e9, time.perf_counter() - t0)
        state.update(part)
    return state


def detect_timestep_mode(keys, config_value: str | None) -> str:
    """The original `decoder_t_embed` from the keys (the released config.json and the repo configs disagree)."""
    found = [mode for mode, prefix in MODE_KEY_PREFIXES.items()
             if any(k.startswith(prefix) or k.startswith("model." + prefix) for k in keys)]
    if len(found) != 1:
        raise ConversionError(
            "Cannot tell the timestep conditioning from the keys: expected exactly one of `adaLN_module.1.*` "
            f"(adaln_before_decoder) or `t_projector.{{0,2}}.*` (add_before_image_tokens), found {found or 'neither'}."
        )
    mode = found[0]
    if config_value is not None and config_value != mode:
        logger.warning("config.json says decoder_t_embed=%r but the weights are %r; following the weights.",
                       config_value, mode)
    return mode


def check_supported(cfg: dict) -> None:
    """Refuse original options whose math this package does not implement (rather than convert them wrongly)."""
    required = {"use_adaln_final_layer": True, "use_bi_attn_img_tokens": True, "add_pos_embed_each_layer": False}
    for field, value in required.items():
        if field in cfg and cfg[field] != value:
            raise ConversionError(f"Unsupported original option `{field}={cfg[field]}` (only {value} is supported).")
    for field in ("patch_size", "in_channels", "hidden_size", "vocab_size"):
        if field not in cfg:
            raise ConversionError(f"config.json lacks `{field}`: not an original MonoFormer config.")


def load_tokenizer(path: pathlib.Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"No tokenizer in {path} ({err}); pass the checkpoint's tokenizer folder with `--tokenizer`."
        ) from err
    vocab = tokenizer.get_vocab()
    missing = [t for t in (ORIGINAL_TOKENS["image"], ORIGINAL_TOKENS["boi"], ORIGINAL_TOKENS["eoi"]) if t not in vocab]
    if missing:
        raise ConversionError(f"The tokenizer in {path} lacks the original added tokens {missing}.")
    return tokenizer


# ----------------------------------------------------------------------------------------------------------------------
# Config and weights
# ----------------------------------------------------------------------------------------------------------------------
def build_config(cfg: dict, mode: str, tokenizer) -> MonoFormerConfig:
    from transformers import LlamaConfig

    text_kwargs = {k: cfg[k] for k in LLAMA_FIELDS if k in cfg}
    text_config = LlamaConfig(**text_kwargs)
    image_token_id = tokenizer.convert_tokens_to_ids(ORIGINAL_TOKENS["image"])
    if "image_token_index" in cfg and cfg["image_token_index"] != image_token_id:
        raise ConversionError(
            f"config.json has image_token_index={cfg['image_token_index']} but the tokenizer maps "
            f"{ORIGINAL_TOKENS['image']!r} to {image_token_id}."
        )
    image_size = int(cfg.get("image_size", 256))
    return MonoFormerConfig(
        text_config=text_config,
        latent_channels=int(cfg["in_channels"]),
        patch_size=int(cfg["patch_size"]),
        vae_scale_factor=8,
        sample_size=image_size // 8,
        timestep_conditioning=TIMESTEP_MODES[mode],
        image_pos_embed="sincos_2d" if cfg.get("use_pos_embed", True) else "none",
        learn_sigma=bool(cfg.get("learn_sigma", True)),
        prediction_type="epsilon",
        num_train_timesteps=1000,
        lm_loss_weight=0.01,
        diffusion_loss_weight=1.0,
        image_token_id=image_token_id,
        boi_token_id=tokenizer.convert_tokens_to_ids(ORIGINAL_TOKENS["boi"]),
        eoi_token_id=tokenizer.convert_tokens_to_ids(ORIGINAL_TOKENS["eoi"]),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


def map_key(key: str) -> str | None:
    for pattern, replacement in KEY_RULES:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, replacement, key)
    return None


def convert_state_dict(state: dict[str, torch.Tensor], expected: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Rename every original key; fail naming any key left over, missing, duplicated or of the wrong shape."""
    converted: dict[str, torch.Tensor] = {}
    source_of: dict[str, str] = {}
    unknown, dropped, errors = [], [], []
    for key, tensor in state.items():
        new_key = map_key(key)
        if new_key is None:
            (dropped if RECOMPUTED_BUFFERS.fullmatch(key) else unknown).append(key)
            continue
        if new_key in source_of:
            errors.append(f"`{key}` and `{source_of[new_key]}` both map to `{new_key}`")
            continue
        if new_key not in expected:
            unknown.append(key)
            continue
        if tuple(tensor.shape) != tuple(expected[new_key]):
            errors.append(f"`{key}` has shape {tuple(tensor.shape)}, `{new_key}` needs {tuple(expected[new_key])}")
            continue
        converted[new_key] = tensor
        source_of[new_key] = key
    if dropped:
        logger.info("Dropped %d recomputed buffers: %s", len(dropped), dropped[:4])
    if unknown:
        errors.append(f"keys with no place in the converted model: {sorted(unknown)}")
    missing = sorted(set(expected) - set(converted))
    if missing:
        inverse = {
            "model.language_model.": "model.", "model.t_modulation.1.": "adaLN_module.1.",
            "model.t_projector.": "t_projector.", "model.x_embedder.": "x_embedder.",
            "model.t_embedder.timestep_embedder.linear_1.": "t_embedder.mlp.0.",
            "model.t_embedder.timestep_embedder.linear_2.": "t_embedder.mlp.2.",
        }
        def original_name(k):
            for ours, theirs in inverse.items():
                if k.startswith(ours):
                    return theirs + k[len(ours):]
            return k
        errors.append("missing original keys: " + ", ".join(f"`{original_name(k)}` (for `{k}`)" for k in missing))
    if errors:
        raise ConversionError("The checkpoint does not match the original MonoFormer layout:\n  - " + "\n  - ".join(errors))
    return converted


def expected_shapes(config: MonoFormerConfig) -> dict[str, torch.Size]:
    """Parameter names and shapes of the converted model, from a weightless (meta) instance."""
    with torch.device("meta"):
        model = MonoFormerForConditionalGeneration(config)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def dit_pos_embed(embed_dim: int, grid_size: int) -> torch.Tensor:
    """DiT/MAE `get_2d_sincos_pos_embed(embed_dim, grid_size)`, the table the original adds (float64, (g*g, D))."""
    coords = torch.arange(grid_size, dtype=torch.float64)
    grid_w, grid_h = torch.meshgrid(coords, coords, indexing="xy")  # np.meshgrid(grid_w, grid_h)

    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
        out = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([one_axis(embed_dim // 2, grid_w), one_axis(embed_dim // 2, grid_h)], dim=1)


def check_pos_embed(model, config: MonoFormerConfig) -> None:
    """The recomputed 2D sin-cos embedding must equal the table the original registered as `pos_embed`."""
    if config.image_pos_embed != "sincos_2d":
        return
    grid = config.sample_size // config.patch_size
    ours = model.model.get_pos_embed(grid, grid, "cpu", torch.float64)
    theirs = dit_pos_embed(config.text_config.hidden_size, grid)
    if not torch.allclose(ours, theirs, atol=1e-6):
        raise ConversionError("The model's 2D sin-cos position embedding no longer matches the original DiT table.")


# ----------------------------------------------------------------------------------------------------------------------
# Scheduler, recipe, output
# ----------------------------------------------------------------------------------------------------------------------
def original_scheduler():
    """diffusers equivalent of the original IDDPM sampler (`create_diffusion(str(N))`, `p_sample_loop`)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        variance_type="learned_range",
        clip_sample=False,
        prediction_type="epsilon",
        timestep_spacing="linspace",  # = space_timesteps(1000, "N"): round(i * 999 / (N - 1))
    )


def sampling_recipe(args, config: MonoFormerConfig, mode: str, weights: str) -> dict:
    return {
        "description": "Sampling recipe of the original MonoFormer release, for MonoFormerPipeline.",
        "source_checkpoint": str(pathlib.Path(args.checkpoint).resolve()),
        "weights": weights,
        "original_decoder_t_embed": mode,
        "guidance_channels": args.guidance_channels,
        "guidance_channels_note": (
            "Classifier-free guidance mixes cond/uncond only on epsilon channels [0, guidance_channels); the other "
            "epsilon channels and all variance channels are taken from the conditional branch (original DiT quirk)."
        ),
        "guidance_scale": args.guidance_scale,
        "num_inference_steps": args.num_inference_steps,
        "vae": ORIGINAL_VAE,
        "vae_scaling_factor": ORIGINAL_VAE_SCALING,
        "prompt_template": ORIGINAL_PROMPT,
        "unconditional_prompt": "",
        "prepend_bos": True,
        "image_token": ORIGINAL_TOKENS["image"],
        "boi_token": ORIGINAL_TOKENS["boi"],
        "eoi_token": ORIGINAL_TOKENS["eoi"],
        "height": config.sample_size * config.vae_scale_factor,
        "width": config.sample_size * config.vae_scale_factor,
    }


def save(out: pathlib.Path, model, tokenizer, scheduler, recipe: dict, vae=None) -> str:
    """A `MonoFormerPipeline` folder when the package's pipeline and processor accept this checkpoint, else the
    diffusers layout `model/`, `scheduler/`, `tokenizer/` (+ `vae/` when given)."""
    out.mkdir(parents=True, exist_ok=True)
    layout = "subfolders"
    try:
        from modeling_monoformer.image_processing_monoformer import MonoFormerImageProcessor
        from modeling_monoformer.pipeline_monoformer import MonoFormerPipeline
        from modeling_monoformer.processing_monoformer import MonoFormerProcessor
    except ImportError:
        MonoFormerPipeline = None
    if MonoFormerPipeline is not None:
        # The original boi/eoi are `<|im_start|>`/`<|im_end|>`; a processor that adds its own special tokens would
        # give them new, untrained rows, so the pipeline is only written if it takes the tokenizer as it is.
        try:
            vocab_before = len(tokenizer)
            processor = MonoFormerProcessor(image_processor=MonoFormerImageProcessor(), tokenizer=tokenizer)
            if len(tokenizer) != vocab_before:
                raise ValueError("the processor adds special tokens the original checkpoint does not have")
            processor.configure_for_model(model.config)
            MonoFormerPipeline(model=model, vae=vae, scheduler=scheduler, processor=processor).save_pretrained(out)
            layout = "pipeline"
        except Exception as err:  # the pipeline/processor APIs are young: fall back rather than lose the conversion
            logger.warning("Not writing a MonoFormerPipeline folder (%s); writing model/, scheduler/, tokenizer/.", err)
            tokenizer = load_tokenizer(pathlib.Path(recipe["tokenizer_source"]))  # undo any tokens it added
    if layout == "subfolders":
        model.save_pretrained(out / "model")
        scheduler.save_pretrained(out / "scheduler")
        tokenizer.save_pretrained(out / "tokenizer")
        if vae is not None:
            vae.save_pretrained(out / "vae")
    recipe = {k: v for k, v in recipe.items() if k != "tokenizer_source"}
    recipe["layout"] = layout
    (out / "monoformer_original.json").write_text(json.dumps(recipe, indent=2) + "\n")
    return layout


def load_vae(path: str | None):
    """A local `AutoencoderKL` folder (e.g. a download of stabilityai/sd-vae-ft-mse), checked against the release."""
    if path is None:
        return None
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(path)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if factor != 8 or vae.config.latent_channels != 4:
        raise ConversionError(
            f"`--vae {path}` has scale factor {factor} and {vae.config.latent_channels} latent channels; the original "
            "release needs 8 and 4 (stabilityai/sd-vae-ft-mse)."
        )
    if abs(vae.config.scaling_factor - ORIGINAL_VAE_SCALING) > 1e-6:
        logger.warning("The VAE's scaling_factor is %s; the original samples with %s.",
                       vae.config.scaling_factor, ORIGINAL_VAE_SCALING)
    return vae


def convert(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    checkpoint = pathlib.Path(args.checkpoint)
    weights_dir = checkpoint / "ema" if args.ema else checkpoint
    if not weights_dir.is_dir():
        raise FileNotFoundError(f"{weights_dir} does not exist" + (" (--ema needs <checkpoint>/ema/)" if args.ema else ""))
    cfg = read_config(checkpoint, args.ema)
    check_supported(cfg)
    tokenizer_dir = pathlib.Path(args.tokenizer) if args.tokenizer else checkpoint
    tokenizer = load_tokenizer(tokenizer_dir)

    logger.info("Reading %s weights from %s", "EMA" if args.ema else "training", weights_dir)
    state = load_state_dict(weights_dir)
    t_read = time.perf_counter()
    mode = detect_timestep_mode(state.keys(), cfg.get("decoder_t_embed"))
    config = build_config(cfg, mode, tokenizer)
    logger.info("decoder_t_embed=%s -> timestep_conditioning=%r, learn_sigma=%s, %d layers, hidden %d",
                mode, config.timestep_conditioning, config.learn_sigma,
                config.text_config.num_hidden_layers, config.text_config.hidden_size)

    converted = convert_state_dict(state, expected_shapes(config))
    del state
    model = MonoFormerForConditionalGeneration.from_pretrained(None, config=config, state_dict=converted)
    model = model.to(DTYPES[args.dtype]).eval()
    check_pos_embed(model, config)
    t_converted = time.perf_counter()

    recipe = sampling_recipe(args, config, mode, "ema" if args.ema else "model")
    recipe["tokenizer_source"] = str(tokenizer_dir)
    layout = save(pathlib.Path(args.out), model, tokenizer, original_scheduler(), recipe, load_vae(args.vae))
    end = time.perf_counter()
    logger.info("Wrote %s (%s layout) in %.1f s (read %.1f s, convert %.1f s)", args.out, layout,
                end - start, t_read - start, t_converted - t_read)
    return {"layout": layout, "timestep_conditioning": config.timestep_conditioning, "total_s": end - start}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    return convert(args)


if __name__ == "__main__":
    main()
