"""`conversion/convert_original_monoformer.py` on a tiny synthetic checkpoint with the original release's exact key
names and config fields, checked against an independent re-implementation of the original forward written here from
the published math (DiT blocks on a causal LLM, adaLN timestep conditioning) and of the original IDDPM sampler."""

import importlib.util
import json
import math
import pathlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaModel, PreTrainedTokenizerFast

from modeling_monoformer import MonoFormerForConditionalGeneration, train_bpe_tokenizer

REPO = pathlib.Path(__file__).resolve().parents[1]
HIDDEN, PATCH, IN_CH, IMAGE_SIZE = 64, 2, 4, 64  # latent 8x8 -> a 4x4 patch grid, 16 image tokens
LATENT = IMAGE_SIZE // 8


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "conversion" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


convert_original = load_script("convert_original_monoformer")


# ----------------------------------------------------------------------------------------------------------------------
# A synthetic original checkpoint
# ----------------------------------------------------------------------------------------------------------------------
def original_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-like tokenizer set up as the original `setup_tokenizer`: pad `<PAD>`, then the three image tokens."""
    corpus = ["Please generate an image of a goldfish.", "an photo of tench.", "a great white shark"] * 20
    tok = train_bpe_tokenizer(corpus, vocab_size=290, pad_token=None, unk_token="<unk>")
    tok.add_special_tokens({"pad_token": "<PAD>"})
    tok.add_tokens(["<image>", "<|im_start|>", "<|im_end|>"], special_tokens=True)
    return tok


def original_config(vocab_size: int, image_token_index: int, decoder_t_embed: str) -> dict:
    """Every field of the released config.json, at tiny size."""
    return {
        "_name_or_path": "monoformer_imagenet_res256", "architectures": ["MonoFormerForCausalLM"],
        "model_type": "llama", "add_pos_embed_each_layer": False, "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2, "decoder_t_embed": decoder_t_embed,
        "hidden_act": "silu", "hidden_size": HIDDEN, "image_size": IMAGE_SIZE, "image_token_index": image_token_index,
        "in_channels": IN_CH, "initializer_range": 0.02, "intermediate_size": 128, "learn_sigma": True,
        "max_position_embeddings": 256, "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
        "patch_size": PATCH, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "tokenizer_max_length": 512, "tokenizer_padding_side": "right",
        "torch_dtype": "float32", "transformers_version": "4.38.0", "use_adaln_final_layer": True,
        "use_bi_attn_img_tokens": True, "use_cache": True, "use_flash_attn": False, "use_pos_embed": True,
        "vocab_size": vocab_size,
    }


def original_state_dict(cfg: dict, decoder_t_embed: str, seed: int) -> dict[str, torch.Tensor]:
    """The exact key names of the released checkpoint; heads random (not zero) so that every module matters."""
    torch.manual_seed(seed)
    llama = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k in convert_original.LLAMA_FIELDS}))
    state = {k: v.clone() for k, v in llama.state_dict().items()}
    h, out = cfg["hidden_size"], PATCH * PATCH * 2 * IN_CH

    def rnd(*shape, std=0.1):
        return torch.randn(*shape) * std

    state.update({
        "t_embedder.mlp.0.weight": rnd(h, 256), "t_embedder.mlp.0.bias": rnd(h),
        "t_embedder.mlp.2.weight": rnd(h, h), "t_embedder.mlp.2.bias": rnd(h),
        "x_embedder.weight": rnd(h, IN_CH * PATCH * PATCH, std=0.5), "x_embedder.bias": rnd(h),
        "final_layer.adaLN_modulation.1.weight": rnd(2 * h, h), "final_layer.adaLN_modulation.1.bias": rnd(2 * h),
        "final_layer.linear.weight": rnd(out, h), "final_layer.linear.bias": rnd(out),
    })
    if decoder_t_embed == "adaln_before_decoder":
        state.update({"adaLN_module.1.weight": rnd(2 * h, h, std=0.3), "adaLN_module.1.bias": rnd(2 * h, std=0.3)})
    else:
        state.update({"t_projector.0.weight": rnd(h, h), "t_projector.0.bias": rnd(h),
                      "t_projector.2.weight": rnd(h, h, std=0.5), "t_projector.2.bias": rnd(h)})
    return state


def write_checkpoint(folder: pathlib.Path, decoder_t_embed: str, state_override=None) -> pathlib.Path:
    tok = original_tokenizer()
    cfg = original_config(len(tok), tok.convert_tokens_to_ids("<image>"), decoder_t_embed)
    (folder / "ema").mkdir(parents=True)
    tok.save_pretrained(folder)
    for sub, seed in ((folder, 0), (folder / "ema", 1)):
        state = original_state_dict(cfg, decoder_t_embed, seed)
        if state_override is not None:
            state_override(state)
        save_file({k: v.contiguous() for k, v in state.items()}, str(sub / "model.safetensors"))
        (sub / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture(params=["adaln_before_decoder", "add_before_image_tokens"])
def checkpoint(request, tmp_path):
    return write_checkpoint(tmp_path / "original", request.param), request.param


# ----------------------------------------------------------------------------------------------------------------------
# Independent re-implementation of the original forward (documented math, not the package's code)
# ----------------------------------------------------------------------------------------------------------------------
def dit_2d_sincos(embed_dim: int, grid_size: int) -> np.ndarray:
    """DiT/MAE `get_2d_sincos_pos_embed`, numpy, as copied into the original repo."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


