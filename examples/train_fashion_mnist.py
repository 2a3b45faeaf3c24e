#!/usr/bin/env python
"""Train a small MonoFormer from scratch on Fashion-MNIST (+ Jane Austen) on a CPU: the demo recipe.

One Llama-style transformer learns three things with the same weights:
- text-to-image: `"a photo of a sneaker" <boi> <image> x 49 <eoi>`, the 28x28 grayscale image denoised in pixel
  space (no VAE, `vae_scale_factor=1`, one channel, 4x4 patches = 49 image tokens), prompts dropped 10% of the time
  for classifier-free guidance;
- captioning: `<boi> <image> x 49 <eoi> "a photo of a sneaker"`, the clean image first, the caption learnt by the LM;
- text: paragraphs of Jane Austen's novels (*Persuasion* is held out for the perplexity benchmark);
- behind flags (off by default): editing, `<boi> source <eoi> "flip it horizontally" <boi> target <eoi>` with
  targets built from the data (`EDITS`: the mirrored image, the inverted image, or another training image of the
  named class for "turn it into <class>"), and interleaved text and images, `"Show me a picture of a sneaker." <boi>
  image <eoi> " Here is a sneaker."` (`INTERLEAVED_TEMPLATES`), so that `pipe.generate_interleaved` and
  `pipe(instruction, image=source)` work; visual questions (`--vqa_fraction`), `<image> "What is this?" " It is a
  sneaker."` with the question as conditioning (no LM loss on it; `VQA_QUESTIONS`); `--caption_max_noise 0.5` noises
  the captioned and questioned images (Transfusion).
  Edit sources are training images; the benchmark edits held-out test images. Edits are twice as long as the other
  samples, so a padded batch computes mostly padding: `--pack_length N` packs the samples into rows of N tokens
  instead (`pack_batch`, the same losses; `benchmarks/bench_packing.py --mix demo` measures the speed-up).

Data (Debian packages, nothing downloaded from a hub):

    apt-get install -y dataset-fashion-mnist                 # /usr/share/datasets/fashion-mnist
    apt-get download r-cran-janeaustenr && dpkg-deb -x r-cran-janeaustenr_*.deb ~/.cache/janeaustenr
    pip install rdata matplotlib                             # the `examples` extra

The tokenizer is a byte-level BPE trained here (`train_bpe_tokenizer`) on the captions and the training text. Noise and
timesteps come from a diffusers scheduler through `MonoFormerDataCollator` (rectified flow with
`FlowMatchEulerDiscreteScheduler` by default; `--prediction_type epsilon` uses DDPM for training, DDIM for sampling).
The saved pipeline samples with the flow-matching Euler scheduler, 20 steps (`--sample_scheduler`, `SAMPLER_DEFAULTS`;
DPM-Solver++ on the same flow sigmas with `--sample_scheduler dpm`). Training keeps an EMA of
the weights (diffusers' `EMAModel`), which is what is sampled and saved. Images are not flipped (`--hflip` is off):
every shoe in Fashion-MNIST faces left, and a classifier reads a flipped ankle boot as another class (a run with flips
lost half of its ankle boots and a fifth of its sneakers).

Output (`--output_dir`): `samples/step-XXXXX.png` (one row per class, EMA weights), `loss_curve.png`,
`loss_history.json`, `train_args.json` and `pipeline/`, a self-contained `MonoFormerPipeline` folder that loads with
`DiffusionPipeline.from_pretrained(path, trust_remote_code=True)`.

    # the shipped checkpoint (examples/monoformer-fashion-mnist): 45 minutes on 2 quiet CPU cores
    python examples/train_fashion_mnist.py --minutes 45 --output_dir runs/fmnist
    # the head-to-head with transfusion-pytorch (benchmarks/bench_quality_fashion_mnist.py --with-peer): 20 minutes
    python examples/train_fashion_mnist.py --minutes 20 --output_dir runs/fmnist-20
    # a smoke run in seconds
    python examples/train_fashion_mnist.py --subset 256 --max_steps 5 --hidden_size 32 --num_layers 1 \\
        --num_heads 2 --vocab_size 300 --batch_size 8 --output_dir /tmp/fmnist-smoke

The same data for the general fine-tuning script (`examples/train_text_to_image.py`, e.g. on a pretrained LLM
converted with `conversion/convert_llm_to_monoformer.py`): `--export_data DIR` writes `DIR/images/` (an imagefolder:
one PNG per training image and a `metadata.jsonl` whose caption is one of the four templates above with the image's
class, drawn with the seed) and `DIR/austen_train.txt` (the five training novels, one paragraph per line; *Persuasion*
stays out), then exits without training:

    python examples/train_fashion_mnist.py --export_data ~/fmnist-export
    python examples/train_text_to_image.py --train_data_dir ~/fmnist-export/images \\
        --text_data_file ~/fmnist-export/austen_train.txt --text_ratio 0.15 --caption_ratio 0.15 ...

The run is seeded: with `--max_steps` (and the same `--subset`/threads), two runs give the same weights (a step limit
alone has no time budget). A `--minutes` budget (20 when neither is given) stops at whatever step the clock allows, so
its length depends on the machine; the LR schedule then follows the elapsed fraction of the budget.
"""

