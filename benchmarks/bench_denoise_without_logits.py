"""Denoising steps without the LM head: the pipeline passes `logits_to_keep=no_logits(...)` (no position) to every
forward whose logits nobody reads, where it used to compute the last position's logits (`logits_to_keep=1`). Paired,
interleaved A/B on a pipeline folder (default: the SmolLM2 model built by `examples/build_smollm2_pipeline.py`, whose
49k x 576 LM head is 113 MB in float32), at the folder's saved sampler; prints s/image and the ratio, and checks that
the images are identical.

    python examples/build_smollm2_pipeline.py --out /tmp/smol
    python benchmarks/bench_denoise_without_logits.py --pipeline /tmp/smol --threads 2 --batches 1 8
"""

import argparse

import torch

import modeling_monoformer.pipeline_monoformer as pipeline_module
from modeling_monoformer import MonoFormerPipeline
from timing import header, interleaved


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt", default="a photo of a sneaker")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = MonoFormerPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    variants = {"last position's logits (before)": lambda device: 1, "no logits": pipeline_module.no_logits}

    def sample(n, variant):
        pipeline_module.no_logits = variants[variant]
        with torch.inference_mode():
            return pipe([args.prompt] * n, generator=torch.manual_seed(0), output_type="latent").images

    same = all(torch.equal(sample(1, name), sample(1, "no logits")) for name in variants)
    header(f"Denoising without the LM head ({args.pipeline})")
    print(f"images identical: {same}")
    print("| batch | last position's logits (before) s/image | no logits s/image | speed-up |")
    print("|---:|---:|---:|---:|")
    for n in args.batches:
        times = interleaved({name: (lambda n=n, name=name: sample(n, name)) for name in variants},
                            rounds=args.rounds, warmup=1)
        before, after = (times[name][0] / n for name in variants)
        print(f"| {n} | {before:.3f} | {after:.3f} | {before / after:.3f}x |")


if __name__ == "__main__":
    main()
