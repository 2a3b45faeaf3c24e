"""Packing: training tokens/s with samples packed into rows (block-diagonal hybrid mask, positions restarting per
sample) vs padded batches. The loss on the same samples is checked to be identical. Two mixes:

- `--mix skewed` (default): many short captions + images and a few long texts, a random Llama dim 256 x 4.
  Target: packed >= 1.5x the padded tokens/s.
- `--mix demo`: the shipped Fashion-MNIST demo's own training mix (its model, tokenizer and task shares from its
  `train_args.json`: edits with two images, interleaved, VQA, captions, Austen, text-to-image; real images), as
  `examples/train_fashion_mnist.py` draws it, padded vs `--pack_length` rows: the recipe's `--pack_length` option.

    python benchmarks/bench_packing.py [--attn sdpa|flex_attention]
    python benchmarks/bench_packing.py --mix demo --threads 2 --pack_lengths 0 192 256
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


def demo_mix(args) -> None:
    """Padded vs packed training steps on the demo recipe's mix, several different batches (one round = all of them)."""
    import json
    import pathlib
    import sys

    import numpy as np

    from modeling_monoformer import MonoFormerPipeline, default_noise_scheduler

    root = pathlib.Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "examples"))
    from train_fashion_mnist import CLASS_NAMES, draw_samples, load_austen_texts, load_fashion_mnist, pack

    pipe = MonoFormerPipeline.from_pretrained(args.checkpoint)
    model, processor = pipe.model, pipe.processor
    model.set_attn_implementation(args.attn)
    recipe = json.loads((pathlib.Path(args.checkpoint) / "train_args.json").read_text())
    shares = [recipe.get(k, 0.0) for k in ("text_fraction", "caption_fraction", "edit_fraction",
                                           "interleaved_fraction", "vqa_fraction")]
    images, labels = load_fashion_mnist("train")
    texts = load_austen_texts(split="train") if shares[0] else []
    by_class = [torch.nonzero(labels == c).squeeze(-1).tolist() for c in range(len(CLASS_NAMES))]
    collator = MonoFormerDataCollator(processor, default_noise_scheduler(model.config.prediction_type),
                                      model.config.prediction_type, seed=0,
                                      caption_max_noise=recipe.get("caption_max_noise"))
    rng = random.Random(0)
    padded = [collator(draw_samples(rng, args.batch, np.cumsum(shares), images, labels, by_class, texts,
                                    processor.image_token)) for _ in range(args.batches)]
    layouts = {"padded" if n == 0 else f"packed {n}": [pack(b, n, processor.tokenizer.pad_token_id) for b in padded]
               for n in args.pack_lengths}
    real_tokens = sum(int(b["attention_mask"].sum()) for b in padded)
    model.eval()
    with torch.no_grad():
        ref = [model(**b) for b in padded]
        worst = max(max((a.lm_loss - o.lm_loss).abs().item(), (a.diffusion_loss - o.diffusion_loss).abs().item())
                    for bs in layouts.values() for a, o in zip(ref, [model(**b) for b in bs]))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)  # lr 0: every layout trains the same weights every round

    def steps(batches):
        for batch in batches:
            loss = model(**batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    res = interleaved({name: (lambda bs=bs: steps(bs)) for name, bs in layouts.items()}, rounds=args.rounds)
    header(f"Packing on the demo recipe's mix ({args.checkpoint}): {args.batches} batches x {args.batch} samples, "
           f"task shares text/caption/edit/interleaved/vqa {shares}, {real_tokens} real tokens, attn {args.attn}")
    print(f"largest |loss padded - packed| over all batches and layouts: {worst:.2e}")
    print(f"{'layout':<12} {'tokens computed':>15} {'rows/batch':>10} {'min s/step':>10} {'real tokens/s':>14} "
          f"{'vs padded':>9}")
    for name, (mn, _) in res.items():
        computed = sum(b["input_ids"].numel() for b in layouts[name])
        rows = sum(b["input_ids"].shape[0] for b in layouts[name]) / args.batches
        print(f"{name:<12} {computed:>15} {rows:>10.1f} {mn / args.batches:>10.3f} {real_tokens / mn:>14.0f} "
              f"{res['padded'][0] / mn if 'padded' in res else float('nan'):>8.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--mix", default="skewed", choices=["skewed", "demo"])
    parser.add_argument("--checkpoint", default="examples/monoformer-fashion-mnist", help="--mix demo: the demo folder")
    parser.add_argument("--batches", type=int, default=4, help="--mix demo: different batches per round")
    parser.add_argument("--pack_lengths", nargs="+", type=int, default=[0, 192, 256],
                        help="--mix demo: row lengths to compare (0 = padded)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mix == "demo":
        return demo_mix(args)
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