import argparse
import copy
import gzip
import json
import math
import os
import pathlib
import random
import sys
import time
import warnings
import zlib

import numpy as np
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

try:
    import modeling_monoformer  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from modeling_monoformer import (  # noqa: E402
    MonoFormerDataCollator,
    MonoFormerForConditionalGeneration,
    MonoFormerImageProcessor,
    MonoFormerPipeline,
    MonoFormerProcessor,
    bf16_supported,
    default_noise_scheduler,
    train_bpe_tokenizer,
)
from modeling_monoformer.packing_monoformer import pack_batch  # noqa: E402

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_INSTALL = "apt-get update && apt-get install -y dataset-fashion-mnist"
AUSTEN_SUBDIR = "usr/lib/R/site-library/janeaustenr"
AUSTEN_CANDIDATES = ["/", os.path.expanduser("~/.cache/janeaustenr")]
AUSTEN_INSTALL = (
    "cd /tmp && apt-get download r-cran-janeaustenr && dpkg-deb -x r-cran-janeaustenr_*.deb ~/.cache/janeaustenr "
    "&& pip install rdata"
)
AUSTEN_HELD_OUT = "persuasion"  # never trained on: the perplexity benchmark's text

# Fashion-MNIST label order; each name carries its article so that templates read naturally.
CLASS_NAMES = [
    "a t-shirt", "a pair of trousers", "a pullover", "a dress", "a coat",
    "a sandal", "a shirt", "a sneaker", "a bag", "an ankle boot",
]
CAPTION_TEMPLATES = ["a photo of {}", "{}", "a picture of {}", "a grayscale photo of {}"]
SAMPLE_PROMPT_TEMPLATE = "a photo of {}"
# The demo's sampler settings, chosen with `benchmarks/bench_quality_fashion_mnist.py --sweep` (the saved pipeline
# carries them: its scheduler, `default_num_inference_steps` and guider, so `pipe(prompt)` samples this way): the
# flow-matching Euler scheduler; guided steps cost 2 network evaluations per image (conditional + unconditional row),
# unguided ones 1. Guidance 4 on the middle half of the 20 steps: 10 guided + 10 unguided = 30 per image. (Euler 20
# steps scored FD 12.8 against DPM-Solver++ 14 steps' 17.8 at equal class accuracy; benchmarks/README.md.)
SAMPLER_DEFAULTS = {"num_inference_steps": 20, "guidance_scale": 4.0, "guidance_start": 0.25, "guidance_stop": 0.75}
# Edit instructions and their ground truth on [-1, 1] images (n, 1, 28, 28); "turn it into <class>" takes another
# image of that class as its target (see `make_edit_sample`).
EDITS = {
    "flip it horizontally": lambda x: x.flip(-1),
    "invert the colours": lambda x: -x,
}
CLASS_EDIT_TEMPLATE = "turn it into {}"
# Visual questions (VQA samples: the image, one of these questions, the answer). The benchmark also asks questions
# worded otherwise (`bench_anytoany_fashion_mnist.py`), to measure more than these three strings.
VQA_QUESTIONS = ["What is this?", "What is in the picture?", "What kind of garment is this?"]
VQA_ANSWER_TEMPLATE = " It is {}."
# Interleaved samples: a request, the image, a remark on it.
INTERLEAVED_TEMPLATES = [
    ("Show me a picture of {}.", " Here is {}."),
    ("Draw {}.", " This is {}."),
    ("I would like to see {}.", " That is {}."),
]


def caption_class(text: str) -> int | None:
    """The class a caption names (longest name first, so "t-shirt" is not read as "shirt"), or None."""
    text = text.lower()
    order = sorted(range(len(CLASS_NAMES)), key=lambda i: -len(CLASS_NAMES[i]))
    for i in order:
        if CLASS_NAMES[i].split(" ", 1)[1] in text:
            return i
    return None