def dit_timestep_embedding(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # cos first


def linear(x, sd, name):
    return F.linear(x, sd[name + ".weight"], sd[name + ".bias"])


@torch.no_grad()
def original_forward(sd, cfg, mode, rows, latents, timesteps):
    """rows: per sample (prefix ids ending in <|im_start|>, suffix ids starting with <|im_end|>); right padding."""
    h, p = cfg["hidden_size"], cfg["patch_size"]
    llama_cfg = LlamaConfig(**{k: v for k, v in cfg.items() if k in convert_original.LLAMA_FIELDS})
    llama_cfg._attn_implementation = "eager"
    body = LlamaModel(llama_cfg).eval()
    body.load_state_dict({k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")})

    t_emb = linear(F.silu(linear(dit_timestep_embedding(timesteps), sd, "t_embedder.mlp.0")), sd, "t_embedder.mlp.2")
    pos = torch.from_numpy(dit_2d_sincos(h, LATENT // p)).float()
    seqs, img_masks = [], []
    for i, (prefix, suffix) in enumerate(rows):
        c, hh, ww = latents[i].shape
        x = latents[i].view(c, hh // p, p, ww // p, p).permute(1, 3, 0, 2, 4).flatten(2)  # (h/p, w/p, c*p*p)
        img = linear(x, sd, "x_embedder").flatten(0, 1)  # (T, D)
        parts = [body.embed_tokens(torch.tensor(prefix))]
        mask = [torch.zeros(len(prefix))]
        if mode == "add_before_image_tokens":
            t_tok = linear(F.gelu(linear(t_emb[i], sd, "t_projector.0")), sd, "t_projector.2")
            parts.append(t_tok[None])
            mask.append(torch.zeros(1))
        parts += [img, body.embed_tokens(torch.tensor(suffix))]
        mask += [torch.ones(img.shape[0]), torch.zeros(len(suffix))]
        seqs.append(torch.cat(parts))
        img_masks.append(torch.cat(mask))
    length = max(s.shape[0] for s in seqs)
    valid = torch.zeros(len(rows), length, dtype=torch.bool)
    emb = torch.zeros(len(rows), length, h)
    c_mask = torch.zeros(len(rows), length)
    for i, (s, m) in enumerate(zip(seqs, img_masks)):
        emb[i, : len(s)], c_mask[i, : len(m)], valid[i, : len(s)] = s, m, True

    # pos-embed then (adaln mode) shift/scale on the image tokens, before layer 0
    for i in range(len(rows)):
        idx = c_mask[i].nonzero().squeeze(-1)
        emb[i, idx] += pos[: idx.numel()]
    if mode == "adaln_before_decoder":
        shift, scale = linear(F.silu(t_emb), sd, "adaLN_module.1").chunk(2, dim=-1)  # first chunk = shift
        m = c_mask[..., None]
        emb = emb * (1 + scale[:, None] * m) + shift[:, None] * m

    # M[q,k] allowed iff (k <= q and k not padding) or (q and k both image tokens)
    q = torch.arange(length)
    causal = (q[None, :] <= q[:, None])[None] & valid[:, None, :]
    img = c_mask.bool()
    allowed = causal | (img[:, :, None] & img[:, None, :])
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]
    hidden = body(inputs_embeds=emb, attention_mask=additive,
                  position_ids=torch.arange(length)[None].expand(len(rows), -1)).last_hidden_state
    logits = F.linear(hidden, sd["lm_head.weight"])

    outs = []
    shift, scale = linear(F.silu(t_emb), sd, "final_layer.adaLN_modulation.1").chunk(2, dim=-1)  # shift first
    for i in range(len(rows)):
        x = hidden[i, img[i]]
        x = F.layer_norm(x, (h,), eps=1e-6) * (1 + scale[i]) + shift[i]
        x = linear(x, sd, "final_layer.linear")  # (T, p*p*C_out), features (ph, pw, c)
        g = LATENT // p
        c_out = x.shape[-1] // (p * p)
        x = x.view(g, g, p, p, c_out)
        x = torch.einsum("hwpqc->chpwq", x).reshape(c_out, g * p, g * p)
        outs.append(x)
    return logits, valid, torch.stack(outs)


# ----------------------------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------------------------
def read_state(path: pathlib.Path):
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.parametrize("ema", [False, True])
def test_converted_model_matches_original_forward(checkpoint, tmp_path, ema):
    folder, mode = checkpoint
    out = tmp_path / "converted"
    report = convert_original.main(["--checkpoint", str(folder), "--out", str(out)] + (["--ema"] if ema else []))
    expected_mode = {"adaln_before_decoder": "adaln", "add_before_image_tokens": "token"}[mode]
    assert report["timestep_conditioning"] == expected_mode

    model = MonoFormerForConditionalGeneration.from_pretrained(out / "model").eval()  # both layouts: diffusers subfolders
    tok = AutoTokenizer.from_pretrained(out / ("tokenizer" if report["layout"] == "subfolders" else "processor"))
    cfg = json.loads((folder / "config.json").read_text())
    sd = read_state(folder / ("ema" if ema else "") / "model.safetensors")

    c = model.config
    assert c.learn_sigma and c.out_channels == 8 and c.timestep_conditioning == expected_mode
    assert (c.image_token_id, c.boi_token_id, c.eoi_token_id) == tuple(
        tok.convert_tokens_to_ids(t) for t in ("<image>", "<|im_start|>", "<|im_end|>"))
    assert c.image_token_id == cfg["image_token_index"] and c.text_config.vocab_size == cfg["vocab_size"]
    assert tok.convert_tokens_to_ids("<PAD>") == tok.pad_token_id == cfg["vocab_size"] - 4  # added tokens carried

    bos, start, end = tok.bos_token_id, c.boi_token_id, c.eoi_token_id
    prompts = [tok("Please generate an image of a goldfish.").input_ids, tok("tench").input_ids]
    suffix = [end] + tok("\n").input_ids + [tok.eos_token_id]
    rows = [([bos] + pr + [start], suffix) for pr in prompts]
    torch.manual_seed(3)
    latents = torch.randn(2, IN_CH, LATENT, LATENT)
    timesteps = torch.tensor([999, 37])
    ref_logits, valid, ref_images = original_forward(sd, cfg, mode, rows, latents, timesteps)

    n = c.num_image_tokens(LATENT, LATENT)
    seqs = [pre + [c.image_token_id] * n + suf for pre, suf in rows]
    length = max(map(len, seqs))
    assert length == ref_logits.shape[1]
    ids = torch.tensor([s + [tok.pad_token_id] * (length - len(s)) for s in seqs])
    attn = torch.tensor([[1] * len(s) + [0] * (length - len(s)) for s in seqs])
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=attn, latents=latents, timesteps=timesteps)
    torch.testing.assert_close(got.diffusion_output, ref_images, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.logits[valid], ref_logits[valid], atol=1e-5, rtol=1e-5)
    assert ref_images[:, 4:].abs().mean() > 0.01  # the learned-sigma half is exercised too


def test_mode_is_detected_from_keys_not_config(tmp_path):
    folder = write_checkpoint(tmp_path / "ckpt", "add_before_image_tokens")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["decoder_t_embed"] = "adaln_before_decoder"  # the released config.json and the weights can disagree
    (folder / "config.json").write_text(json.dumps(cfg))
    report = convert_original.main(["--checkpoint", str(folder), "--out", str(tmp_path / "out")])
    assert report["timestep_conditioning"] == "token"


def test_scheduler_and_recipe_written(tmp_path):
    from diffusers import DDPMScheduler

    folder = write_checkpoint(tmp_path / "ckpt", "adaln_before_decoder")
    out = tmp_path / "out"
    convert_original.main(["--checkpoint", str(folder), "--out", str(out), "--ema"])
    recipe = json.loads((out / "monoformer_original.json").read_text())
    assert recipe["guidance_channels"] == 3 and recipe["weights"] == "ema"
    assert recipe["boi_token"] == "<|im_start|>" and recipe["vae_scaling_factor"] == 0.18215
    sched = DDPMScheduler.from_pretrained(out / "scheduler")
    assert sched.config.variance_type == "learned_range" and not sched.config.clip_sample
    assert sched.config.beta_schedule == "linear" and sched.config.timestep_spacing == "linspace"
    convert_original.main(["--checkpoint", str(folder), "--out", str(out), "--guidance_channels", "4"])
    assert json.loads((out / "monoformer_original.json").read_text())["guidance_channels"] == 4


def iddpm_respaced_sample(model_fn, x, n_steps, generator):
    """The original sampler: IDDPM `space_timesteps(1000, str(N))` + `p_sample_loop`, learned-range variance,
    clip_denoised=False (diffusion/gaussian_diffusion.py + respace.py), in float64."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    ac = np.cumprod(1.0 - betas)
    stride, cur, use = (1000 - 1) / (n_steps - 1), 0.0, []
    for _ in range(n_steps):
        use.append(round(cur))
        cur += stride
    last, new_betas, timestep_map = 1.0, [], []
    for i, a in enumerate(ac):
        if i in use:
            new_betas.append(1 - a / last)
            last = a
            timestep_map.append(i)
    betas = np.array(new_betas)
    ac = np.cumprod(1.0 - betas)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    post_logvar = np.log(np.append(post_var[1], post_var[1:]))
    coef1 = betas * np.sqrt(ac_prev) / (1.0 - ac)
    coef2 = (1.0 - ac_prev) * np.sqrt(1.0 - betas) / (1.0 - ac)
    x = x.double()
    for i in reversed(range(n_steps)):
        out = model_fn(x.float(), timestep_map[i]).double()
        eps, v = out.chunk(2, dim=1)
        frac = (v + 1) / 2
        logvar = frac * np.log(betas[i]) + (1 - frac) * post_logvar[i]
        x0 = np.sqrt(1.0 / ac[i]) * x - np.sqrt(1.0 / ac[i] - 1) * eps
        mean = coef1[i] * x0 + coef2[i] * x
        if i > 0:
            noise = torch.randn(eps.shape, generator=generator, dtype=torch.float32).double()
            x = mean + torch.exp(0.5 * logvar) * noise
        else:
            x = mean
    return x.float()


def test_scheduler_reproduces_original_iddpm_sampler():
    scheduler = convert_original.original_scheduler()

    def model_fn(x, t):  # a fixed fake network: eps and a variance interpolation value in [-1, 1]
        t = float(t)
        return torch.cat([torch.tanh(0.7 * x + t / 1000), torch.sin(x + t / 300)], dim=1)

    x_init = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    for steps in (5, 20):
        ref = iddpm_respaced_sample(model_fn, x_init, steps, torch.Generator().manual_seed(1))
        scheduler.set_timesteps(steps)
        generator, x = torch.Generator().manual_seed(1), x_init.clone()
        for t in scheduler.timesteps:
            x = scheduler.step(model_fn(x, t), t, x, generator=generator).prev_sample
        torch.testing.assert_close(x, ref, atol=1e-4, rtol=1e-4)


def test_unknown_missing_and_misshapen_keys_fail_loudly(tmp_path):
    def extra(state):
        state["model.vision_tower.weight"] = torch.zeros(2)

    def missing(state):
        del state["final_layer.linear.bias"]

    def misshapen(state):
        state["x_embedder.weight"] = torch.zeros(HIDDEN, 12)

    for name, override, message in [
        ("extra", extra, "model.vision_tower.weight"),
        ("missing", missing, "`final_layer.linear.bias`"),
        ("shape", misshapen, r"`x_embedder.weight` has shape \(64, 12\), `model.x_embedder.weight` needs \(64, 16\)"),
    ]:
        folder = write_checkpoint(tmp_path / name, "adaln_before_decoder", override)
        with pytest.raises(convert_original.ConversionError, match=message):
            convert_original.main(["--checkpoint", str(folder), "--out", str(tmp_path / f"out_{name}")])


def test_both_or_no_timestep_modules_fail(tmp_path):
    def both(state):
        state["t_projector.0.weight"] = torch.zeros(HIDDEN, HIDDEN)

    folder = write_checkpoint(tmp_path / "both", "adaln_before_decoder", both)
    with pytest.raises(convert_original.ConversionError, match="Cannot tell the timestep conditioning"):
        convert_original.main(["--checkpoint", str(folder), "--out", str(tmp_path / "out")])


def test_bin_checkpoint_is_read_with_weights_only(tmp_path, monkeypatch):
    folder = write_checkpoint(tmp_path / "ckpt", "adaln_before_decoder")
    torch.save(read_state(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    convert_original.main(["--checkpoint", str(folder), "--out", str(tmp_path / "out")])
    assert calls == [True]


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        convert_original.parse_args(["--help"])
    text = capsys.readouterr().out
    for option in ("--checkpoint", "--out", "--ema", "--tokenizer", "--vae", "--dtype", "--guidance_channels",
                   "--guidance_scale", "--num_inference_steps", "Examples"):
        assert option in text


def test_local_vae_is_carried_and_checked(tmp_path):
    from diffusers import AutoencoderKL

    blocks = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  layers_per_block=1, norm_num_groups=8, scaling_factor=0.18215)
    AutoencoderKL(block_out_channels=(8,) * 4, latent_channels=4, **blocks).save_pretrained(tmp_path / "vae")
    AutoencoderKL(block_out_channels=(8,) * 3, latent_channels=4, **{**blocks, "down_block_types": (
        "DownEncoderBlock2D",) * 3, "up_block_types": ("UpDecoderBlock2D",) * 3}).save_pretrained(tmp_path / "vae4")
    folder = write_checkpoint(tmp_path / "ckpt", "adaln_before_decoder")
    out = tmp_path / "out"
    report = convert_original.main(["--checkpoint", str(folder), "--out", str(out), "--vae", str(tmp_path / "vae")])
    vae_dir = out / "vae"
    assert vae_dir.is_dir() and AutoencoderKL.from_pretrained(vae_dir).config.latent_channels == 4
    assert report["layout"] in ("subfolders", "pipeline")
    with pytest.raises(convert_original.ConversionError, match="scale factor 4"):
        convert_original.main(["--checkpoint", str(folder), "--out", str(out), "--vae", str(tmp_path / "vae4")])
