#!/usr/bin/env python
"""Any-to-any quality of a Fashion-MNIST MonoFormer: captioning and VQA, interleaved generation, instruction editing.

Everything is scored on held-out Fashion-MNIST test images with the independent CNN classifier of
`bench_quality_fashion_mnist.py` (trained once on the train set, cached, >= 90% test accuracy).

- Captioning: `model.generate(**processor(text="<image>", images=[img, ...]))`, greedy, on `--num_captions` test
  images; correct when the caption names the true class. VQA: the same with a question after the image,
  `"<image>What is this?"` (one of the recipe's `--vqa_fraction` training questions) and questions worded in ways the
  recipe never trains (`VQA_HELD_OUT`).
- Interleaved: `pipe.generate_interleaved("Show me a picture of <class>.")` (greedy text, `--runs_per_class` image
  seeds per class): the fraction of runs that emit exactly one image, that image's class accuracy, and example text;
  the same for the caption wording of text-to-image training, `"a photo of <class>"`.
- Editing: `pipe(instruction, image=source)` on `--edits_per_type` held-out test images per edit type: "flip it
  horizontally" and "invert the colours" scored by the mean absolute pixel error (0-1 scale) against the exact
  transform, "turn it into <class>" (a class other than the source's) by the classifier's accuracy for the named
  class. Each next to the do-nothing baseline (the source returned unchanged) and to text-only guidance
  (`image_guidance_scale=1`: the source in both CFG branches). The pixel edits also get a per-class table (dual
  guidance): the do-nothing error of a flip is small for near-symmetric garments and large for shoes, so the
  overall mean alone cannot tell a model that does not flip from one that flips with an imprecise copy.

All image sampling uses the checkpoint's scheduler and the recipe's sampler defaults (`SAMPLER_DEFAULTS`: 20 steps,
guidance 4 on the middle half of the steps). Timings on a shared CPU are indicative only.

    python benchmarks/bench_anytoany_fashion_mnist.py                       # the shipped checkpoint
    python benchmarks/bench_anytoany_fashion_mnist.py --num_captions 200 --runs_per_class 2 --edits_per_type 20

`--examples PATH` also writes one PNG of all three abilities on held-out images, one column per class: the source,
"flip it horizontally", "invert the colours", "turn it into <the next class>" (dual guidance), the image of
`generate_interleaved("Show me a picture of <class>.")`, and that run's text is printed.
"""

import argparse
import os
import pathlib
import sys
import time

import numpy as np
import torch
from diffusers import DiffusionPipeline
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_quality_fashion_mnist import batched, get_classifier  # noqa: E402
from train_fashion_mnist import (  # noqa: E402
    CLASS_EDIT_TEMPLATE, CLASS_NAMES, EDITS, SAMPLER_DEFAULTS, VQA_QUESTIONS, caption_class, class_grid,
    load_fashion_mnist,
)

# The request worded as the recipe's interleaved samples, and the text-to-image caption layout for comparison.
INTERLEAVED_PROMPTS = ["Show me a picture of {}.", "a photo of {}"]
VQA_PROMPT = "<image>What is this?"
# Never in any training sample of the recipe: what a VQA score on them measures is more than three memorised strings.
VQA_HELD_OUT = ["What is shown here?", "Can you name this item?", "Which piece of clothing is in this image?"]
assert not set(VQA_HELD_OUT) & set(VQA_QUESTIONS)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(n, 1, 28, 28) in [-1, 1] -> grayscale PIL images."""
    arrays = ((images[:, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    return [Image.fromarray(a, mode="L") for a in arrays]


def understanding_accuracy(pipe, images, labels, text: str, batch: int = 100, max_new_tokens: int = 10):
    """Greedy answers to `text` (holding one `<image>`) through `model.generate(**processor(...))`."""
    model, processor = pipe.model, pipe.processor
    correct, answers = 0, []
    for start in range(0, len(images), batch):
        chunk = to_pil(images[start : start + batch])
        inputs = processor(text=[text] * len(chunk), images=chunk, padding_side="left")
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=processor.tokenizer.pad_token_id)
        decoded = processor.post_process_image_text_to_text(out[:, inputs["input_ids"].shape[1] :])
        answers += decoded
        correct += sum(caption_class(a) == int(y) for a, y in zip(decoded, labels[start : start + batch]))
    return correct / len(images), answers


def interleaved(pipe, clf, template: str, runs_per_class: int, max_new_tokens: int) -> dict:
    one_image, correct, scored, examples = 0, 0, 0, []
    t0 = time.time()
    for c, name in enumerate(CLASS_NAMES):
        for run in range(runs_per_class):
            out = pipe.generate_interleaved(
                template.format(name), max_new_tokens=max_new_tokens, do_sample=False,
                generator=torch.Generator().manual_seed(1000 * c + run), output_type="pt", **SAMPLER_DEFAULTS,
            )
            images = [s for s in out.segments if not isinstance(s, str)]
            one_image += len(images) == 1
            if images:
                pred = clf(images[0].unsqueeze(0).float() * 2 - 1).argmax(1).item()
                correct += pred == c
                scored += 1
            if run == 0 and len(examples) < 4:
                examples.append(" | ".join(s if isinstance(s, str) else "<image>" for s in out.segments))
    runs = runs_per_class * len(CLASS_NAMES)
    return {"runs": runs, "one_image": one_image / runs, "class_acc": correct / scored if scored else float("nan"),
            "with_image": scored, "examples": examples, "s_per_run": (time.time() - t0) / runs}


def edit_batch(pipe, instructions: list[str], sources: torch.Tensor, seed: int, image_guidance_scale: float,
               sampler: dict | None = None):
    """Edited images in [-1, 1]; `sampler`: the recipe's `SAMPLER_DEFAULTS` unless given (`--edit_guidance_scale`)."""
    out = pipe(
        instructions, image=(sources + 1) / 2, image_guidance_scale=image_guidance_scale, output_type="pt",
        generator=torch.Generator().manual_seed(seed), **(sampler or SAMPLER_DEFAULTS),
    ).images  # (n, 1, 28, 28) in [0, 1]
    return out.float() * 2 - 1