# ---------------------------------------------------------------------------------------------------------- data
def make_edit_sample(rng: random.Random, images: torch.Tensor, labels: torch.Tensor, by_class: list[list[int]],
                     index: int) -> dict:
    """An edit sample from real data: the source `images[index]`, an instruction drawn uniformly from the two
    transforms of `EDITS` and "turn it into <another class>", and its ground-truth target."""
    source, label = images[index], int(labels[index])
    others = [c for c in range(len(CLASS_NAMES)) if c != label and by_class[c]]  # a small --subset may lack some
    kind = rng.randrange(len(EDITS) + (1 if others else 0))
    if kind < len(EDITS):
        instruction = list(EDITS)[kind]
        target = EDITS[instruction](source.unsqueeze(0))[0]
    else:
        new_class = rng.choice(others)
        instruction = CLASS_EDIT_TEMPLATE.format(CLASS_NAMES[new_class])
        target = images[rng.choice(by_class[new_class])]
    return {"text": instruction, "source": source, "pixel_values": target, "task": "edit"}


def make_interleaved_sample(rng: random.Random, image: torch.Tensor, label: int, image_token: str) -> dict:
    """`"Show me a picture of a sneaker." <image> " Here is a sneaker."` with a real image of the class."""
    before, after = rng.choice(INTERLEAVED_TEMPLATES)
    name = CLASS_NAMES[label]
    return {"text": before.format(name) + image_token + after.format(name), "images": [image], "task": "interleaved"}


def make_vqa_sample(rng: random.Random, image: torch.Tensor, label: int) -> dict:
    """`<image> "What is this?" " It is a sneaker."`: a caption sample whose question is conditioning (no LM loss)."""
    return {"prompt": rng.choice(VQA_QUESTIONS), "text": VQA_ANSWER_TEMPLATE.format(CLASS_NAMES[label]),
            "pixel_values": image, "task": "caption"}


def draw_samples(rng: random.Random, n: int, bounds, images: torch.Tensor, labels: torch.Tensor,
                 by_class: list[list[int]], texts: list[str], image_token: str, hflip: bool = False,
                 seen: dict | None = None) -> list[dict]:
    """`n` training samples for the collator, each task drawn by its share: `bounds` are the cumulative shares of
    text, caption, edit, interleaved and VQA samples (the rest is text-to-image); `seen` counts the image tasks."""
    samples = []
    for _ in range(n):
        r = rng.random()
        if r < bounds[0] and texts:
            samples.append({"text": rng.choice(texts), "task": "text"})
            continue
        i = rng.randrange(len(images))
        caption = rng.choice(CAPTION_TEMPLATES).format(CLASS_NAMES[int(labels[i])])
        image = images[i]
        if hflip and rng.random() < 0.5:  # off by default: every shoe in Fashion-MNIST faces left
            image = image.flip(-1)
        task = ("caption" if r < bounds[1] else "edit" if r < bounds[2] else "interleaved" if r < bounds[3]
                else "vqa" if r < bounds[4] else "generate")
        if seen is not None:
            seen[task] += 1
        if task == "edit":
            samples.append(make_edit_sample(rng, images, labels, by_class, i))
        elif task == "interleaved":
            samples.append(make_interleaved_sample(rng, image, int(labels[i]), image_token))
        elif task == "vqa":
            samples.append(make_vqa_sample(rng, image, int(labels[i])))
        else:
            samples.append({"text": caption, "pixel_values": image, "task": task})
    return samples


def pack(batch: dict, pack_length: int, pad_token_id: int) -> dict:
    """`--pack_length`: a padded batch packed into rows of `pack_length` tokens (of the longest sample, when one is
    longer); 0 leaves it padded."""
    if not pack_length:
        return batch
    longest = int(batch["attention_mask"].sum(1).max())
    return pack_batch(batch, max(pack_length, longest), pad_token_id=pad_token_id)


def edit_and_interleaved_corpus() -> list[str]:
    """The texts of edit, interleaved and VQA samples, for the tokenizer."""
    texts = list(EDITS) + [CLASS_EDIT_TEMPLATE.format(n) for n in CLASS_NAMES]
    texts += [part.format(n) for pair in INTERLEAVED_TEMPLATES for part in pair for n in CLASS_NAMES]
    texts += [q + VQA_ANSWER_TEMPLATE.format(n) for q in VQA_QUESTIONS for n in CLASS_NAMES]
    return texts


