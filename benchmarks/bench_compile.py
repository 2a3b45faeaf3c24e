"""`torch.compile` of the model's forward for the pipeline's image-block step: speed with and without, compile time,
and whether the compiled pipeline's output equals the eager one.

The model is compiled from outside (the pipeline is unchanged): `model.forward = torch.compile(model.forward,
dynamic=False)`. Every denoising step feeds the same shapes (the prefix cache is rolled back after each step), so one
graph serves all steps after the first call; the prefix pass is a second shape and compiles once more.

Measured: (a) the image-block step alone (`pipe.predict` on a prepared prefix cache: one model call + cache roll-back),
eager vs compiled, interleaved; (b) a whole pipeline call; (c) the one-off compile time (first compiled call minus an
eager call); (d) max |compiled - eager| of the pipeline's output latents (same seed).

Model: as bench_vs_transfusion.py (Llama dim 256, depth 6, 8 heads, sdpa; 28x28x1 pixel space, 4x4 patches = 49
image tokens, flow, FlowMatchEuler), one prompt, with and without CFG.

    python benchmarks/bench_compile.py [--steps 62] [--rounds 5] [--threads N] [--mode default|max-autotune-no-cudagraphs]
"""

import argparse
import time

import torch

from bench_vs_transfusion import build_ours
from timing import header, interleaved


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--image", type=int, default=28)
    parser.add_argument("--patch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=62)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--mode", default="default")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--atol", type=float, default=1e-4)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    pipe = build_ours(args)
    model = pipe.model
    eager_forward = model.forward
    compiled_forward = torch.compile(model.forward, dynamic=False, mode=args.mode)

    def use(compiled: bool):
        if compiled:
            model.forward = compiled_forward
        elif "forward" in vars(model):
            del model.forward  # back to the class's (eager) forward

    header(f"torch.compile(model.forward, dynamic=False, mode={args.mode!r}) for the image-block step; Llama dim "
           f"{args.dim} x {args.depth} layers, {args.heads} heads, {args.image}x{args.image}x1 in {args.patch}x"
           f"{args.patch} patches, {args.steps} FlowMatchEuler steps, min of {args.rounds} interleaved rounds")
    print(f"{'CFG':>4} {'compile s':>10} {'eager ms/step':>14} {'compiled ms/step':>17} {'speed-up':>9} "
          f"{'eager s/img':>12} {'compiled s/img':>15} {'speed-up':>9} {'max|diff|':>10}  equal")
    prompt = "w1 w2 w3 w4"
    for guidance in (1.0, 4.0):
        def sample(compiled: bool):
            use(compiled)
            return pipe(prompt, num_inference_steps=args.steps, guidance_scale=guidance, output_type="latent",
                        generator=torch.manual_seed(0)).images

        with torch.inference_mode():
            start = time.perf_counter()
            eager_out = sample(False)
            eager_s = time.perf_counter() - start
            start = time.perf_counter()
            compiled_out = sample(True)  # compiles the prefix and the image-block graphs
            compile_s = time.perf_counter() - start - eager_s
            diff = (compiled_out - eager_out).abs().max().item()

            # The image-block step alone, on a fixed prefix cache.
            do_cfg = guidance > 1
            input_ids, attention_mask, n_image = pipe.encode_prompt(
                prompt, None, 1, do_cfg, args.image, args.image, model.device
            )
            latents = torch.randn(2 if do_cfg else 1, 1, args.image, args.image)
            t = torch.tensor(500.0)
            contexts = {c: (use(c), pipe.prepare_context(input_ids, attention_mask, n_image))[1] for c in (False, True)}

            def step(compiled: bool):
                return lambda: (use(compiled), pipe.predict(contexts[compiled], latents, t))

            per_step = interleaved({"eager": step(False), "compiled": step(True)}, rounds=args.rounds * 10)
            whole = interleaved({"eager": lambda: sample(False), "compiled": lambda: sample(True)}, rounds=args.rounds,
                                warmup=1)
        use(False)
        e_step, c_step = per_step["eager"][0], per_step["compiled"][0]
        e_img, c_img = whole["eager"][0], whole["compiled"][0]
        print(f"{'yes' if do_cfg else 'no':>4} {compile_s:>10.1f} {e_step * 1e3:>14.2f} {c_step * 1e3:>17.2f} "
              f"{e_step / c_step:>8.2f}x {e_img:>12.3f} {c_img:>15.3f} {e_img / c_img:>8.2f}x {diff:>10.1e}  "
              f"{'yes' if diff <= args.atol else 'NO'} (atol {args.atol:g})")
    assert model.forward == eager_forward


if __name__ == "__main__":
    main()
