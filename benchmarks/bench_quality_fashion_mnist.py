#!/usr/bin/env python
"""Quality of a Fashion-MNIST MonoFormer (images, captions, text) and, with `--with-peer`, of the strongest peer.

- A small CNN classifier scores everything: the committed `benchmarks/fashion_mnist_cnn.safetensors` (90.8% test
  accuracy; checked >= 90% at every use). It is the instrument, fixed like FID's Inception weights: retrained per
  machine (same seed, other CPU) it read the same 1,000 samples' weakest class as 0.92 once and 0.86 another time.
  Without that file one is trained on the train set (seed 0, 4 epochs) and cached in
  `~/.cache/monoformer/fashion_mnist_cnn.pt`.
- Text -> image: `--per_class` samples per class at the given sampler settings ("a photo of <class>"):
  - class accuracy (the classifier reads the prompted class), overall and per class;
  - Fréchet distance (FD) of the classifier's 128-d penultimate features against the 10k test images, next to the
    floor: the same FD for 1,000 real *train* images;
  - within-class diversity: mean pairwise feature distance among the samples of each class, as a ratio to the same
    number for real test images of that class (1.0 = as diverse as the data; mode collapse -> 0).
  - network evaluations (NFE) per image: scheduler steps x 2 under classifier-free guidance (batched rows count).
- Image -> text: greedy captions of `--num_captions` test images; correct when the caption names the true class.
- Text: perplexity on the held-out novel (*Persuasion*, never trained on), 128-token windows.

`--with-peer` (slow, about 50 minutes on 2 cores; run it alone): the head-to-head at equal training budget.
- the peer, lucidrains' `transfusion-pytorch` 0.20.0 (`pip install -e ".[peer]"`), dim 256, depth 6, 8 heads of 32
  (15.7 M parameters), 4x4 pixel patches (a (7, 7, 16) latent) with its 2D position embedding, the class name as its
  text (one token), AdamW 5e-4, batch 16, gradient clipping 0.5 and `create_ema()` as its MNIST example, trained for
  `--train_minutes` on the same images (no flips, as ours), sampled with `sample_one`, guidance 3 and `--peer_grid`
  time-grid points (its midpoint solver; NFE counted by wrapping its transformer). `--peer_samples F` caches its
  samples (and steps, images seen, s/image) so a later run re-scores them without another 20-minute training run;
- ours: `examples/train_fashion_mnist.py` with its default recipe for the same `--train_minutes` (or
  `--ours_checkpoint`, a pipeline folder such a run wrote), sampled at the default settings (21 NFE per image, fewer
  than the peer's 29) with as many samples per class as the peer.
Both are scored with the same classifier in this run; steps, images seen and seconds per image are reported.
Run it on a quiet machine: both training budgets are wall-clock.

    python benchmarks/bench_quality_fashion_mnist.py                        # the shipped checkpoint, 100 per class
    python benchmarks/bench_quality_fashion_mnist.py --per_class 20 --num_captions 200
    python benchmarks/bench_quality_fashion_mnist.py --with-peer            # head-to-head, 20 minutes each
"""

import argparse
import itertools
import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from diffusers import (
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    UniPCMultistepScheduler,
)
from scipy import linalg
from torch import nn

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from timing import count_forward_calls  # noqa: E402
from train_fashion_mnist import (  # noqa: E402
    CLASS_NAMES, SAMPLE_PROMPT_TEMPLATE, SAMPLER_DEFAULTS, caption_class, load_austen_texts, load_fashion_mnist,
)

REFERENCE = pathlib.Path(__file__).resolve().with_name("fashion_mnist_cnn.safetensors")  # the scoring instrument
CACHE = pathlib.Path(os.path.expanduser("~/.cache/monoformer/fashion_mnist_cnn.pt"))  # only without REFERENCE
SHORT_NAMES = [n.split(" ")[-1] for n in CLASS_NAMES]  # "t-shirt", "trousers", ..., "boot"


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
    """The committed reference classifier; without it the cached one, or one trained now (Adam, 1e-3 then 2e-4 for
    the last epoch) and cached if good."""
    clf = Classifier()
    if REFERENCE.is_file():
        from safetensors.torch import load_file

        clf.load_state_dict(load_file(REFERENCE))
    elif CACHE.is_file():
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
        fix = (f"{REFERENCE} or the test set differs from the committed one (`git checkout` it; check "
               f"examples/install_data.sh)" if REFERENCE.is_file() else f"delete {CACHE} to train a new one")
        raise RuntimeError(f"The reference classifier reaches only {acc:.1%} test accuracy (< 90%): {fix}.")
    if not REFERENCE.is_file() and not CACHE.is_file():
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


