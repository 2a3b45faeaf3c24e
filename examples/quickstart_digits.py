"""Quickstart: wrap a small causal LLM as a MonoFormer, train it briefly on real images with captions, and use it.

Runs on a laptop CPU in about a minute, with nothing downloaded:
- data: scikit-learn's handwritten digits (1,797 real 8x8 images), captioned "a handwritten digit seven", in pixel
  space (no VAE); captioning samples (image first) and text-only samples are mixed in;
- model: a small Llama built from a config, with a BPE tokenizer trained on the captions (`train_bpe_tokenizer`),
  wrapped by `MonoFormerForConditionalGeneration.from_llm`;
- training: `MonoFormerDataCollator` draws noise and timesteps from a diffusers `DDPMScheduler`; one AdamW loop
  trains next-token cross-entropy and diffusion MSE through the same weights, and both losses are printed;
- then it generates text, saves the model and reloads it with `AutoModel.from_pretrained(trust_remote_code=True)`.

    python examples/quickstart_digits.py --steps 300
"""

import argparse
import random
import tempfile
import time

import numpy as np
import torch
from diffusers import DDPMScheduler
from sklearn.datasets import load_digits
from tqdm.auto import tqdm
from transformers import AutoModel, LlamaConfig, LlamaForCausalLM

from modeling_monoformer import (
    MonoFormerDataCollator,
    MonoFormerForConditionalGeneration,
    MonoFormerImageProcessor,
    MonoFormerProcessor,
    train_bpe_tokenizer,
)

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = ["a handwritten digit {}", "the number {}", "a {} written by hand"]
TEXTS = [
    "digits are written by hand and scanned at low resolution",
    "each image shows one number from zero to nine",
    "the model writes text and paints images with the same weights",
]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default=None, help="where to save the model (default: a temporary folder)")
    return parser.parse_args()


def main():
    args = parse_args()
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    digits = load_digits()
    images = torch.tensor(digits.images / 16.0 * 2 - 1, dtype=torch.float32).unsqueeze(1)  # (1797, 1, 8, 8) in [-1, 1]
    labels = digits.target.tolist()
    captions = [t.format(n) for t in TEMPLATES for n in NAMES]
    tokenizer = train_bpe_tokenizer(captions + TEXTS, vocab_size=400)

    llm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    model = MonoFormerForConditionalGeneration.from_llm(
        llm, tokenizer=tokenizer, latent_channels=1, patch_size=2, vae_scale_factor=1, sample_size=8,
        timestep_conditioning="adaln", prediction_type="epsilon",
    )
    processor = MonoFormerProcessor(MonoFormerImageProcessor(num_channels=1), tokenizer).configure_for_model(model.config)
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="epsilon")
    collator = MonoFormerDataCollator(processor, scheduler, "epsilon", cfg_dropout=0.1, seed=args.seed)
    print(f"MonoFormer: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
          f"{len(images)} real digit images, {torch.get_num_threads()} threads")

    def sample_batch():
        batch = []
        for _ in range(args.batch_size):
            i = random.randrange(len(images))
            caption = random.choice(TEMPLATES).format(NAMES[labels[i]])
            r = random.random()
            if r < 0.7:
                batch.append({"text": caption, "pixel_values": images[i]})
            elif r < 0.9:
                batch.append({"text": caption, "pixel_values": images[i], "task": "caption"})
            else:
                batch.append({"text": random.choice(TEXTS)})
        return collator(batch)

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    model.train()
    history = []
    start = time.time()
    progress = tqdm(range(args.steps), desc="training")
    for step in progress:
        out = model(**sample_batch())
        optimizer.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        history.append((out.lm_loss.item(), out.diffusion_loss.item()))
        progress.set_postfix(lm=f"{history[-1][0]:.3f}", diffusion=f"{history[-1][1]:.3f}")
    window = max(1, min(20, args.steps // 5))
    first = np.mean(history[:window], axis=0)
    last = np.mean(history[-window:], axis=0)
    print(f"trained {args.steps} steps in {time.time() - start:.0f} s")
    print(f"lm_loss        {first[0]:.3f} -> {last[0]:.3f}  ({first[0] / last[0]:.1f}x lower)")
    print(f"diffusion_loss {first[1]:.3f} -> {last[1]:.3f}  ({first[1] / last[1]:.1f}x lower)")

    model.eval()
    prompt = processor(text=["a handwritten"], padding_side="left")
    generated = model.generate(**prompt, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    print("text generation:", repr(tokenizer.decode(generated[0], skip_special_tokens=True)))

    i = 0
    caption_input = processor(text=["<image>"], images=None, image_sizes=[[(8, 8)]], padding_side="left")
    generated = model.generate(
        **caption_input, latents=images[i : i + 1], max_new_tokens=6, do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    new_tokens = generated[0, caption_input["input_ids"].shape[1] :]
    print(f"caption of a real '{NAMES[labels[i]]}':", repr(tokenizer.decode(new_tokens, skip_special_tokens=True)))

    with tempfile.TemporaryDirectory(prefix="monoformer-quickstart-") as scratch:  # removed unless --output_dir
        output_dir = args.output_dir or scratch
        model.save_pretrained(output_dir)
        processor.save_pretrained(output_dir)
        reloaded = AutoModel.from_pretrained(output_dir, trust_remote_code=True).eval()
        with torch.no_grad():
            a = model(**prompt).logits
            b = reloaded(**prompt).logits
        where = output_dir if args.output_dir else "a temporary folder"
        print(f"saved to {where}; reloaded with AutoModel(trust_remote_code=True): max |logit diff| "
              f"{(a - b).abs().max():.1e}")


if __name__ == "__main__":
    main()