def load_idx(path: str) -> np.ndarray:
    """Read a gzipped IDX file (the MNIST format) into a uint8 array."""
    data = gzip.open(path).read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(split: str = "train", data_dir: str = FASHION_MNIST_DIR) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST images `(n, 1, 28, 28)` in `[-1, 1]` and labels `(n,)`; `split` is "train" or "test"."""
    prefix = {"train": "train", "test": "t10k"}[split]
    paths = [os.path.join(data_dir, f"{prefix}-{kind}-ubyte.gz") for kind in ("images-idx3", "labels-idx1")]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST is missing ({', '.join(missing)}). Install it with:\n    {FASHION_MNIST_INSTALL}\n"
            "or pass --data_dir to a folder holding the four *-ubyte.gz files."
        )
    images = torch.from_numpy(load_idx(paths[0]).copy()).float().div(127.5).sub(1.0).unsqueeze(1)
    labels = torch.from_numpy(load_idx(paths[1]).astype(np.int64))
    return images, labels


def find_austen_dir(austen_dir: str | None = None) -> pathlib.Path:
    """The `janeaustenr` R package folder (apt-installed, or unpacked with dpkg-deb), or a clear error."""
    roots = [austen_dir] if austen_dir else AUSTEN_CANDIDATES
    for root in roots:
        for candidate in (pathlib.Path(root), pathlib.Path(root) / AUSTEN_SUBDIR):
            if (candidate / "data" / "Rdata.rdb").is_file():
                return candidate
    raise FileNotFoundError(
        f"Jane Austen's novels (Debian r-cran-janeaustenr) were not found under {roots}. Get them with:\n"
        f"    {AUSTEN_INSTALL}\nor pass --austen_dir, or train without text with --text_fraction 0."
    )


def load_austen_books(austen_dir: str | None = None) -> dict[str, list[str]]:
    """Jane Austen's six novels as `{name: lines}`, read from the R lazy-load database with `rdata`."""
    try:
        import rdata
    except ImportError as err:
        raise ImportError("Reading the Austen novels needs `rdata`: pip install rdata") from err
    base = find_austen_dir(austen_dir) / "data" / "Rdata"

    def unserialize(raw: bytes):
        with warnings.catch_warnings():  # the lazy-load entries have no RDS header; rdata says so every time
            warnings.simplefilter("ignore", UserWarning)
            return rdata.conversion.convert(rdata.parser.parse_data(raw), default_encoding="utf-8")

    index = unserialize(gzip.decompress(base.with_suffix(".rdx").read_bytes()))
    db = base.with_suffix(".rdb").read_bytes()
    books = {}
    for name, (offset, length) in index["variables"].items():
        offset, length = int(offset), int(length)
        books[name] = [str(line) for line in unserialize(zlib.decompress(db[offset + 4 : offset + length]))]
    return books


def austen_paragraphs(lines: list[str], max_chars: int = 160, min_chars: int = 40) -> list[str]:
    """Blank-line separated paragraphs, whitespace-normalised, cut at a word boundary to at most `max_chars`."""
    paragraphs, current = [], []
    for line in lines + [""]:
        if line.strip():
            current.append(line.strip())
        elif current:
            text = " ".join(current)
            current = []
            if len(text) > max_chars:
                text = text[:max_chars].rsplit(" ", 1)[0]
            if len(text) >= min_chars and not text.isupper():  # drop chapter headings
                paragraphs.append(text)
    return paragraphs


def load_austen_texts(austen_dir: str | None = None, split: str = "train") -> list[str]:
    """Paragraphs of the five training novels (`split="train"`) or of the held-out one (`"test"`)."""
    books = load_austen_books(austen_dir)
    names = sorted(n for n in books if (n == AUSTEN_HELD_OUT) == (split == "test"))
    return [p for name in names for p in austen_paragraphs(books[name])]


def export_training_data(out_dir: str, data_dir: str = FASHION_MNIST_DIR, austen_dir: str | None = None,
                         subset: int | None = None, seed: int = 0, with_text: bool = True) -> dict:
    """Write the demo's training data as an imagefolder with captions (+ Austen as a text file); returns the paths.

    Captions are exactly the demo's: one of `CAPTION_TEMPLATES` (drawn per image with `seed`) filled with the
    image's `CLASS_NAMES` entry, so a model trained on the export sees no other wording.
    """
    from PIL import Image

    images, labels = load_fashion_mnist("train", data_dir)
    if subset:
        images, labels = images[:subset], labels[:subset]
    rng = random.Random(seed)
    folder = pathlib.Path(out_dir) / "images"
    folder.mkdir(parents=True, exist_ok=True)
    pixels = images.add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)[:, 0].numpy()  # back to the raw bytes
    with open(folder / "metadata.jsonl", "w") as f:
        for i, (image, label) in enumerate(zip(pixels, labels.tolist())):
            name = f"{i:05d}.png"
            Image.fromarray(image, mode="L").save(folder / name)
            caption = rng.choice(CAPTION_TEMPLATES).format(CLASS_NAMES[label])
            f.write(json.dumps({"file_name": name, "text": caption, "label": label}) + "\n")
    result = {"train_data_dir": str(folder), "num_images": len(pixels)}
    if with_text:
        text_file = pathlib.Path(out_dir) / "austen_train.txt"
        texts = load_austen_texts(austen_dir, "train")
        text_file.write_text("".join(t.replace("\n", " ") + "\n" for t in texts))
        result.update(text_data_file=str(text_file), num_texts=len(texts))
    return result


