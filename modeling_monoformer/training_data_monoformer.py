"""Fine-tuning data for MonoFormer: image-caption datasets from `datasets`, latents cached once, text mixed in.

Sources a user already has:

- a `datasets` **imagefolder** (`train/0001.png ... + metadata.jsonl` with `{"file_name": ..., "text": ...}`);
- a **JSONL** file of `{"text": ..., "image": "path/relative/to/the/jsonl.png"}`;
- optionally a **text** dataset (a `.txt` file, one sample per line, or a JSONL with a `text` field) mixed in at a
  chosen ratio so the LLM keeps its language ability.

Images are read and checked once (an unreadable file or a size that does not fit the model's patch grid raises a
`ValueError` naming the file), encoded with the VAE (or kept as pixels for pixel-space models) and cached on disk in a
safetensors file keyed by a fingerprint of the files, the resolution and the VAE, so a second run (or a resumed one, or
the other processes of a multi-process run) never encodes again. [`MonoFormerTrainingDataset`] then serves samples in
the format [`MonoFormerDataCollator`] reads, each with its own `seed` so that noise, timestep and prompt dropout do not
depend on how batches are split over processes or resumed.

This module is only needed for training; it does not travel with checkpoints.
"""

import hashlib
import json
import logging
import os
import random

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------------
# Reading image-caption records
# ----------------------------------------------------------------------------------------------------------------------
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def check_no_special_tokens(texts: list[str], tokens: list[str], where) -> None:
    """Refuse training text holding the model's image tokens as plain text (`<image>` would need an image, `<boi>`
    would start one) before any training step; `where(i)` names sample `i` (its file and row or image)."""
    for i, text in enumerate(texts):
        found = [t for t in tokens if t in text]
        if found:
            raise ValueError(
                f"{where(i)}: the text {text[:60]!r} contains {found}, the model's image token(s); remove or reword "
                "them (they are added by the processor where images go)."
            )


def check_jsonl(path: str, caption_column: str) -> None:
    """Read a JSONL file line by line before `datasets` does, so that a bad line is reported by file and 1-based line
    number (pyarrow names neither) and a caption that is not a string is refused (pyarrow cannot mix the types)."""
    rows = 0
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            rows += 1
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg}): {line.strip()[:80]!r}.") from err
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {number}: expected a JSON object, got {line.strip()[:80]!r}.")
            caption = row.get(caption_column)
            if caption is not None and not isinstance(caption, str):
                raise ValueError(
                    f"{path}, line {number}: the caption {caption_column!r} is {caption!r} "
                    f"({type(caption).__name__}); write it as a string, e.g. {json.dumps(str(caption))}."
                )
    if not rows:
        raise ValueError(f"{path} is empty: write one JSON object per line, e.g. {{\"text\": \"...\"}}.")


