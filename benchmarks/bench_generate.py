"""Text generation speed: `generate()` tokens/s of a wrapped MonoFormer vs the base LLM (greedy, 128 new tokens).
Target: at least 0.95x.

    python benchmarks/bench_generate.py [--new_tokens 128] [--batches 1 8]
"""

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from modeling_monoformer import MonoFormerForConditionalGeneration
from timing import header, interleaved


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(
        vocab_size=1000, hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=8,
        num_key_value_heads=8, max_position_embeddings=1024, eos_token_id=None, bos_token_id=1, pad_token_id=0,
    )).eval()
    model = MonoFormerForConditionalGeneration.from_llm(base).eval()
    header(f"generate(): greedy, {args.new_tokens} new tokens, prompt {args.prompt}, Llama dim 256 depth 6")
    print(f"{'batch':>5} {'base tok/s':>11} {'ours tok/s':>11} {'ratio':>7}  target >= 0.95x")
    for b in args.batches:
        ids = torch.randint(3, 1000, (b, args.prompt))
        kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
        outs = {}

        def run(m, name):
            outs[name] = m.generate(ids, **kw)

        with torch.inference_mode():
            res = interleaved({"base": lambda: run(base, "base"), "ours": lambda: run(model, "ours")},
                              rounds=args.rounds, warmup=1)
        assert torch.equal(outs["base"], outs["ours"]), "outputs differ"
        tps = {k: b * args.new_tokens / v[0] for k, v in res.items()}
        ratio = tps["ours"] / tps["base"]
        print(f"{b:>5} {tps['base']:>11.0f} {tps['ours']:>11.0f} {ratio:>6.3f}x  {'MET' if ratio >= 0.95 else 'MISSED'}")


if __name__ == "__main__":
    main()