def editing(pipe, clf, images, labels, per_type: int, image_guidance_scale: float, batch: int = 50,
            sampler: dict | None = None) -> tuple[list[tuple], dict]:
    """Rows `(edit, metric, dual guidance, text-only guidance, do-nothing)`, and per pixel edit the per-class mean
    errors `{edit: (dual (10,), do-nothing (10,), count (10,))}`."""
    rows, per_class = [], {}
    sources, source_labels = images[:per_type], labels[:per_type]
    counts = torch.bincount(source_labels, minlength=10)

    def class_means(errors: torch.Tensor) -> torch.Tensor:  # (n,) -> (10,); NaN for a class with no source
        return torch.zeros(10).index_add_(0, source_labels, errors) / counts

    for k, (instruction, transform) in enumerate(EDITS.items()):
        truth = transform(sources)
        errors = {}
        for name, scale in (("dual", image_guidance_scale), ("text", 1.0)):
            edited = torch.cat([edit_batch(pipe, [instruction] * len(chunk), chunk, 10 * k + i, scale, sampler)
                                for i, chunk in enumerate(sources.split(batch))])
            errors[name] = (edited - truth).abs().mean((1, 2, 3)) / 2  # per image; [-1, 1] -> 0-1 pixel scale
        baseline = (sources - truth).abs().mean((1, 2, 3)) / 2
        rows.append((instruction, "mean abs pixel error (lower is better)", errors["dual"].mean().item(),
                     errors["text"].mean().item(), baseline.mean().item()))
        per_class[instruction] = (class_means(errors["dual"]), class_means(baseline), counts)
    rng = np.random.default_rng(0)
    targets = torch.tensor([rng.choice([c for c in range(10) if c != int(y)]) for y in labels[:per_type]])
    instructions = [CLASS_EDIT_TEMPLATE.format(CLASS_NAMES[int(c)]) for c in targets]
    accuracy = {}
    for name, scale in (("dual", image_guidance_scale), ("text", 1.0)):
        edited = torch.cat([
            edit_batch(pipe, instructions[i * batch : (i + 1) * batch], chunk, 100 + i, scale, sampler)
            for i, chunk in enumerate(sources.split(batch))
        ])
        accuracy[name] = (batched(clf, edited).argmax(1) == targets).float().mean().item()
    baseline = (batched(clf, sources).argmax(1) == targets).float().mean().item()
    rows.append(("turn it into <class>", "classifier accuracy for the named class", accuracy["dual"],
                 accuracy["text"], baseline))
    return rows, per_class