def load_image_caption_records(
    train_data_dir: str | None = None,
    train_data_file: str | None = None,
    caption_column: str = "text",
    image_column: str = "image",
    max_samples: int | None = None,
) -> list[dict]:
    """Read `[{"text": caption, "image_path": path}, ...]` from an imagefolder or a JSONL file (exactly one of them).

    Raises a `ValueError` naming `--caption_column` / `--image_column` and the available columns when a column does not
    exist, and naming the file when a JSONL entry points to a missing image.
    """
    from datasets import Image as ImageFeature
    from datasets import load_dataset

    if (train_data_dir is None) == (train_data_file is None):
        raise ValueError("Give exactly one of `--train_data_dir` (an imagefolder) or `--train_data_file` (a JSONL).")
    if train_data_dir is not None:
        if not os.path.isdir(train_data_dir):
            raise ValueError(f"`--train_data_dir` {train_data_dir!r} is not a folder.")
        if not os.path.isfile(os.path.join(train_data_dir, "metadata.jsonl")):
            raise ValueError(
                f"`--train_data_dir` {train_data_dir!r} has no metadata.jsonl: write one line per image, "
                '{"file_name": "0001.png", "text": "a caption"}.'
            )
        check_jsonl(os.path.join(train_data_dir, "metadata.jsonl"), caption_column)
        dataset = load_dataset("imagefolder", data_dir=train_data_dir, split="train")
        base_dir = train_data_dir
    else:
        if not os.path.isfile(train_data_file):
            raise ValueError(f"`--train_data_file` {train_data_file!r} does not exist.")
        check_jsonl(train_data_file, caption_column)
        dataset = load_dataset("json", data_files=train_data_file, split="train")
        base_dir = os.path.dirname(os.path.abspath(train_data_file))

    source = train_data_dir or train_data_file
    for flag, column in (("--caption_column", caption_column), ("--image_column", image_column)):
        if column not in dataset.column_names:
            raise ValueError(
                f"`{flag}` {column!r} is not a column of {source!r}; its columns are {dataset.column_names}."
            )
    if isinstance(dataset.features[image_column], ImageFeature):
        dataset = dataset.cast_column(image_column, ImageFeature(decode=False))  # paths: we open and check each file
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))

    records, uncaptioned = [], 0
    for i, row in enumerate(dataset):
        image = row[image_column]
        path = image.get("path") if isinstance(image, dict) else image
        if not isinstance(path, str) or not path:
            raise ValueError(f"Row {i} of {source!r} has no image path in column {image_column!r} (got {image!r}).")
        if not os.path.isabs(path):
            path = os.path.join(base_dir, path)
        if not os.path.isfile(path):
            raise ValueError(f"Row {i} of {source!r}: image file {path!r} does not exist.")
        caption = row[caption_column]
        if caption is None or not str(caption).strip():
            caption = ""
            uncaptioned += 1
        records.append({"text": str(caption), "image_path": path})
    if not records:
        raise ValueError(f"{source!r} holds no image-caption pairs.")
    if train_data_dir is not None and max_samples is None:
        listed = {os.path.abspath(r["image_path"]) for r in records}
        unlisted = sorted(
            os.path.relpath(os.path.join(root, name), train_data_dir)
            for root, _, names in os.walk(train_data_dir) for name in names
            if name.lower().endswith(IMAGE_EXTENSIONS) and os.path.abspath(os.path.join(root, name)) not in listed
        )
        if unlisted:
            logger.warning(
                f"{len(unlisted)} image file(s) in {train_data_dir!r} have no row in metadata.jsonl and are not "
                f"trained on (e.g. {unlisted[:3]}): add a row per image to use them."
            )
    if uncaptioned:
        logger.warning(
            f"{uncaptioned} of {len(records)} images in {source!r} have an empty, null or missing caption "
            f"({caption_column!r}): they train as unconditional samples, like prompts dropped for classifier-free "
            "guidance (and, when drawn for `--caption_ratio`, to write an empty caption). Fill in the captions if "
            "that is not what you want."
        )
    return records


def load_text_samples(text_data_file: str, text_column: str = "text") -> list[str]:
    """Plain-text samples: a `.txt` file (one per non-empty line) or a JSON/JSONL file with a `text_column` field."""
    from datasets import load_dataset

    if not os.path.isfile(text_data_file):
        raise ValueError(f"`--text_data_file` {text_data_file!r} does not exist.")
    is_json = text_data_file.endswith((".json", ".jsonl"))
    with open(text_data_file, encoding="utf-8") as f:
        if not any(line.strip() for line in f):
            raise ValueError(f"`--text_data_file` {text_data_file!r} is empty.")
    dataset = load_dataset("json" if is_json else "text", data_files=text_data_file, split="train")
    column = text_column if is_json else "text"
    if column not in dataset.column_names:
        raise ValueError(
            f"`--text_column` {column!r} is not a column of {text_data_file!r}; its columns are {dataset.column_names}."
        )
    texts = [str(t).strip() for t in dataset[column] if t is not None and str(t).strip()]
    if not texts:
        raise ValueError(f"`--text_data_file` {text_data_file!r} holds no non-empty text.")
    return texts


