"""Training overhead: one MonoFormer step (forward + backward + AdamW) on text + images vs the base LlamaForCausalLM
step on the same number of tokens. Target: at most 1.10x.

    python benchmarks/bench_training_step.py [--batch 16] [--text 4] [--image 28] [--patch 4]
"""

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from modeling_monoformer import MonoFormerForConditionalGeneration
from timing import header, interleaved


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--text", type=int, default=4, help="text tokens per sample")
    parser.add_argument("--image", type=int, default=28, help="image side in pixels (pixel space, 1 channel)")
    parser.add_argument("--patch", type=int, default=4)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--attn", default="sdpa")
    args = parser.parse_args()
    torch.manual_seed(0)

    llm_cfg = LlamaConfig(
        vocab_size=1000, hidden_size=args.dim, intermediate_size=4 * args.dim, num_hidden_layers=args.depth,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, max_position_embeddings=1024,
    )
    base = LlamaForCausalLM(llm_cfg)
    base.set_attn_implementation(args.attn)
    model = MonoFormerForConditionalGeneration.from_llm(
        base, latent_channels=1, patch_size=args.patch, vae_scale_factor=1, timestep_conditioning="adaln"
    )
    model.set_attn_implementation(args.attn)
    cfg = model.config
    n_img = cfg.num_image_tokens(args.image, args.image)
    text = torch.randint(3, 1000, (args.batch, args.text))
    row = torch.cat(
        [text, torch.full((args.batch, 1), cfg.boi_token_id), torch.full((args.batch, n_img), cfg.image_token_id),
         torch.full((args.batch, 1), cfg.eoi_token_id)], dim=1,
    )
    seq_len = row.shape[1]
    latents = torch.randn(args.batch, 1, args.image, args.image)
    batch = dict(input_ids=row, labels=row, latents=latents, timesteps=torch.randint(0, 1000, (args.batch,)),
                 diffusion_target=torch.randn_like(latents))
    base_ids = torch.randint(3, 1000, (args.batch, seq_len))

    opt_base = torch.optim.AdamW(base.parameters(), lr=1e-4)
    opt_ours = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step_base():
        loss = base(input_ids=base_ids, labels=base_ids).loss
        opt_base.zero_grad(set_to_none=True)
        loss.backward()
        opt_base.step()

    def step_ours():
        loss = model(**batch).loss
        opt_ours.zero_grad(set_to_none=True)
        loss.backward()
        opt_ours.step()

    base.train(), model.train()
    res = interleaved({"base": step_base, "monoformer": step_ours}, rounds=args.rounds)
    header(f"Training step, batch {args.batch} x {seq_len} tokens ({args.text} text + {n_img} image + 2), "
           f"dim {args.dim}, depth {args.depth}, heads {args.heads}, attn {args.attn}")
    print(f"{'path':<12} {'min ms':>9} {'median ms':>10}")
    for name, (mn, med) in res.items():
        print(f"{name:<12} {mn * 1e3:>9.1f} {med * 1e3:>10.1f}")
    ratio = res["monoformer"][0] / res["base"][0]
    print(f"ratio monoformer / base LlamaForCausalLM (min): {ratio:.3f}x   target <= 1.10x  "
          f"{'MET' if ratio <= 1.10 else 'MISSED'}")


if __name__ == "__main__":
    main()
