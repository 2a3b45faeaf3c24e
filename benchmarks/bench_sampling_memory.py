"""Peak memory of a sampling run does not grow with `num_inference_steps` (the prefix KV cache is rolled back each step).

Each setting runs in a fresh process: build the pipeline, run one 10-step call (so that weights, the allocator's
pools and lazy imports are resident), read the peak RSS (`ru_maxrss`), run the measured call, read it again. The table shows
the peak RSS of the process and the growth the measured call added over the warm baseline, and the bytes of torch
tensors still alive after the call minus after the warm-up (exact: no allocator noise; the scheduler's own
`timesteps`/`sigmas`, which hold one entry per step by design, are left out). A cache that kept each step's
image block would add `rows x tokens x layers x 2 x hidden x 4` bytes per step ("leak/step"). Target: live tensor
bytes unchanged, and the RSS growth at the largest step count exceeds the growth at the smallest by less than
`--tolerance` (5%) of what such a leak would add over the extra steps; the remaining few MiB are the allocator's
fragmentation (glibc arenas), not live memory.

Llama hidden 256, 4 layers, 4 heads, pixel space 32x32x3 in 2x2 patches (256 image tokens), FlowMatchEuler, one
prompt with CFG (2 rows).

    python benchmarks/bench_sampling_memory.py [--steps 10 50 200] [--threads N]
"""

import argparse
import gc
import json
import os
import resource
import subprocess
import sys

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from transformers import LlamaConfig, LlamaForCausalLM

from bench_sampling import word_tokenizer
from modeling_monoformer import (
    MonoFormerForConditionalGeneration,
    MonoFormerImageProcessor,
    MonoFormerPipeline,
    MonoFormerProcessor,
)

HIDDEN, LAYERS, IMAGE, PATCH = 256, 4, 32, 2
PROMPT = "w1 w2 w3 w4 w5 w6 w7 w8"


def peak_rss() -> int:
    """Peak resident set size of this process in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def live_tensor_bytes(exclude=()) -> int:
    """Bytes of the storages of every live torch tensor, except those of the tensors in `exclude`."""
    gc.collect()
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages = {}
    for obj in gc.get_objects():
        if torch.is_tensor(obj) and not obj.is_meta:
            storage = obj.untyped_storage()
            if storage.data_ptr() not in skip:
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def child(steps: int, guidance: float) -> dict:
    tok = word_tokenizer()
    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=4 * HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
    ))
    model = MonoFormerForConditionalGeneration.from_llm(
        llm, tokenizer=tok, latent_channels=3, patch_size=PATCH, vae_scale_factor=1, sample_size=IMAGE,
        prediction_type="flow",
    ).eval()
    pipe = MonoFormerPipeline(
        model=model, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(),
        processor=MonoFormerProcessor(MonoFormerImageProcessor(), tok),
    )
    pipe.set_progress_bar_config(disable=True)

    def run(n):
        pipe(PROMPT, num_inference_steps=n, guidance_scale=guidance, generator=torch.manual_seed(0),
             output_type="latent")

    def scheduler_tensors():
        return [v for v in vars(pipe.scheduler).values() if torch.is_tensor(v)]

    run(10)
    baseline, live_before = peak_rss(), live_tensor_bytes(scheduler_tensors())
    run(steps)
    live_after = live_tensor_bytes(scheduler_tensors())
    return {"baseline": baseline, "peak": peak_rss(), "live_delta": live_after - live_before}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 50, 200])
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tolerance", type=float, default=0.05, help="fraction of the per-step leak's total")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child is not None:
        print(json.dumps(child(args.child, args.guidance)))
        return

    rows = 2 if args.guidance > 1 else 1
    n_image = (IMAGE // PATCH) ** 2
    leak_per_step = rows * n_image * LAYERS * 2 * HIDDEN * 4
    print(
        f"Peak RSS of one MonoFormerPipeline call vs num_inference_steps (torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, cpu, fresh process per setting)\n"
        f"Llama hidden {HIDDEN} x {LAYERS} layers, {n_image} image tokens, {rows} rows (CFG {args.guidance:g}); "
        f"leak/step if the cache kept each image block: {leak_per_step / 2**20:.2f} MiB"
    )
    print(f"{'steps':>6} {'peak RSS MiB':>13} {'growth MiB':>11} {'leak would add MiB':>19} {'live tensors B':>15}")
    growth, live = {}, {}
    for steps in args.steps:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", str(steps), "--guidance", str(args.guidance)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        growth[steps], live[steps] = (res["peak"] - res["baseline"]) / 2**20, res["live_delta"]
        print(f"{steps:>6} {res['peak'] / 2**20:>13.1f} {growth[steps]:>11.1f} {steps * leak_per_step / 2**20:>19.1f} "
              f"{live[steps]:>+15d}")
    lo, hi = min(args.steps), max(args.steps)
    delta = growth[hi] - growth[lo]
    tolerance = args.tolerance * (hi - lo) * leak_per_step / 2**20
    flat = delta < tolerance and all(v == 0 for v in live.values())
    print(f"RSS growth at {hi} steps - at {lo} steps = {delta:+.1f} MiB (tolerance {tolerance:.1f} MiB = "
          f"{args.tolerance:.0%} of a per-step leak); live tensor bytes unchanged: {all(v == 0 for v in live.values())}"
          f"\nTarget (peak memory flat in num_inference_steps): {'MET' if flat else 'MISSED'}")


if __name__ == "__main__":
    main()
