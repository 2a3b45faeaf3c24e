#!/usr/bin/env python
"""Quality of the shipped Fashion-MNIST MonoFormer: images, captions and text, measured with one run.

- A small CNN classifier is trained on the Fashion-MNIST train set once (cached in
  `~/.cache/monoformer/fashion_mnist_cnn.pt`; it must reach >= 90% test accuracy).
- Text -> image: `--per_class` samples per class at the default sampler settings ("a photo of <class>"); class
  accuracy = how often the classifier reads the prompted class; Fréchet distance (FD) of the classifier's penultimate
  features against the 10k test images. The floor: the same FD for 1000 real *train* images.
- Image -> text: greedy captions of `--num_captions` test images; correct when the caption names the true class.
- Text: perplexity on the held-out novel (*Persuasion*, never trained on), 128-token windows.

    python benchmarks/bench_quality_fashion_mnist.py                        # 100 per class (slow on 2 CPU cores)
    python benchmarks/bench_quality_fashion_mnist.py --per_class 20 --num_captions 200
"""

import argparse
import math
import os
import pathlib
import sys
import time

import numpy as np
import torch
from diffusers import DiffusionPipeline
from scipy import linalg
from torch import nn

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from train_fashion_mnist import CLASS_NAMES, SAMPLE_PROMPT_TEMPLATE, caption_class, load_austen_texts, load_fashion_mnist  # noqa: E402,E501

CACHE = pathlib.Path(os.path.expanduser("~/.cache/monoformer/fashion_mnist_cnn.pt"))


class Classifier(nn.Module):
    """Two conv blocks and a 128-d penultimate layer (the FD features)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (32, 14, 14)
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (64, 7, 7)
            nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(),
        )
        self.head = nn.Linear(128, 10)

    def forward(self, x):
        return self.head(self.features(x))


def batched(fn, x: torch.Tensor, size: int = 1000) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(x[i : i + size]) for i in range(0, len(x), size)])


def get_classifier(train, test, epochs: int = 4) -> tuple[Classifier, float]:
    """The cached classifier, or one trained now (Adam, 1e-3 then 2e-4 for the last epoch) and cached if good."""
    clf = Classifier()
    if CACHE.is_file():
        clf.load_state_dict(torch.load(CACHE))
    else:
        torch.manual_seed(0)
        x, y = train
        opt = torch.optim.Adam(clf.parameters(), 1e-3)
        for epoch in range(epochs):
            if epoch == epochs - 1:
                opt.param_groups[0]["lr"] = 2e-4
            perm = torch.randperm(len(x))
            for i in range(0, len(x), 128):
                idx = perm[i : i + 128]
                loss = nn.functional.cross_entropy(clf(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    clf.eval()
    acc = (batched(clf, test[0]).argmax(1) == test[1]).float().mean().item()
    if acc < 0.9:
        raise RuntimeError(f"The reference classifier reaches only {acc:.1%} test accuracy (< 90%); delete {CACHE}.")
    if not CACHE.is_file():
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        torch.save(clf.state_dict(), CACHE)
    return clf, acc


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    # ReLU features have dead units: a small ridge keeps the covariances invertible (as in the reference FID code)
    ridge = 1e-6 * np.eye(a.shape[1])
    cov_a, cov_b = np.cov(a, rowvar=False) + ridge, np.cov(b, rowvar=False) + ridge
    covmean = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(ROOT / "examples" / "monoformer-fashion-mnist"))
    parser.add_argument("--per_class", type=int, default=100)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance_scale", type=float, default=3.0)
    parser.add_argument("--num_captions", type=int, default=1000)
    parser.add_argument("--ppl_windows", type=int, default=40)
    args = parser.parse_args()

    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    t0 = time.time()
    clf, clf_acc = get_classifier(train, test)
    print(f"classifier: {clf_acc:.1%} test accuracy ({time.time() - t0:.0f} s)")
    test_feats = batched(clf.features, test[0]).numpy()

    pipe = DiffusionPipeline.from_pretrained(args.checkpoint, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    model, processor = pipe.model, pipe.processor

    # text -> image
    t0 = time.time()
    generated, prompted = [], []
    for c, name in enumerate(CLASS_NAMES):
        out = pipe(
            SAMPLE_PROMPT_TEMPLATE.format(name), num_images_per_prompt=args.per_class, num_inference_steps=args.steps,
            guidance_scale=args.guidance_scale, generator=torch.Generator().manual_seed(c), output_type="pt",
        ).images  # (n, 1, 28, 28) in [0, 1]
        generated.append(out.float() * 2 - 1)
        prompted += [c] * args.per_class
    generated = torch.cat(generated)
    gen_time = time.time() - t0
    class_acc = (batched(clf, generated).argmax(1) == torch.tensor(prompted)).float().mean().item()
    fd_gen = frechet_distance(batched(clf.features, generated).numpy(), test_feats)
    floor_idx = torch.randperm(len(train[0]), generator=torch.Generator().manual_seed(0))[:1000]
    fd_real = frechet_distance(batched(clf.features, train[0][floor_idx]).numpy(), test_feats)

    # image -> text
    n = args.num_captions
    correct = 0
    for i in range(0, n, 100):
        images, labels = test[0][i : min(n, i + 100)], test[1][i : min(n, i + 100)]
        inputs = processor(text=["<image>"] * len(images), image_sizes=[[(28, 28)]] * len(images), padding_side="left")
        out = model.generate(**inputs, latents=images.to(model.dtype), max_new_tokens=10, do_sample=False)
        captions = processor.post_process_image_text_to_text(out[:, inputs["input_ids"].shape[1] :])
        correct += sum(caption_class(c) == int(y) for c, y in zip(captions, labels))
    caption_acc = correct / n

    # text
    tokenizer = processor.tokenizer
    ids = tokenizer("\n".join(load_austen_texts(split="test")), return_tensors="pt")["input_ids"][0]
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(args.ppl_windows):
            window = ids[w * 128 : (w + 1) * 128].unsqueeze(0)
            out = model(input_ids=window, labels=window)
            nll += out.lm_loss.item() * (window.shape[1] - 1)
            count += window.shape[1] - 1
    ppl = math.exp(nll / count)

    rows = [
        ("class accuracy of samples (classifier)", f"{class_acc:.1%}", f"{args.per_class}/class, {args.steps} steps, "
         f"cfg {args.guidance_scale}, {gen_time:.0f} s"),
        ("FD(samples, test) penultimate CNN features", f"{fd_gen:.2f}", f"{len(generated)} samples"),
        ("FD(1000 real train images, test) [floor]", f"{fd_real:.2f}", "real data"),
        ("captioning accuracy on test images", f"{caption_acc:.1%}", f"{n} images, greedy"),
        ("perplexity, held-out Austen (Persuasion)", f"{ppl:.1f}", f"{count} tokens, 128-token windows"),
        ("reference classifier test accuracy", f"{clf_acc:.1%}", "10k test images"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\n{'metric':<{width}}  {'value':>8}  setting")
    for name, value, setting in rows:
        print(f"{name:<{width}}  {value:>8}  {setting}")


if __name__ == "__main__":
    main()
