"""Packing: training tokens/s with samples packed into rows (block-diagonal hybrid mask, positions restarting per
sample) vs padded batches, on a length-skewed mix (many short captions + images, a few long texts). The loss on the
same samples is checked to be identical. Target: packed >= 1.5x the padded tokens/s.

    python benchmarks/bench_packing.py [--attn sdpa|flex_attention]
"""

import argparse
import random

import torch
from diffusers import DDPMScheduler
from transformers import LlamaConfig, LlamaForCausalLM

from modeling_monoformer import (
    MonoFormerDataCollator,
    MonoFormerForConditionalGeneration,
    MonoFormerImageProcessor,
    MonoFormerProcessor,
)
from modeling_monoformer.packing_monoformer import pack_batch
from timing import header, interleaved

WORDS = "the a photo of sneaker boot bag coat dress shirt it is truth universally acknowledged single man".split()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    random.seed(0)
    torch.manual_seed(0)
    from tests.conftest import make_tokenizer  # the small real BPE tokenizer the tests use

    tok = make_tokenizer()
    base = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=8, max_position_embeddings=2048,
    ))
    model = MonoFormerForConditionalGeneration.from_llm(
        base, tokenizer=tok, latent_channels=1, patch_size=4, vae_scale_factor=1
    )
    model.set_attn_implementation(args.attn)
    processor = MonoFormerProcessor(MonoFormerImageProcessor(num_channels=1), tok).configure_for_model(model.config)
    collator = MonoFormerDataCollator(processor, DDPMScheduler(), "epsilon", cfg_dropout=0.0, seed=0)

    samples = []
    for i in range(args.batch):
        if i % 8 == 0:  # a long text sample skews the padded length
            samples.append({"text": " ".join(random.choices(WORDS, k=300))})
        else:
            samples.append({"text": " ".join(random.choices(WORDS, k=4)), "pixel_values": torch.rand(1, 28, 28) * 2 - 1})
    padded = collator(samples)
    longest = int(padded["attention_mask"].sum(1).max())
    packed = pack_batch(padded, max_length=longest, pad_token_id=tok.pad_token_id)
    real_tokens = int(padded["attention_mask"].sum())

    model.eval()
    with torch.no_grad():
        a, b = model(**padded), model(**packed)
    lm_diff = (a.lm_loss - b.lm_loss).abs().item()
    diff_diff = (a.diffusion_loss - b.diffusion_loss).abs().item()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)  # lr 0: both paths train the same weights every round

    def step(batch):
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    res = interleaved({"padded": lambda: step(padded), "packed": lambda: step(packed)}, rounds=args.rounds)
    header(f"Packing: {args.batch} samples ({real_tokens} real tokens), attn {args.attn}, Llama dim 256 depth 4")
    print(f"padded shape {tuple(padded['input_ids'].shape)}  packed shape {tuple(packed['input_ids'].shape)}")
    print(f"|lm_loss padded - packed| = {lm_diff:.2e}   |diffusion_loss padded - packed| = {diff_diff:.2e}")
    print(f"{'layout':<8} {'min ms':>9} {'real tokens/s':>14}")
    for name, (mn, _) in res.items():
        print(f"{name:<8} {mn * 1e3:>9.1f} {real_tokens / mn:>14.0f}")
    ratio = res["padded"][0] / res["packed"][0]
    print(f"packed / padded tokens/s: {ratio:.2f}x   target >= 1.5x  {'MET' if ratio >= 1.5 else 'MISSED'}")


if __name__ == "__main__":
    main()