# ---------------------------------------------------------------------------------------------------------- model
def build_model(args, tokenizer):
    """A Llama from a config (random init), wrapped by `from_llm`; returns `(model, processor, train, sample)`
    where `train` is the collator's scheduler and `sample` the pipeline's."""
    # Room for the longest sample, an edit: two images (each with <boi>/<eoi> and maybe a timestep token) and its
    # instruction; 256 for 4x4 or larger patches, more for 2x2 (196 tokens per image).
    tokens_per_image = (28 // args.patch_size) ** 2 + 3
    llm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=args.hidden_size, intermediate_size=args.hidden_size * 3,
            num_hidden_layers=args.num_layers, num_attention_heads=args.num_heads, num_key_value_heads=args.num_heads,
            max_position_embeddings=max(256, 2 * tokens_per_image + 64), rope_theta=10000.0,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
        )
    )
    model = MonoFormerForConditionalGeneration.from_llm(
        llm, tokenizer=tokenizer, latent_channels=1, patch_size=args.patch_size, vae_scale_factor=1, sample_size=28,
        timestep_conditioning=args.timestep_conditioning, prediction_type=args.prediction_type,
        lm_loss_weight=args.lm_loss_weight, diffusion_loss_weight=1.0, patch_embedder=args.patch_embedder,
        unet_block_channels=args.unet_block_channels,
    )
    processor = MonoFormerProcessor(MonoFormerImageProcessor(num_channels=1), tokenizer).configure_for_model(model.config)
    train_scheduler = default_noise_scheduler(args.prediction_type, num_train_timesteps=1000)
    if args.prediction_type == "flow":
        if args.sample_scheduler == "dpm":  # DPM-Solver++ (2nd order multistep) on the same flow sigmas
            sample_scheduler = DPMSolverMultistepScheduler(
                use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=1.0
            )
        else:
            sample_scheduler = FlowMatchEulerDiscreteScheduler.from_config(train_scheduler.config)
    else:  # DDIM from t = 999; pixels live in [-1, 1], so it clips its x0 estimate (diffusers' DDIM default)
        sample_scheduler = DDIMScheduler.from_config(train_scheduler.config, clip_sample=True)
    return model, processor, train_scheduler, sample_scheduler


MODEL_ARGS = ("hidden_size", "num_layers", "num_heads", "vocab_size", "patch_size", "patch_embedder",
              "unet_block_channels", "timestep_conditioning", "prediction_type")


def load_init_checkpoint(args) -> tuple:
    """`--init_from`: the checkpoint's tokenizer and state dict; its model settings are copied into `args` (so
    `build_model` rebuilds the same architecture, and `train_args.json` records what was trained)."""
    folder = pathlib.Path(args.init_from)
    settings_file = folder / "train_args.json"
    if not settings_file.is_file():
        raise ValueError(f"`--init_from` {str(folder)!r} has no train_args.json: give a folder this script wrote "
                         "(its output_dir, or a copy such as examples/monoformer-fashion-mnist).")
    saved = json.loads(settings_file.read_text())
    for name in MODEL_ARGS:
        if name in saved:
            setattr(args, name, saved[name])
    # The pieces of training so far travel with the weights: train_args.json lists the earlier pieces' arguments.
    args.previous_pieces = saved.pop("previous_pieces", []) + [saved]
    root = folder / "pipeline" if (folder / "pipeline" / "model_index.json").is_file() else folder
    pipe = MonoFormerPipeline.from_pretrained(root)
    return pipe.processor.tokenizer, pipe.model.state_dict()


def with_earlier_pieces(piece: dict, earlier: dict) -> dict:
    """This piece's summary after the `--init_from` checkpoint's: totals over all pieces (counts and seconds summed,
    `first_*` from the first piece, `final_*` and `params` from this one) and `pieces`, each piece's own summary."""
    pieces = earlier.get("pieces") or [{k: v for k, v in earlier.items() if k != "pieces"}]
    pieces = pieces + [piece]
    total = {k: (round(sum(p.get(k, 0) for p in pieces), 1) if k == "train_seconds"
                 else sum(p.get(k, 0) for p in pieces)) for k in piece
             if not k.startswith(("first_", "final_")) and k != "params"}
    firsts = {k: v for k, v in pieces[0].items() if k.startswith("first_")}
    finals = {k: v for k, v in piece.items() if k.startswith("final_")}
    return {**total, "params": piece["params"], **finals, **firsts, "pieces": pieces}


def class_grid(images: np.ndarray, rows: int, cols: int, pad: int = 2) -> np.ndarray:
    """`(rows * cols, H, W)` in [0, 1] -> one uint8 grid image with `pad` pixels of gray between cells."""
    h, w = images.shape[1:3]
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad), 0.5, dtype=np.float32)
    for k, img in enumerate(images):
        r, c = divmod(k, cols)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = img
    return (grid * 255).round().astype(np.uint8)