# ----------------------------------------------------------------------------------------------------------------------
# Images -> checked tensors -> (cached) latents
# ----------------------------------------------------------------------------------------------------------------------
def image_to_tensor(path: str, image_processor, unit: int) -> torch.Tensor:
    """Open, convert and normalise one image to `(C, H, W)` in `[-1, 1]`; errors name the file.

    `unit` (`patch_size * vae_scale_factor`) must divide both sides after the image processor's optional resize.
    """
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode == "F":
                raise ValueError("a floating-point image (mode F) has no fixed range: save it as 8 or 16 bits")
            if img.mode.startswith("I"):  # 16-bit PNG/TIFF: Pillow's convert() would clip to 8 bits (white)
                values = np.asarray(img, dtype=np.float64)
                if values.min() < 0 or values.max() > 65535:
                    raise ValueError(f"a {img.mode} image with values outside 0..65535 has no known range")
                img = Image.fromarray(np.round(values / 257.0).astype(np.uint8), mode="L")
            img = img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ValueError(f"Cannot read image {path!r}: {err}. Remove it from the dataset or replace the file.") from err
    pixel_values = image_processor(img, return_tensors="pt")["pixel_values"][0]
    h, w = pixel_values.shape[-2:]
    if h % unit or w % unit:
        raise ValueError(
            f"Image {path!r} is {w}x{h} pixels (after resizing), which does not fit the model: both sides must be "
            f"multiples of patch_size * vae_scale_factor = {unit}. Pass `--resolution` (a multiple of {unit}) to "
            "resize every image, or crop the file."
        )
    return pixel_values


