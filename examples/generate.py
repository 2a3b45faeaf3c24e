#!/usr/bin/env python
"""Use the shipped Fashion-MNIST MonoFormer: paint every class, caption real test images, continue a text.

One set of weights does all three. The checkpoint (`examples/monoformer-fashion-mnist`, trained from scratch by
`examples/train_fashion_mnist.py`) is a self-contained diffusers folder: this script needs only `diffusers`,
`transformers` and `torch` (the `modeling_monoformer` package is not imported; its code travels with the folder).

    python examples/generate.py                                  # outputs/samples.png: one row per class
    python examples/generate.py --prompt "a photo of a sneaker" --seed 3 --steps 30 --output outputs/sneakers.png

The sampler is the checkpoint's own (its saved scheduler, step count and guider) unless `--steps`, `--guidance_scale`,
`--guidance_start` or `--guidance_stop` override it for this run.

Captioning reads the Fashion-MNIST test set (`apt-get install -y dataset-fashion-mnist`); without it that part is
skipped with a note.
"""

import argparse
import gzip
import os
import pathlib
import time

import numpy as np
import torch
from diffusers import DiffusionPipeline
from PIL import Image, ImageDraw

CHECKPOINT = pathlib.Path(__file__).resolve().parent / "monoformer-fashion-mnist"
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES = [
    "a t-shirt", "a pair of trousers", "a pullover", "a dress", "a coat",
    "a sandal", "a shirt", "a sneaker", "a bag", "an ankle boot",
]
PROMPT_TEMPLATE = "a photo of {}"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(CHECKPOINT), help="a MonoFormerPipeline folder")
    parser.add_argument("--prompt", default=None, help="one prompt (default: one row per Fashion-MNIST class)")
    parser.add_argument("--per_prompt", type=int, default=8, help="images per prompt (grid columns)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the checkpoint's)")
    parser.add_argument("--guidance_scale", type=float, default=None, help="default: the checkpoint's guider")
    parser.add_argument("--guidance_start", type=float, default=None, help="first guided step, fraction of the steps")
    parser.add_argument("--guidance_stop", type=float, default=None, help="end of the guided steps, fraction")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="bfloat16 pays off where the CPU/GPU computes it natively (AVX512-BF16/AMX, CUDA sm80+; "
                        "`modeling_monoformer.bf16_supported()` tells)")
    parser.add_argument("--output", default=os.path.join("outputs", "samples.png"),
                        help="Where the image grid goes (outputs/ is git-ignored, so the checkout stays clean).")
    parser.add_argument("--num_captions", type=int, default=8, help="test images to caption (0: skip)")
    parser.add_argument("--text_prompt", default="It is a truth universally acknowledged, that")
    parser.add_argument("--max_new_tokens", type=int, default=40)
    return parser.parse_args(argv)


def load_idx(path: str) -> np.ndarray:
    """Read a gzipped IDX file (the MNIST format) into a uint8 array."""
    data = gzip.open(path).read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def labelled_grid(images: np.ndarray, labels: list[str], cols: int, scale: int = 3) -> Image.Image:
    """`(rows * cols, H, W)` in [0, 1] -> a grid with one text label per row, upscaled `scale` times."""
    rows = len(labels)
    h, w = images.shape[1:3]
    pad, label_w = 2, 120
    cell = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad), 0.5, dtype=np.float32)
    for k, img in enumerate(images):
        r, c = divmod(k, cols)
        cell[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = img
    grid = Image.fromarray((cell * 255).round().astype(np.uint8)).resize(
        (cell.shape[1] * scale, cell.shape[0] * scale), Image.NEAREST
    )
    canvas = Image.new("L", (grid.width + label_w, grid.height), 255)
    canvas.paste(grid, (label_w, 0))
    draw = ImageDraw.Draw(canvas)
    for r, label in enumerate(labels):
        draw.text((4, (pad + r * (h + pad) + h // 2) * scale - 6), label, fill=0)
    return canvas


def caption_test_images(pipe, n: int) -> None:
    """Greedy-caption the first `n` test images: the clean image goes in the prompt, `model.generate` writes."""
    paths = [os.path.join(FASHION_MNIST_DIR, f"t10k-{k}-ubyte.gz") for k in ("images-idx3", "labels-idx1")]
    if not all(os.path.isfile(p) for p in paths):
        print("captioning skipped: Fashion-MNIST test set not found; apt-get install -y dataset-fashion-mnist")
        return
    images, labels = load_idx(paths[0])[:n], load_idx(paths[1])[:n]
    processor, model = pipe.processor, pipe.model
    pixel_values = torch.from_numpy(images.copy()).float().div(127.5).sub(1).unsqueeze(1).to(model.dtype)
    inputs = processor(text=["<image>"] * n, image_sizes=[[(28, 28)]] * n, padding_side="left")
    generated = model.generate(
        **inputs, latents=pixel_values, max_new_tokens=8, do_sample=False,
        pad_token_id=processor.tokenizer.pad_token_id,
    )
    captions = processor.post_process_image_text_to_text(generated[:, inputs["input_ids"].shape[1] :])
    for label, caption in zip(labels, captions):
        print(f"  test image of {CLASS_NAMES[label]:<20} -> {caption.strip()!r}")


def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    pipe = DiffusionPipeline.from_pretrained(args.checkpoint, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(getattr(torch, args.dtype))
    print(f"loaded {type(pipe).__name__} from {args.checkpoint} in {time.time() - start:.1f} s ({pipe.model.dtype})")

    # 1. text -> image: one row per prompt
    prompts = [args.prompt] if args.prompt else [PROMPT_TEMPLATE.format(n) for n in CLASS_NAMES]
    t0 = time.time()
    overrides = {name: value for name, value in (
        ("num_inference_steps", args.steps), ("guidance_scale", args.guidance_scale),
        ("guidance_start", args.guidance_start), ("guidance_stop", args.guidance_stop),
    ) if value is not None}
    images = pipe(
        prompts, num_images_per_prompt=args.per_prompt, generator=torch.Generator().manual_seed(args.seed),
        output_type="np", **overrides,
    ).images
    labels = [p.removeprefix("a photo of ") for p in prompts]
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    labelled_grid(images[..., 0], labels, args.per_prompt).save(args.output)
    steps = args.steps or pipe.config.default_num_inference_steps
    saved = pipe.guider.config  # what the call used: the flags given, else the folder's guider
    scale = overrides.get("guidance_scale", saved.guidance_scale)
    g_start, g_stop = overrides.get("guidance_start", saved.start), overrides.get("guidance_stop", saved.stop)
    sampler = (f"{type(pipe.scheduler).__name__}, {steps} steps, "
               f"{type(pipe.guider).__name__}({scale}, start={g_start}, stop={g_stop})")
    print(f"wrote {args.output}: {len(images)} images, {sampler} ({time.time() - t0:.1f} s)")

    # 2. image -> text
    if args.num_captions:
        print("captions (greedy):")
        caption_test_images(pipe, args.num_captions)

    # 3. text -> text
    tokenizer = pipe.processor.tokenizer
    inputs = tokenizer([args.text_prompt], return_tensors="pt")
    torch.manual_seed(args.seed)
    generated = pipe.model.generate(
        **inputs, max_new_tokens=args.max_new_tokens, do_sample=True, temperature=0.8, top_k=40,
        pad_token_id=tokenizer.pad_token_id,
    )
    print("text:", tokenizer.decode(generated[0], skip_special_tokens=True))
    print(f"total {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