def tuned_guider(args) -> ClassifierFreeGuidance:
    """The recipe's guidance, saved with the pipeline so that `pipe(prompt)` samples as the model card reports."""
    return ClassifierFreeGuidance(
        guidance_scale=args.guidance_scale,
        start=SAMPLER_DEFAULTS["guidance_start"],
        stop=SAMPLER_DEFAULTS["guidance_stop"],
    )


def sample_class_grid(pipe, per_class: int, steps: int, guidance_scale: float, seed: int, **kwargs) -> np.ndarray:
    """One row per class, `per_class` samples each, as a uint8 grid (deterministic for `seed`)."""
    prompts = [SAMPLE_PROMPT_TEMPLATE.format(n) for n in CLASS_NAMES]
    out = pipe(
        prompts, num_images_per_prompt=per_class, num_inference_steps=steps, guidance_scale=guidance_scale, **kwargs,
        generator=torch.Generator().manual_seed(seed), output_type="np",
    ).images  # (10 * per_class, 28, 28, 1)
    return class_grid(out[..., 0], len(prompts), per_class)


def plot_losses(history: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("diffusion_loss", "diffusion MSE"), ("lm_loss", "LM cross-entropy")):
        values = np.array([h[key] for h in history])
        window = max(1, len(values) // 50)
        smooth = np.convolve(values, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], smooth, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (moving average)")
    ax.set_title("MonoFormer on Fashion-MNIST + Jane Austen")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("model")
    group.add_argument("--hidden_size", type=int, default=192)
    group.add_argument("--num_layers", type=int, default=6)
    group.add_argument("--num_heads", type=int, default=6)
    group.add_argument("--vocab_size", type=int, default=2048, help="BPE vocabulary trained on captions + text")
    group.add_argument("--patch_size", type=int, default=4, choices=[2, 4, 7], help="4: 49 tokens per image")
    group.add_argument("--patch_embedder", default="linear", choices=["linear", "unet"],
                       help="unet: Transfusion's down/up conv blocks around the transformer (suits --patch_size 7)")
    group.add_argument("--unet_block_channels", type=int, nargs="+", default=[32],
                       help="U-Net level widths; L levels downsample by 2^(L-1), which must divide --patch_size")
    group.add_argument("--timestep_conditioning", default="adaln", choices=["adaln", "token", "add"])
    group.add_argument("--prediction_type", default="flow", choices=["flow", "epsilon", "v_prediction"])
    group.add_argument("--lm_loss_weight", type=float, default=0.5)
    group = parser.add_argument_group("data")
    group.add_argument("--data_dir", default=FASHION_MNIST_DIR)
    group.add_argument("--austen_dir", default=None, help="janeaustenr folder (default: apt or ~/.cache/janeaustenr)")
    group.add_argument("--subset", type=int, default=None, help="use only the first N training images (CI runs)")
    group.add_argument("--caption_fraction", type=float, default=0.15)
    group.add_argument("--text_fraction", type=float, default=0.15, help="Austen paragraphs; 0 = no text data")
    group.add_argument("--cfg_dropout", type=float, default=0.1)
    group.add_argument("--export_data", default=None, metavar="DIR",
                       help="write the training data as DIR/images (imagefolder with captions) and "
                            "DIR/austen_train.txt (unless --text_fraction 0) for train_text_to_image.py, and exit")
    group.add_argument("--edit_fraction", type=float, default=0.0,
                       help="edit samples (flip / invert / turn it into <class>, built from the data); 0 = none")
    group.add_argument("--interleaved_fraction", type=float, default=0.0,
                       help='interleaved samples ("Show me a picture of <class>." <image> " Here is <class>.")')
    group.add_argument("--vqa_fraction", type=float, default=0.0,
                       help='visual questions (<image> "What is this?" " It is <class>.", the question not learnt)')
    group.add_argument("--caption_max_noise", type=float, default=None,
                       help="noise captioned images at t <= this fraction of the schedule (Transfusion: 0.5); "
                            "default: clean")
    group.add_argument("--hflip", action="store_true",
                       help="random horizontal flips (off: Fashion-MNIST's shoes all face left, and flipped ones are "
                            "read as another class; flips cost 0.4 class accuracy on footwear)")
    group.add_argument("--init_from", default=None, metavar="CHECKPOINT",
                       help="continue from a checkpoint folder this script wrote (e.g. examples/monoformer-fashion-mnist:"
                            " teach the shipped demo editing and interleaving): its weights, tokenizer and model "
                            "settings (from its train_args.json) replace the random init; optimiser and EMA start "
                            "fresh")
    group = parser.add_argument_group("optimisation")
    group.add_argument("--minutes", type=float, default=None,
                       help="wall-clock training budget (default: 20, or none when --max_steps is given)")
    group.add_argument("--max_steps", type=int, default=None,
                       help="stop after this many steps (reproducible); with --minutes too, whichever comes first")
    group.add_argument("--batch_size", type=int, default=32)
    group.add_argument("--lr", type=float, default=1.5e-3)
    group.add_argument("--warmup_steps", type=int, default=100)
    group.add_argument("--ema_decay", type=float, default=0.995)
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--pack_length", type=int, default=0,
                       help="pack each batch's samples into rows of this many tokens (at least the longest sample; "
                            "block-diagonal attention, the same loss as padding) instead of padding every sample to "
                            "the longest: mixes of short captions and long edits waste less compute; 0 = pad")
    group.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    group.add_argument("--mixed_precision", default="no", choices=["no", "bf16", "auto"],
                       help="bf16 autocast for forward/backward (weights, optimiser and EMA stay fp32); auto: bf16 "
                            "where the CPU computes it natively (modeling_monoformer.bf16_supported)")
    group = parser.add_argument_group("logging and output")
    group.add_argument("--output_dir", default=None, help="required unless --export_data (a new folder for each piece "
                       "of training: not the --init_from folder)")
    group.add_argument("--sample_every_minutes", type=float, default=8.0, help="sample grid + loss curve interval")
    group.add_argument("--sample_steps", type=int, default=SAMPLER_DEFAULTS["num_inference_steps"])
    group.add_argument("--guidance_scale", type=float, default=SAMPLER_DEFAULTS["guidance_scale"])
    group.add_argument("--sample_scheduler", default="euler", choices=["euler", "dpm"],
                       help="flow models: the scheduler saved with the pipeline (DDIM for epsilon / v)")
    group.add_argument("--save_dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    if args.output_dir is None and not args.export_data:
        parser.error("the following arguments are required: --output_dir")
    if args.init_from and args.output_dir and os.path.realpath(args.init_from) == os.path.realpath(args.output_dir):
        parser.error(f"--output_dir {args.output_dir} is the --init_from folder: the new piece would overwrite the "
                     "checkpoint it starts from; give it its own folder (e.g. runs/fmnist-2)")
    if args.minutes is None and args.max_steps is None:
        args.minutes = 20.0
    return args


def lr_factor(step: int, progress: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% over the run's progress (steps or elapsed budget)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def main(argv=None):
    args = parse_args(argv)
    if args.export_data:
        result = export_training_data(args.export_data, args.data_dir, args.austen_dir, args.subset, args.seed,
                                      with_text=args.text_fraction > 0)
        print(json.dumps(result, indent=2))
        return result
    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    os.makedirs(os.path.join(args.output_dir, "samples"), exist_ok=True)

    images, labels = load_fashion_mnist("train", args.data_dir)
    if args.subset:
        images, labels = images[: args.subset], labels[: args.subset]
    texts = load_austen_texts(args.austen_dir, "train") if args.text_fraction > 0 else []
    if args.subset and texts:
        texts = texts[: args.subset]
    captions = [t.format(n) for t in CAPTION_TEMPLATES for n in CLASS_NAMES]
    fractions = [args.text_fraction, args.caption_fraction, args.edit_fraction, args.interleaved_fraction,
                 args.vqa_fraction]
    if any(fractions[2:]):  # only then: the default recipe keeps its exact tokenizer
        captions += edit_and_interleaved_corpus()
    bounds = np.cumsum(fractions)  # a draw r in [0, 1) picks the task whose share it falls in
    if any(f < 0 for f in fractions) or sum(fractions) > 1:
        raise ValueError("--text_fraction, --caption_fraction, --edit_fraction, --interleaved_fraction and "
                         "--vqa_fraction must be >= 0 and sum to <= 1 (the rest is text-to-image).")
    if args.init_from:
        tokenizer, weights = load_init_checkpoint(args)
    else:
        tokenizer = train_bpe_tokenizer(captions * 20 + texts, args.vocab_size)
    model, processor, train_scheduler, sample_scheduler = build_model(args, tokenizer)
    if args.init_from:
        model.load_state_dict(weights, strict=True)
    with open(os.path.join(args.output_dir, "train_args.json"), "w") as f:  # after --init_from set the model's fields
        json.dump(vars(args), f, indent=2)
    collator = MonoFormerDataCollator(
        processor, train_scheduler, args.prediction_type, cfg_dropout=args.cfg_dropout, seed=args.seed,
        caption_max_noise=args.caption_max_noise,
    )
    by_class = [torch.nonzero(labels == c).squeeze(-1).tolist() for c in range(len(CLASS_NAMES))]
    # diffusers' EMA of the weights (decay warms up as (1 + n) / (10 + n) up to --ema_decay, so early samples are not
    # the random init); `ema_model` holds a copy of it for sampling and saving while `model` trains.
    ema = EMAModel(model.parameters(), decay=args.ema_decay)
    ema_model = copy.deepcopy(model).eval().requires_grad_(False)
    sample_pipe = MonoFormerPipeline(
        model=ema_model, vae=None, scheduler=sample_scheduler, processor=processor, guider=tuned_guider(args),
        default_num_inference_steps=args.sample_steps,
    )
    sample_pipe.set_progress_bar_config(disable=True)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"MonoFormer {n_params / 1e6:.2f} M params ({args.hidden_size}d x {args.num_layers} layers, patch "
        f"{args.patch_size}, {args.timestep_conditioning}/{args.prediction_type}); {len(images)} images, "
        f"{len(texts)} Austen paragraphs, vocab {len(tokenizer)}; {torch.get_num_threads()} threads"
    )

    seen = {"generate": 0, "caption": 0, "edit": 0, "interleaved": 0, "vqa": 0}  # samples trained on, per task

    def sample_batch() -> dict:
        samples = draw_samples(rng, args.batch_size, bounds, images, labels, by_class, texts, processor.image_token,
                               hflip=args.hflip, seen=seen)
        return pack(collator(samples), args.pack_length, tokenizer.pad_token_id)

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    budget = args.minutes * 60 if args.minutes is not None else float("inf")
    history: list[dict] = []
    start = last_sample = time.time()

    def write_progress(step: int) -> None:
        ema.copy_to(ema_model.parameters())
        grid = sample_class_grid(
            sample_pipe, 6, args.sample_steps, args.guidance_scale, args.seed,
            guidance_start=SAMPLER_DEFAULTS["guidance_start"], guidance_stop=SAMPLER_DEFAULTS["guidance_stop"],
        )
        from PIL import Image

        Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(
            os.path.join(args.output_dir, "samples", f"step-{step:05d}.png")
        )
        if history:
            plot_losses(history, os.path.join(args.output_dir, "loss_curve.png"))
        with open(os.path.join(args.output_dir, "loss_history.json"), "w") as f:
            json.dump(history, f)

    use_bf16 = args.mixed_precision == "bf16" or (args.mixed_precision == "auto" and bf16_supported("cpu"))
    model.train()
    progress = tqdm(total=args.max_steps, desc="training", dynamic_ncols=True)
    step = 0
    while True:
        elapsed = time.time() - start
        if (args.max_steps is not None and step >= args.max_steps) or elapsed >= budget:
            break
        done = max(elapsed / budget, step / args.max_steps if args.max_steps else 0.0)
        for group in optimizer.param_groups:
            group["lr"] = args.lr * lr_factor(step, done, args.warmup_steps)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            out = model(**sample_batch())
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        ema.step(model.parameters())
        step += 1
        history.append({
            "step": step, "time": round(time.time() - start, 2), "lr": optimizer.param_groups[0]["lr"],
            "lm_loss": out.lm_loss.item() if out.lm_loss is not None else float("nan"),
            "diffusion_loss": out.diffusion_loss.item() if out.diffusion_loss is not None else float("nan"),
            "grad_norm": grad_norm.item(),
        })
        progress.update()
        progress.set_postfix(lm=f"{history[-1]['lm_loss']:.3f}", diff=f"{history[-1]['diffusion_loss']:.3f}")
        if time.time() - last_sample >= args.sample_every_minutes * 60:
            write_progress(step)
            last_sample = time.time()
    progress.close()
    train_seconds = time.time() - start

    write_progress(step)
    window = max(1, min(100, len(history) // 5))
    summary = {
        "steps": step, "train_seconds": round(train_seconds, 1), "params": n_params,
        "images_seen": seen["generate"], "captioned_images_seen": seen["caption"],
        "edit_samples_seen": seen["edit"], "interleaved_samples_seen": seen["interleaved"],
        "vqa_samples_seen": seen["vqa"],
        **{f"final_{k}": float(np.nanmean([h[k] for h in history[-window:]])) for k in ("lm_loss", "diffusion_loss")},
        **{f"first_{k}": float(np.nanmean([h[k] for h in history[:window]])) for k in ("lm_loss", "diffusion_loss")},
    }
    if args.init_from and (pathlib.Path(args.init_from) / "summary.json").is_file():
        summary = with_earlier_pieces(summary, json.loads((pathlib.Path(args.init_from) / "summary.json").read_text()))
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))

    ema.copy_to(ema_model.parameters())
    ema_model.to(getattr(torch, args.save_dtype))
    pipe = MonoFormerPipeline(
        model=ema_model, vae=None, scheduler=sample_scheduler, processor=processor, guider=tuned_guider(args),
        default_num_inference_steps=args.sample_steps,
    )
    pipe.save_pretrained(os.path.join(args.output_dir, "pipeline"))
    print(f"saved the EMA pipeline to {os.path.join(args.output_dir, 'pipeline')}")
    return summary


if __name__ == "__main__":
    main()