def _fingerprint(records: list[dict], image_processor, vae, extra: dict) -> str:
    h = hashlib.sha256()
    for r in records:
        st = os.stat(r["image_path"])
        h.update(f"{os.path.abspath(r['image_path'])}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(json.dumps(image_processor.to_dict(), sort_keys=True, default=str).encode())
    h.update(json.dumps(extra, sort_keys=True).encode())
    if vae is not None:
        h.update(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
        with torch.no_grad():
            for p in vae.parameters():  # a different VAE with the same config must not reuse the cache
                h.update(np.float64(p.double().sum().item()).tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def encode_images(
    records: list[dict],
    image_processor,
    config,
    vae=None,
    cache_dir: str | None = None,
    batch_size: int = 16,
    show_progress: bool = False,
) -> list[torch.Tensor]:
    """Latents `(C, h, w)` for every record: `vae.encode(x).latent_dist.mean` scaled by the VAE's
    `scaling_factor` (and shifted by `shift_factor`), or the pixels themselves for pixel-space models (`vae=None`).

    Every image is opened and checked before the first is encoded, so a bad file fails fast. With `cache_dir`, the
    result is stored in `latents-<fingerprint>.safetensors` and reused by any later call with the same files,
    resolution and VAE.
    """
    from safetensors.torch import load_file, save_file

    if vae is None and config.vae_scale_factor != 1:
        raise ValueError(
            f"The model works on VAE latents (`vae_scale_factor`={config.vae_scale_factor}) but no VAE was given: pass "
            "`--vae` (an AutoencoderKL folder) or a pipeline folder that contains one."
        )
    unit = config.patch_size * config.vae_scale_factor
    cache_file = None
    if cache_dir is not None:
        key = _fingerprint(records, image_processor, vae, {"unit": unit, "channels": config.latent_channels})
        cache_file = os.path.join(cache_dir, f"latents-{key}.safetensors")
        if os.path.isfile(cache_file):
            try:
                stored = load_file(cache_file)
                return [stored[str(i)] for i in range(len(records))]
            except Exception as err:  # truncated or foreign file: the images are still there to encode again
                logger.warning(f"The latent cache {cache_file} is unreadable ({type(err).__name__}: {err}); it will "
                               "be rebuilt from the images.")

    pixels = [image_to_tensor(r["image_path"], image_processor, unit) for r in records]
    if vae is None:
        latents = [p.float() for p in pixels]
        if latents[0].shape[0] != config.latent_channels:
            raise ValueError(
                f"Pixel-space images have {latents[0].shape[0]} channels but the model expects "
                f"`latent_channels`={config.latent_channels}: set the image processor's `num_channels` to match."
            )
    else:
        latents: list[torch.Tensor | None] = [None] * len(pixels)
        by_size: dict[tuple, list[int]] = {}
        for i, p in enumerate(pixels):
            by_size.setdefault(tuple(p.shape), []).append(i)
        device, dtype = vae.device, vae.dtype
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        iterator = [idx[s : s + batch_size] for idx in by_size.values() for s in range(0, len(idx), batch_size)]
        if show_progress:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, desc="encoding images")
        for chunk in iterator:
            x = torch.stack([pixels[i] for i in chunk]).to(device=device, dtype=dtype)
            z = (vae.encode(x).latent_dist.mean - shift) * vae.config.scaling_factor
            for i, zi in zip(chunk, z.float().cpu()):
                latents[i] = zi.contiguous()
    if cache_file is not None:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{cache_file}.tmp{os.getpid()}"
        save_file({str(i): x for i, x in enumerate(latents)}, tmp)
        os.replace(tmp, cache_file)  # atomic: a crash never leaves a half-written cache behind
    return latents


# ----------------------------------------------------------------------------------------------------------------------
# The dataset served to the collator
# ----------------------------------------------------------------------------------------------------------------------
class MonoFormerTrainingDataset(torch.utils.data.Dataset):
    r"""
    Image-caption pairs (as cached latents) plus optional text-only samples, in the format
    [`MonoFormerDataCollator`] reads: `{"text", "latents", "task", "seed"}` or `{"text", "task": "text", "seed"}`.

    Args:
        captions (`list[str]`), latents (`list[torch.Tensor]`): One caption and one `(C, h, w)` latent per image.
        texts (`list[str]`, *optional*): Text-only samples (cycled if fewer than needed).
        text_ratio (`float`, defaults to 0): Fraction of the dataset that is text-only, in `[0, 1)`:
            `round(n_images * r / (1 - r))` text samples are added.
        caption_ratio (`float`, defaults to 0): Fraction of the image samples used the other way round (image ->
            caption, `task="caption"`), drawn per image and epoch from its sample seed.
        seed (`int`, defaults to 0): Base of the per-sample seeds (`hash(seed, epoch, index)`); the collator draws
            noise, timestep and prompt dropout from it, so results do not depend on batch splits or resumption.
    """

    def __init__(self, captions, latents, texts=None, text_ratio: float = 0.0, caption_ratio: float = 0.0, seed=0):
        if len(captions) != len(latents):
            raise ValueError(f"{len(captions)} captions for {len(latents)} latents.")
        if not 0.0 <= text_ratio < 1.0:
            raise ValueError(f"`--text_ratio` must be in [0, 1), got {text_ratio}.")
        if not 0.0 <= caption_ratio <= 1.0:
            raise ValueError(f"`--caption_ratio` must be in [0, 1], got {caption_ratio}.")
        if text_ratio > 0 and not texts:
            raise ValueError("`--text_ratio` > 0 needs text samples: pass `--text_data_file`.")
        self.captions = list(captions)
        self.latents = list(latents)
        self.texts = list(texts or [])
        n_images = len(self.captions)
        self.num_text = int(round(n_images * text_ratio / (1.0 - text_ratio))) if text_ratio > 0 else 0
        self.caption_ratio = caption_ratio
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the training loop (and by accelerate's data loader) so each epoch draws fresh noise."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.captions) + self.num_text

    def sample_seed(self, index: int) -> int:
        digest = hashlib.sha256(f"{self.seed}/{self.epoch}/{index}".encode()).digest()
        return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF

    def __getitem__(self, index: int) -> dict:
        if index < 0 or index >= len(self):
            raise IndexError(index)
        seed = self.sample_seed(index)
        if index >= len(self.captions):
            text = self.texts[(index - len(self.captions)) % len(self.texts)]
            return {"text": text, "task": "text", "seed": seed}
        # Drawn per image and epoch (not once per run): every image trains both ways over a run.
        task = "caption" if random.Random(seed ^ 0x5DEECE66D).random() < self.caption_ratio else "generate"
        return {"text": self.captions[index], "latents": self.latents[index], "task": task, "seed": seed}


__all__ = [
    "MonoFormerTrainingDataset",
    "encode_images",
    "image_to_tensor",
    "load_image_caption_records",
    "load_text_samples",
]
