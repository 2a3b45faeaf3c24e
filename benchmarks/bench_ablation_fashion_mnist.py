"""Design choices of the demo recipe, decided by measurement at an equal short budget.

Each configuration trains `examples/train_fashion_mnist.py` for the same wall-clock budget (`--minutes`, same seed,
same data mix, same model size), then `bench_quality_fashion_mnist.py` scores it (class accuracy and Fréchet distance
of generated samples, captioning accuracy, held-out perplexity) at the given sampler settings. One table comes out.
Run it on a quiet machine: the budget is wall-clock, so background load shortens every run alike but adds noise.

    python benchmarks/bench_ablation_fashion_mnist.py --minutes 2 --per_class 20
"""

import argparse
import json
import pathlib
import re
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = {
    "adaln / flow / p4 (default)": [],
    "token / flow / p4": ["--timestep_conditioning", "token"],
    "add / flow / p4": ["--timestep_conditioning", "add"],
    "adaln / epsilon / p4": ["--prediction_type", "epsilon"],
    "adaln / flow / p2": ["--patch_size", "2"],
    "adaln / flow / U-Net p7 [32]": ["--patch_embedder", "unet", "--patch_size", "7", "--unet_block_channels", "32"],
    "adaln / flow / U-Net p4 [32, 64]": ["--patch_embedder", "unet", "--unet_block_channels", "32", "64"],
    "adaln / flow / p4 bf16": ["--mixed_precision", "bf16"],
}
METRICS = {
    "class accuracy of samples": "class acc",
    "FD(samples, test)": "FD",
    "FD / floor": "FD/floor",
    "diversity vs real (mean)": "diversity",
    "images seen": "images seen",
    "seconds per image": "s/image",
    "captioning accuracy": "caption acc",
    "perplexity": "ppl",
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=2.0, help="training budget per configuration")
    parser.add_argument("--per_class", type=int, default=20)
    parser.add_argument("--num_captions", type=int, default=200)
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--guidance_scale", type=float, default=3.0)
    parser.add_argument("--model_args", default="", help="extra training arguments shared by every configuration "
                        "(default: the recipe's model, 192-d x 6 layers)")
    parser.add_argument("--only", nargs="*", help="subset of configuration names")
    args = parser.parse_args()

    rows = []
    for name, extra in CONFIGS.items():
        if args.only and name not in args.only:
            continue
        with tempfile.TemporaryDirectory() as out:
            train = [sys.executable, str(ROOT / "examples" / "train_fashion_mnist.py"), "--minutes", str(args.minutes),
                     "--output_dir", out, "--sample_every_minutes", "1000", *args.model_args.split(), *extra]
            subprocess.run(train, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            summary = json.loads((pathlib.Path(out) / "summary.json").read_text())
            bench = [sys.executable, str(ROOT / "benchmarks" / "bench_quality_fashion_mnist.py"),
                     "--checkpoint", str(pathlib.Path(out) / "pipeline"), "--per_class", str(args.per_class),
                     "--num_captions", str(args.num_captions), "--steps", str(args.steps),
                     "--guidance_scale", str(args.guidance_scale), "--ppl_windows", "10"]
            text = subprocess.run(bench, check=True, capture_output=True, text=True).stdout
        values = {}
        for line in text.splitlines():
            for key, short in METRICS.items():
                if line.startswith(key):
                    values[short] = re.split(r"\s{2,}", line.strip())[1]
        values["steps"] = str(summary.get("steps", "?"))
        rows.append((name, values))
        print(f"{name}: {values}", flush=True)

    cols = ["steps", "images seen", "class acc", "FD", "FD/floor", "diversity", "caption acc", "ppl", "s/image"]
    print(f"\nAblation: {args.minutes} min of training each, {args.model_args or 'the recipe defaults'}; sampler: "
          f"each run's saved scheduler (DPM-Solver++ on flow sigmas / DDIM), {args.steps} steps, guidance {args.guidance_scale}, {args.per_class} samples per class")
    print(f"| {'configuration':<28} | " + " | ".join(f"{c:>11}" for c in cols) + " |")
    print(f"|{'-' * 30}|" + "|".join("-" * 13 for _ in cols) + "|")
    for name, values in rows:
        print(f"| {name:<28} | " + " | ".join(f"{values.get(c, '?'):>11}" for c in cols) + " |")


if __name__ == "__main__":
    main()