def mean_pairwise_distance(feats: torch.Tensor) -> float:
    """Mean L2 distance over all pairs of rows (n, d) -> float."""
    n = len(feats)
    return (torch.cdist(feats, feats).sum() / (n * (n - 1))).item()


class Scorer:
    """The classifier plus the real-data references every model is compared with."""

    def __init__(self, train, test, per_class_real: int = 100):
        t0 = time.time()
        self.clf, self.clf_acc = get_classifier(train, test)
        print(f"classifier: {self.clf_acc:.1%} test accuracy ({time.time() - t0:.0f} s)")
        self.test_feats = batched(self.clf.features, test[0])
        idx = torch.randperm(len(train[0]), generator=torch.Generator().manual_seed(0))[:1000]
        self.fd_floor = frechet_distance(batched(self.clf.features, train[0][idx]).numpy(), self.test_feats.numpy())
        self.real_diversity = []
        for c in range(10):
            feats = self.test_feats[test[1] == c][:per_class_real]
            self.real_diversity.append(mean_pairwise_distance(feats))

    def score(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        """`images` (N, 1, 28, 28) in [-1, 1], `labels` (N,) the prompted classes -> metrics."""
        feats = batched(self.clf.features, images)
        pred = self.clf.head(feats).argmax(1)
        per_class = [(pred[labels == c] == c).float().mean().item() for c in range(10)]
        diversity = [mean_pairwise_distance(feats[labels == c]) / self.real_diversity[c] for c in range(10)]
        return {
            "class_acc": (pred == labels).float().mean().item(), "per_class_acc": per_class,
            "fd": frechet_distance(feats.numpy(), self.test_feats.numpy()), "diversity": diversity,
        }


# ---------------------------------------------------------------------------------------------------------- ours
SCHEDULERS = {
    "euler": lambda cfg: FlowMatchEulerDiscreteScheduler.from_config(cfg),
    # x0-prediction re-noised with fresh noise at every step (diffusers' `stochastic_sampling`)
    "euler-sde": lambda cfg: FlowMatchEulerDiscreteScheduler.from_config(cfg, stochastic_sampling=True),
    "heun": lambda cfg: FlowMatchHeunDiscreteScheduler.from_config(cfg),
    "dpm": lambda cfg: DPMSolverMultistepScheduler(
        use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=cfg.get("shift", 1.0)
    ),
    "unipc": lambda cfg: UniPCMultistepScheduler(
        use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=cfg.get("shift", 1.0)
    ),
}


def set_scheduler(pipe, name: str | None, shift: float | None = None) -> None:
    """Swap the pipeline's scheduler (flow-matching models); `None` keeps the checkpoint's. `shift`: the flow time
    shift (sigma -> shift*sigma / (1 + (shift-1)*sigma); > 1 spends more steps at high noise), `None` keeps it."""
    if name is None and shift is None:
        return
    if pipe.model.config.prediction_type != "flow":
        raise ValueError(f"--scheduler/--shift are for flow models; this checkpoint predicts "
                         f"{pipe.model.config.prediction_type!r}: leave them unset.")
    cfg = dict(pipe.scheduler.config)
    if shift is not None:
        cfg["shift"] = shift
    if name is None:
        pipe.scheduler = type(pipe.scheduler).from_config(cfg)
    else:
        pipe.scheduler = SCHEDULERS[name](cfg)


def make_guider(spec: str):
    """A `diffusers.guiders` guider from `NAME[:KEY=VALUE,...]`, e.g. `cfg`, `apg:eta=0`, `zero-star`: the sweep's
    guider axis (the scale, start and stop come from the other axes, as call overrides)."""
    from diffusers import guiders

    classes = {"cfg": guiders.ClassifierFreeGuidance, "apg": guiders.AdaptiveProjectedGuidance,
               "zero-star": guiders.ClassifierFreeZeroStarGuidance,
               "tangential": guiders.TangentialClassifierFreeGuidance}
    name, _, options = spec.partition(":")
    if name not in classes:
        raise ValueError(f"--sweep_guiders: unknown guider {name!r} in {spec!r}; choose from {sorted(classes)}.")
    kwargs = {}
    for item in filter(None, options.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--sweep_guiders: {item!r} in {spec!r} is not KEY=VALUE.")
        kwargs[key] = json.loads(value)
    return classes[name](**kwargs)


def sample_ours(pipe, per_class: int, steps: int, guidance: float, interval=(0.0, 1.0), batch: int = 100) -> dict:
    """`per_class` images per class, seeded per class -> images in [-1, 1], labels, s/image, NFE/image.

    `interval`: the guided fraction of the steps (`guidance_start`, `guidance_stop`); NFE counts the rows of every
    denoising call (2 per image on guided steps, 1 elsewhere)."""
    # checkpoints saved before the guidance interval existed carry a pipeline without these arguments
    interval_kw = {} if tuple(interval) == (0.0, 1.0) else {"guidance_start": interval[0], "guidance_stop": interval[1]}
    images, labels = [], []
    t0 = time.time()
    rows_of = lambda args, kwargs: 0 if kwargs.get("latents") is None else len(kwargs["latents"])  # noqa: E731
    with count_forward_calls(pipe.model, rows_of) as rows:
        for c, name in enumerate(CLASS_NAMES):
            for start in range(0, per_class, batch):
                n = min(batch, per_class - start)
                out = pipe(
                    SAMPLE_PROMPT_TEMPLATE.format(name), num_images_per_prompt=n, num_inference_steps=steps,
                    guidance_scale=guidance, generator=torch.Generator().manual_seed(1000 * c + start),
                    output_type="pt", **interval_kw,
                ).images  # (n, 1, 28, 28) in [0, 1]
                images.append(out.float().cpu() * 2 - 1)
                labels += [c] * n
    seconds = time.time() - t0
    nfe = rows[0] / len(labels)
    return {"images": torch.cat(images), "labels": torch.tensor(labels), "s_per_image": seconds / len(labels),
            "nfe": nfe}


def caption_accuracy(model, processor, test, n: int) -> float:
    correct = 0
    for i in range(0, n, 100):
        images, labels = test[0][i : min(n, i + 100)], test[1][i : min(n, i + 100)]
        inputs = processor(text=["<image>"] * len(images), image_sizes=[[(28, 28)]] * len(images), padding_side="left")
        inputs = inputs.to(model.device)
        out = model.generate(**inputs, latents=images.to(model.device, model.dtype), max_new_tokens=10, do_sample=False)
        captions = processor.post_process_image_text_to_text(out[:, inputs["input_ids"].shape[1] :])
        correct += sum(caption_class(c) == int(y) for c, y in zip(captions, labels))
    return correct / n


def perplexity(model, tokenizer, windows: int) -> tuple[float, int]:
    ids = tokenizer("\n".join(load_austen_texts(split="test")), return_tensors="pt")["input_ids"][0]
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(windows):
            window = ids[w * 128 : (w + 1) * 128].unsqueeze(0)
            out = model(input_ids=window, labels=window)
            nll += out.lm_loss.item() * (window.shape[1] - 1)
            count += window.shape[1] - 1
    return math.exp(nll / count), count


# ---------------------------------------------------------------------------------------------------------- peer
def build_peer(dim: int, depth: int, heads: int, patch: int = 4):
    """The peer as its own image examples configure it (`add_pos_emb=True`: without it the patch tokens carry no 2D
    position and samples are patch noise), heads of 32 (= dim / heads) -> 15.7 M parameters at dim 256, depth 6."""
    try:
        from transfusion_pytorch import Transfusion
    except ImportError as err:
        raise SystemExit("--with-peer needs transfusion-pytorch: `pip install -e \".[peer]\"`.") from err
    try:  # the peer logs every sampling call through loguru
        from loguru import logger

        logger.remove()
    except ImportError:
        pass
    grid = 28 // patch
    return Transfusion(
        num_text_tokens=len(CLASS_NAMES), dim_latent=patch * patch, modality_default_shape=(grid, grid),
        modality_num_dim=2, add_pos_emb=True, transformer=dict(dim=dim, depth=depth, heads=heads, dim_head=dim // heads),
    )


def class_text(c: int) -> torch.Tensor:
    """The peer's text: the class name as one token of a 10-word vocabulary (as its MNIST example does)."""
    return torch.tensor([c], dtype=torch.long)


def train_peer(train, minutes: float, batch: int, lr: float, seed: int, args) -> dict:
    """The peer's own training loop as its MNIST example (its `forward` returns the joint loss; gradients clipped to
    0.5; `create_ema()`), with the optimiser of the issue: AdamW 5e-4, batch 16."""
    from tqdm.auto import tqdm

    from modeling_monoformer.modeling_monoformer import patchify

    torch.manual_seed(seed)
    peer = build_peer(args.peer_dim, args.peer_depth, args.peer_heads)
    ema = peer.create_ema()
    opt = torch.optim.AdamW(peer.parameters(), lr=lr)
    x, y = train
    gen = torch.Generator().manual_seed(seed)
    steps, start = 0, time.time()
    progress = tqdm(desc=f"peer training ({minutes:g} min)", dynamic_ncols=True)
    peer.train()
    while time.time() - start < minutes * 60:
        idx = torch.randint(len(x), (batch,), generator=gen)
        patches = patchify(x[idx], 4).reshape(batch, 7, 7, 16)
        loss = peer([[class_text(int(y[i])), (0, patches[j])] for j, i in enumerate(idx.tolist())])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(peer.parameters(), 0.5)
        opt.step()
        ema.update()
        steps += 1
        progress.update()
        progress.set_postfix(loss=f"{loss.item():.3f}")
    progress.close()
    n_params = sum(p.numel() for p in peer.parameters())
    return {"model": ema.ema_model.eval(), "steps": steps, "images_seen": steps * batch, "params": n_params,
            "train_seconds": time.time() - start}


def sample_peer(peer, per_class: int, guidance: float, grid_points: int) -> dict:
    from modeling_monoformer.modeling_monoformer import unpatchify

    images, labels = [], []
    t0 = time.time()
    with count_forward_calls(peer.transformer) as calls:
        with torch.no_grad():
            for c in range(10):
                torch.manual_seed(c)
                prompt = torch.cat([class_text(c), torch.tensor([peer.som_ids[0]])])
                for _ in range(per_class):
                    out = peer.sample_one(prompt, cfg_scale=guidance, max_length=48, fixed_modality_shape=(7, 7),
                                          modality_steps=grid_points)
                    latent = next(part for part in out if not torch.is_tensor(part)).tensor  # (7, 7, 16)
                    images.append(unpatchify(latent.reshape(1, 49, 16), 28, 28, 4).clamp(-1, 1))
                    labels.append(c)
    seconds = time.time() - t0
    return {"images": torch.cat(images), "labels": torch.tensor(labels), "s_per_image": seconds / len(labels),
            "nfe": calls[0] / len(labels)}


# ---------------------------------------------------------------------------------------------------------- report
def print_image_table(results: dict, scorer: Scorer) -> None:
    names = list(results)
    width = 34
    print(f"\n{'text -> image':<{width}} " + " ".join(f"{n:>16}" for n in names))

    def row(label, fn):
        print(f"{label:<{width}} " + " ".join(f"{fn(results[n]):>16}" for n in names))

    row("class accuracy", lambda r: f"{r['class_acc']:.3f}")
    row("weakest class", lambda r: f"{SHORT_NAMES[int(np.argmin(r['per_class_acc']))]} "
                                   f"{min(r['per_class_acc']):.2f}")
    row(f"FD (floor {scorer.fd_floor:.2f})", lambda r: f"{r['fd']:.2f}")
    row("FD / floor", lambda r: f"{r['fd'] / scorer.fd_floor:.2f}x")
    row("diversity vs real (mean)", lambda r: f"{np.mean(r['diversity']):.2f}")
    row("NFE per image", lambda r: f"{r['nfe']:g}")
    row("seconds per image", lambda r: f"{r['s_per_image']:.3f}")
    for key in ("steps", "images_seen", "params"):
        if any(key in r for r in results.values()):
            row(key.replace("_", " "), lambda r, k=key: f"{r.get(k, float('nan')):,}" if k in r else "-")
    print(f"\n{'per class: accuracy / diversity':<{width}} " + " ".join(f"{n:>16}" for n in names) + "   real div")
    for c in range(10):
        cells = " ".join(f"{r['per_class_acc'][c]:>9.2f} / {r['diversity'][c]:.2f}" for r in results.values())
        print(f"{SHORT_NAMES[c]:<{width}} {cells}   {scorer.real_diversity[c]:8.2f}")


def sweep(pipe, scorer: Scorer, args) -> list[dict]:
    """One row per (scheduler, shift, guider, steps, guidance, interval): the sampler-settings table (NFE measured);
    returns the rows."""
    rows = []
    print(f"\n| scheduler | shift | guider | steps | guidance | guided steps | NFE/image | class acc | weakest class | "
          f"FD (floor {scorer.fd_floor:.2f}) | diversity | s/image |\n" + "|---" * 12 + "|",
          flush=True)
    saved_guider = pipe.guider
    for name, shift, guider in itertools.product(args.sweep_schedulers, args.sweep_shifts, args.sweep_guiders):
        set_scheduler(pipe, name, shift)
        shift = pipe.scheduler.config.get("shift", 1.0)
        pipe.guider = saved_guider if guider is None else make_guider(guider)
        for steps in args.sweep_steps:
            for guidance in args.sweep_guidance:
                for interval in args.sweep_intervals:
                    start, stop = (float(v) for v in interval.split("-"))
                    ours = sample_ours(pipe, args.per_class, steps, guidance, (start, stop))
                    r = scorer.score(ours["images"], ours["labels"])
                    weakest = int(np.argmin(r["per_class_acc"]))
                    print(f"| {name} | {shift:g} | {guider or 'saved'} | {steps} | {guidance:g} | {start:g}-{stop:g} | "
                          f"{ours['nfe']:g} | "
                          f"{r['class_acc']:.3f} | {SHORT_NAMES[weakest]} {r['per_class_acc'][weakest]:.2f} | "
                          f"{r['fd']:.2f} | {np.mean(r['diversity']):.2f} | {ours['s_per_image']:.3f} |", flush=True)
                    rows.append({"scheduler": name, "shift": shift, "guider": guider, "steps": steps,
                                 "guidance_scale": guidance, "guidance_start": start, "guidance_stop": stop,
                                 "nfe": ours["nfe"], "class_acc": r["class_acc"],
                                 "per_class_acc": r["per_class_acc"], "fd": r["fd"], "fd_floor": scorer.fd_floor,
                                 "diversity": float(np.mean(r["diversity"])), "s_per_image": ours["s_per_image"]})
    pipe.guider = saved_guider
    return rows


def train_ours(minutes: float, seed: int, out_dir: str) -> dict:
    cmd = [sys.executable, str(ROOT / "examples" / "train_fashion_mnist.py"), "--minutes", str(minutes),
           "--seed", str(seed), "--output_dir", out_dir, "--sample_every_minutes", "1000"]
    print("training ours:", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)
    return json.loads((pathlib.Path(out_dir) / "summary.json").read_text())


def run_summary(checkpoint: str) -> dict:
    """steps / images seen of the run that wrote `checkpoint` (its summary.json sits beside or above it)."""
    for folder in (pathlib.Path(checkpoint), pathlib.Path(checkpoint).parent):
        if (folder / "summary.json").is_file():
            s = json.loads((folder / "summary.json").read_text())
            out = {"steps": s["steps"], "train_seconds": s["train_seconds"]}
            if "images_seen" in s:
                out["images_seen"] = s["images_seen"]
            return out
    return {}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(ROOT / "examples" / "monoformer-fashion-mnist"))
    parser.add_argument("--per_class", type=int, default=100)
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: the README's defaults)")
    parser.add_argument("--guidance_scale", type=float, default=None)
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None, help="default: the checkpoint's")
    parser.add_argument("--num_captions", type=int, default=1000)
    parser.add_argument("--ppl_windows", type=int, default=40)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
                        help="score the checkpoint at each (e.g. `--dtypes float32 bfloat16`: the cost of bf16)")
    parser.add_argument("--sweep", action="store_true",
                        help="sampler settings table: schedulers x steps x guidance scales (images only)")
    parser.add_argument("--sweep_schedulers", nargs="+", default=["euler", "dpm", "unipc", "heun"])
    parser.add_argument("--sweep_shifts", nargs="+", type=float, default=[None],
                        help="flow time shifts to try (default: the checkpoint's)")
    parser.add_argument("--sweep_guiders", nargs="+", default=[None],
                        help="diffusers guiders as NAME[:KEY=VALUE,...] (cfg, apg, zero-star, tangential), e.g. "
                             "cfg apg:eta=0 apg:adaptive_projected_guidance_rescale=5; default: the checkpoint's")
    parser.add_argument("--sweep_steps", nargs="+", type=int, default=[14])
    parser.add_argument("--sweep_guidance", nargs="+", type=float, default=[2.0, 3.0, 4.0])
    parser.add_argument("--sweep_intervals", nargs="+", default=["0-1"],
                        help="guided fraction of the steps as START-STOP, e.g. 0-1 (always), 0-0.5 (first half)")
    parser.add_argument("--sweep_json", default=None, help="write the sweep's rows here")
    parser.add_argument("--device", default="cpu", help="where the pipeline samples (e.g. cuda); scoring stays on CPU")
    parser.add_argument("--guidance_start", type=float, default=None)
    parser.add_argument("--guidance_stop", type=float, default=None)
    group = parser.add_argument_group("head-to-head with transfusion-pytorch")
    group.add_argument("--with-peer", dest="with_peer", action="store_true")
    group.add_argument("--train_minutes", type=float, default=20.0)
    group.add_argument("--ours_checkpoint", default=None, help="a pipeline folder from a --train_minutes run of ours")
    group.add_argument("--peer_per_class", type=int, default=50, help="the peer samples at ~1 s/image")
    group.add_argument("--peer_grid", type=int, default=8, help="the peer's time-grid points (sample_one)")
    group.add_argument("--peer_guidance", type=float, default=3.0)
    group.add_argument("--peer_dim", type=int, default=256)
    group.add_argument("--peer_depth", type=int, default=6)
    group.add_argument("--peer_heads", type=int, default=8)
    group.add_argument("--peer_samples", default=None,
                       help="a .pt file of the peer's samples: written after its training run if missing, reused if "
                            "present (the peer's 20-minute run and ~8 minutes of sampling are then not repeated)")
    group.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")

    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    scorer = Scorer(train, test)
    steps = args.steps or SAMPLER_DEFAULTS["num_inference_steps"]
    guidance = args.guidance_scale or SAMPLER_DEFAULTS["guidance_scale"]
    scheduler = args.scheduler  # default: the checkpoint's own scheduler
    start = SAMPLER_DEFAULTS["guidance_start"] if args.guidance_start is None else args.guidance_start
    stop = SAMPLER_DEFAULTS["guidance_stop"] if args.guidance_stop is None else args.guidance_stop

    results = {}
    if args.with_peer:
        if args.peer_samples and os.path.isfile(args.peer_samples):
            peer_samples = torch.load(args.peer_samples)
            print(f"peer samples from {args.peer_samples} ({peer_samples['settings']})")
        else:
            peer_run = train_peer(train, args.train_minutes, batch=16, lr=5e-4, seed=args.seed, args=args)
            print(f"peer: {peer_run['params'] / 1e6:.1f} M params, {peer_run['steps']} steps in "
                  f"{peer_run['train_seconds'] / 60:.1f} min", flush=True)
            peer_samples = sample_peer(peer_run["model"], args.peer_per_class, args.peer_guidance, args.peer_grid)
            peer_samples.update({k: peer_run[k] for k in ("steps", "images_seen", "params")})
            peer_samples["settings"] = (f"{args.train_minutes:g} min, sample_one, {args.peer_grid} grid points, "
                                        f"guidance {args.peer_guidance}, {args.peer_per_class} per class")
            if args.peer_samples:
                torch.save(peer_samples, args.peer_samples)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = args.ours_checkpoint
            if ckpt is None:
                train_ours(args.train_minutes, args.seed, tmp)
                ckpt = os.path.join(tmp, "pipeline")
            pipe = DiffusionPipeline.from_pretrained(ckpt, trust_remote_code=True)
            summary = run_summary(ckpt)
        pipe.set_progress_bar_config(disable=True)
        set_scheduler(pipe, scheduler)
        n_peer = len(peer_samples["labels"]) // 10  # same sample count for both: the FD estimate depends on it
        ours = sample_ours(pipe, n_peer, steps, guidance, (start, stop))
        if ours["nfe"] > peer_samples["nfe"]:
            print(f"WARNING: ours uses {ours['nfe']} NFE per image, more than the peer's {peer_samples['nfe']:g}")
        minutes = summary.get("train_seconds", args.train_minutes * 60) / 60
        results[f"ours {minutes:.0f} min"] = {
            **scorer.score(ours["images"], ours["labels"]), **ours, **summary,
            "params": sum(p.numel() for p in pipe.model.parameters()),
        }
        results[f"peer {peer_samples['settings'].split(' min')[0]} min"] = {
            **scorer.score(peer_samples["images"], peer_samples["labels"]), **peer_samples,
        }
        a, b = results.values()
        print(f"\nsampler: ours {type(pipe.scheduler).__name__} {steps} steps, guidance {guidance} on steps "
              f"{start:g}-{stop:g}, "
              f"{n_peer} samples per class; peer: {peer_samples['settings']}")
        print_image_table(results, scorer)
        print(f"\nours / peer: FD {a['fd'] / b['fd']:.2f}x (target <= 0.4x), class accuracy {a['class_acc']:.3f} "
              f"(target >= 0.95), NFE {a['nfe']} vs {b['nfe']:g}, s/image {a['s_per_image'] / b['s_per_image']:.3f}x")
        return

    pipe = DiffusionPipeline.from_pretrained(args.checkpoint, trust_remote_code=True).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    if args.sweep:
        rows = sweep(pipe, scorer, args)
        if args.sweep_json:
            pathlib.Path(args.sweep_json).write_text(json.dumps(rows, indent=2))
        return
    set_scheduler(pipe, scheduler)
    for dtype in args.dtypes:  # the same seeds at each dtype
        pipe.to(getattr(torch, dtype))
        ours = sample_ours(pipe, args.per_class, steps, guidance, (start, stop))
        name = "ours" if len(args.dtypes) == 1 else f"ours {dtype}"
        results[name] = {**scorer.score(ours["images"], ours["labels"]), **ours, **run_summary(args.checkpoint)}
    print(f"\ncheckpoint {args.checkpoint}; sampler {type(pipe.scheduler).__name__}, {steps} steps, guidance "
          f"{guidance} on steps {start:g}-{stop:g}, {args.per_class} samples per class")
    print_image_table(results, scorer)
    if len(args.dtypes) > 1:
        return  # the dtype comparison is about images; captions and perplexity follow with one dtype

    caption_acc = caption_accuracy(pipe.model, pipe.processor, test, args.num_captions) if args.num_captions else None
    ppl, count = perplexity(pipe.model, pipe.processor.tokenizer, args.ppl_windows) if args.ppl_windows else (None, 0)
    r = results["ours"]
    rows = [
        ("class accuracy of samples (classifier)", f"{r['class_acc']:.1%}", f"{args.per_class}/class"),
        ("FD(samples, test) penultimate CNN features", f"{r['fd']:.2f}", f"{len(r['labels'])} samples"),
        ("FD(1000 real train images, test) [floor]", f"{scorer.fd_floor:.2f}", "real data"),
        ("captioning accuracy on test images", f"{caption_acc:.1%}" if caption_acc is not None else "-",
         f"{args.num_captions} images, greedy"),
        ("perplexity, held-out Austen (Persuasion)", f"{ppl:.1f}" if ppl else "-", f"{count} tokens, 128-token windows"),
        ("reference classifier test accuracy", f"{scorer.clf_acc:.1%}", "10k test images"),
    ]
    width = max(len(row[0]) for row in rows)
    print(f"\n{'metric':<{width}}  {'value':>8}  setting")
    for name, value, setting in rows:
        print(f"{name:<{width}}  {value:>8}  {setting}")


if __name__ == "__main__":
    main()
