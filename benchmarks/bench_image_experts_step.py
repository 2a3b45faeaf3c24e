"""Training step of a SmolLM2-135M-sized MonoFormer (30 layers, hidden 576, vocab 49k) with and without image experts,
in float32 and under bf16 autocast: forward + backward + AdamW over what each variant trains, on a Fashion-MNIST-like
batch (caption + 49 patch tokens per sample). Weights are random (the cost does not depend on them).

Variants: `none` (full fine-tune, every weight trains), `full` (LMFusion image experts: text frozen, image copies
train), `lora` (image-only LoRA rank 16: text frozen). Each token runs through one set of weights, so the forward
FLOPs of the three are (nearly) equal; the backward of a frozen text weight skips its weight gradient.

    python benchmarks/bench_image_experts_step.py [--batch 16] [--rounds 3] [--modes none full lora]
"""

import argparse
import contextlib

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from modeling_monoformer import MonoFormerForConditionalGeneration, freeze_text_weights
from timing import header, interleaved

SMOLLM2_135M = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--text", type=int, default=6, help="caption tokens per sample")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layers", type=int, default=SMOLLM2_135M["num_hidden_layers"])
    parser.add_argument("--modes", nargs="+", default=["none", "full", "lora"])
    args = parser.parse_args()
    torch.manual_seed(0)

    steps = {}
    for mode in args.modes:
        llm = LlamaForCausalLM(LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": args.layers}))
        model = MonoFormerForConditionalGeneration.from_llm(
            llm, latent_channels=1, patch_size=4, vae_scale_factor=1, sample_size=28, prediction_type="flow",
            image_experts=mode,
        ).train()
        del llm
        if mode != "none":
            freeze_text_weights(model)
        cfg = model.config
        n_img = cfg.num_image_tokens(28, 28)
        text = torch.randint(3, 49152, (args.batch, args.text))
        ids = torch.cat([text, torch.full((args.batch, 1), cfg.boi_token_id),
                         torch.full((args.batch, n_img), cfg.image_token_id),
                         torch.full((args.batch, 1), cfg.eoi_token_id)], dim=1)
        latents = torch.randn(args.batch, 1, 28, 28)
        batch = dict(input_ids=ids, labels=ids, latents=latents, timesteps=torch.randint(0, 1000, (args.batch,)),
                     diffusion_target=torch.randn_like(latents))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        for dtype in ("fp32", "bf16"):
            def step(model=model, opt=opt, batch=batch, dtype=dtype):
                ctx = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()
                with ctx:
                    loss = model(**batch).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            steps[(mode, dtype)] = (step, sum(p.numel() for p in params), ids.shape[1])

    times = interleaved({k: v[0] for k, v in steps.items()}, rounds=args.rounds, warmup=1)
    header(f"Training step, SmolLM2-135M-sized MonoFormer ({args.layers} layers), batch {args.batch}")
    reference = times.get(("none", "fp32"), next(iter(times.values())))[0]
    print("| image_experts | precision | trainable params | tokens/sample | min s/step | median s/step | vs none fp32 |")
    print("|---|---|---|---|---|---|---|")
    for (mode, dtype), (best, median) in times.items():
        _, n_params, seq = steps[(mode, dtype)]
        print(f"| {mode} | {dtype} | {n_params / 1e6:.1f} M | {seq} | {best:.2f} | {median:.2f} | {best / reference:.2f}x |")


if __name__ == "__main__":
    main()
