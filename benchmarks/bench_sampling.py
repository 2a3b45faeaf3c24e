"""Text-to-image sampling speed: prefix-KV-cached `MonoFormerPipeline` vs naive full recompute.

The naive path runs the whole sequence (prompt + image block) through the transformer at every denoising step; the
cached path runs the prompt once and then only the I image tokens per step. Per step the ideal speed-up is
`(P + I) / I`; the one-off prompt pass (and everything besides the transformer) keeps the measured ratio below it.
Target: the cached path reaches at least 85% of the ideal ratio at P = 512.

Llama body hidden 256, 4 layers, 4 heads, intermediate 688 (sdpa), pixel space 32x32x3 with 2x2 patches = 256 image
tokens, DDIM, batch of one prompt; with CFG (guidance 4.0) the conditional and unconditional rows run as one batch.
Both paths are interleaved; each number is the minimum over `--rounds` runs.

    python benchmarks/bench_sampling.py [--steps 20] [--rounds 5] [--prompt_lengths 32 128 512] [--threads N]
"""

import argparse
import os

import torch
from diffusers import DDIMScheduler
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from modeling_monoformer import (
    MonoFormerForConditionalGeneration,
    MonoFormerImageProcessor,
    MonoFormerPipeline,
    MonoFormerProcessor,
)
from timing import interleaved

WORDS = [f"w{i}" for i in range(500)]


def word_tokenizer() -> PreTrainedTokenizerFast:
    """One token per word, so a prompt of n words is exactly n tokens."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", padding_side="left"
    )


def build_pipeline(image_size: int) -> MonoFormerPipeline:
    tok = word_tokenizer()
    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )).eval()
    model = MonoFormerForConditionalGeneration.from_llm(
        llm, tokenizer=tok, latent_channels=3, patch_size=2, vae_scale_factor=1, sample_size=image_size
    ).eval()
    processor = MonoFormerProcessor(MonoFormerImageProcessor(), tok)
    pipe = MonoFormerPipeline(model=model, vae=None, scheduler=DDIMScheduler(), processor=processor)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt_lengths", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--image_size", type=int, default=32, help="pixels; (size / 2)^2 image tokens")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    pipe = build_pipeline(args.image_size)
    n_image = pipe.processor.num_image_tokens(args.image_size, args.image_size)
    print(
        f"MonoFormerPipeline sampling, naive full recompute vs prefix KV cache (torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, cpu, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)\n"
        f"Llama hidden 256 x 4 layers, I = {n_image} image tokens, {args.steps} DDIM steps, min of {args.rounds} "
        "interleaved runs; P = prompt tokens incl. <boi>"
    )
    print(f"{'P':>5} {'CFG':>4} {'naive s/img':>12} {'cached s/img':>13} {'ratio':>7} {'ideal':>7} {'% ideal':>8} "
          f"{'max|diff|':>10}")
    met = None
    for prompt_len in args.prompt_lengths:
        prompt = " ".join(WORDS[i % len(WORDS)] for i in range(prompt_len - 1))  # + <boi> = P tokens
        for guidance in (1.0, 4.0):
            outs = {}

            def run(cached, name):
                outs[name] = pipe(
                    prompt, num_inference_steps=args.steps, guidance_scale=guidance, output_type="latent",
                    generator=torch.manual_seed(0), use_prefix_cache=cached,
                ).images

            with torch.inference_mode():
                timed = interleaved(
                    {"naive": lambda: run(False, "naive"), "cached": lambda: run(True, "cached")}, args.rounds, warmup=1
                )
            times = {name: best for name, (best, _median) in timed.items()}
            ids, _, _ = pipe.encode_prompt(prompt, None, 1, False, args.image_size, args.image_size, "cpu")
            assert ids.shape[1] - n_image == prompt_len, "prompt length is off"
            diff = (outs["naive"] - outs["cached"]).abs().max().item()
            ratio = times["naive"] / times["cached"]
            ideal = (prompt_len + n_image) / n_image
            cfg = "yes" if guidance > 1 else "no"
            print(f"{prompt_len:>5} {cfg:>4} {times['naive']:>12.3f} {times['cached']:>13.3f} {ratio:>6.2f}x "
                  f"{ideal:>6.2f}x {100 * ratio / ideal:>7.1f}% {diff:>10.1e}")
            if prompt_len == 512:
                met = (met if met is not None else True) and ratio >= 0.85 * ideal
    if met is not None:
        print(f"Target at P = 512 (ratio >= 85% of ideal, with and without CFG): {'MET' if met else 'MISSED'}")


if __name__ == "__main__":
    main()