@torch.no_grad()
def write_examples(pipe, images, labels, path: str, image_guidance_scale: float, max_new_tokens: int) -> None:
    """Rows: held-out source per class, its three edits, then the interleaved answer's image (see the docstring)."""
    sources = torch.stack([images[int((labels == c).nonzero()[0])] for c in range(10)])  # (10, 1, 28, 28)
    rows = [sources]
    for k, instruction in enumerate(EDITS):
        rows.append(edit_batch(pipe, [instruction] * 10, sources, 7 + k, image_guidance_scale))
    turn = [CLASS_EDIT_TEMPLATE.format(CLASS_NAMES[(c + 1) % 10]) for c in range(10)]
    rows.append(edit_batch(pipe, turn, sources, 9, image_guidance_scale))
    answers = []
    for c, name in enumerate(CLASS_NAMES):
        out = pipe.generate_interleaved(
            INTERLEAVED_PROMPTS[0].format(name), max_new_tokens=max_new_tokens, do_sample=False,
            generator=torch.Generator().manual_seed(c), output_type="pt", **SAMPLER_DEFAULTS,
        )
        made = [s for s in out.segments if not isinstance(s, str)]
        answers.append(made[0].float() * 2 - 1 if made else torch.full((1, 28, 28), -1.0))
        print(f"interleaved {name!r}: " + " | ".join(s if isinstance(s, str) else "<image>" for s in out.segments))
    rows.append(torch.stack(answers))
    cells = (torch.cat(rows)[:, 0].clamp(-1, 1).numpy() + 1) / 2
    grid = class_grid(cells, len(rows), 10)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(path)
    print(f"examples: {path} (rows: source, {', '.join(EDITS)}, turn it into <next class>, interleaved image)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(ROOT / "examples" / "monoformer-fashion-mnist"))
    parser.add_argument("--num_captions", type=int, default=1000)
    parser.add_argument("--runs_per_class", type=int, default=10)
    parser.add_argument("--max_new_tokens", type=int, default=24)
    parser.add_argument("--edits_per_type", type=int, default=100)
    parser.add_argument("--image_guidance_scale", type=float, default=1.5)
    parser.add_argument("--edit_guidance_scale", type=float, default=None,
                        help="text guidance of the edits (default: the recipe's, SAMPLER_DEFAULTS)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--examples", default=None, help="write a PNG of edits and interleaved images here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")

    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    clf, clf_acc = get_classifier(train, test)
    print(f"classifier: {clf_acc:.1%} test accuracy")
    pipe = DiffusionPipeline.from_pretrained(args.checkpoint, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    images, labels = test

    results = []
    if args.num_captions:
        t0 = time.time()
        acc, answers = understanding_accuracy(pipe, images[: args.num_captions], labels[: args.num_captions], "<image>")
        results.append(("captioning accuracy", f"{acc:.3f}", f"{args.num_captions} test images, greedy",
                        f"{time.time() - t0:.0f} s"))
        print(f"captions, e.g.: {answers[:3]}")
        t0 = time.time()
        acc, answers = understanding_accuracy(pipe, images[: args.num_captions], labels[: args.num_captions],
                                              VQA_PROMPT)
        results.append(("VQA accuracy ('What is this?', a training question)", f"{acc:.3f}",
                        f"{args.num_captions} test images, greedy", f"{time.time() - t0:.0f} s"))
        print(f"VQA answers, e.g.: {answers[:3]}")
        for question in VQA_HELD_OUT:
            t0 = time.time()
            acc, answers = understanding_accuracy(pipe, images[: args.num_captions], labels[: args.num_captions],
                                                  "<image>" + question)
            results.append((f"VQA accuracy ({question!r}, never trained)", f"{acc:.3f}",
                            f"{args.num_captions} test images, greedy", f"{time.time() - t0:.0f} s"))
            print(f"VQA {question!r} answers, e.g.: {answers[:3]}")
    for template in INTERLEAVED_PROMPTS if args.runs_per_class else []:
        r = interleaved(pipe, lambda x: batched(clf, x), template, args.runs_per_class, args.max_new_tokens)
        results.append((f"interleaved '{template}': runs with exactly one image", f"{r['one_image']:.3f}",
                        f"{r['runs']} runs, greedy text", f"{r['s_per_run']:.1f} s/run"))
        results.append((f"interleaved '{template}': class accuracy of the image", f"{r['class_acc']:.3f}",
                        f"{r['with_image']} runs with an image", ""))
        for example in r["examples"]:
            print(f"interleaved example: {example!r}")
    for row in results:
        print(f"| {' | '.join(row)} |")
    if args.examples:
        write_examples(pipe, images[1000:], labels[1000:], args.examples, args.image_guidance_scale,
                       args.max_new_tokens)
    if args.edits_per_type:
        t0 = time.time()
        sampler = dict(SAMPLER_DEFAULTS)
        if args.edit_guidance_scale is not None:
            sampler["guidance_scale"] = args.edit_guidance_scale
        rows, per_class = editing(pipe, lambda x: batched(clf, x) if x.ndim == 4 else clf(x), images[1000:],
                                  labels[1000:], args.edits_per_type, args.image_guidance_scale, sampler=sampler)
        print(f"\nediting, {args.edits_per_type} held-out test images per type ({time.time() - t0:.0f} s); dual "
              f"guidance: text {sampler['guidance_scale']}, image {args.image_guidance_scale}")
        print("| edit | metric | dual guidance | text-only guidance | do nothing (source) |\n|---|---|---|---|---|")
        for edit, metric, dual, text, baseline in rows:
            print(f"| {edit} | {metric} | {dual:.3f} | {text:.3f} | {baseline:.3f} |")
        print("\nper class, dual guidance: pixel error / do nothing (sources)")
        print("| edit | " + " | ".join(CLASS_NAMES[c].split(" ")[-1] for c in range(10)) + " |\n|---|"
              + "---:|" * 10)
        for edit, (dual, nothing, counts) in per_class.items():
            print(f"| {edit} | " + " | ".join(f"{d:.3f} / {b:.3f} ({int(n)})" for d, b, n in zip(dual, nothing, counts))
                  + " |")


if __name__ == "__main__":
    main()
