"""Beam-search scoring: one batched pass over all candidates versus a loop over candidates.

For one query and a pool of K candidates, beam-search step 1 scores K prompts (one demonstration
each) and step 2 scores ``beam * (K - 1)`` prompts (two demonstrations). This script times
``CausalLmVqa.answer_nll`` on those prompts (a) batched, ``--batch-size`` sequences per forward
(left-padded, only answer logits computed) and (b) one prompt per call, as a per-candidate loop would,
checks that both give the same NLLs, and prints the ratio. The model is a random-initialised Llama
built from a config (nothing is downloaded); its size is set by ``--hidden`` / ``--layers``.

    python benchmarks/beam_search_scoring.py                    # CPU, small model
    python benchmarks/beam_search_scoring.py --device cuda --hidden 1024 --layers 12 --batch-size 64
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lever_plugins.datasets.demo_vqa import ADJECTIVES, COLOURS, OBJECTS, PLACES, QUESTION, build_demo_tokenizer  # noqa: E402
from lever_plugins.icl.data import VqaExample  # noqa: E402
from lever_plugins.icl.vlm import CausalLmVqa, IclPrompt  # noqa: E402
from lever_plugins.schemas.icl import VlmSettings  # noqa: E402


def _examples(count: int) -> list[VqaExample]:
    out = []
    for i in range(count):
        question = QUESTION.format(place=PLACES[i % len(PLACES)], adjective=ADJECTIVES[i % len(ADJECTIVES)], obj=OBJECTS[i % len(OBJECTS)])
        colour = COLOURS[i % len(COLOURS)]
        out.append(VqaExample(i, i, question, colour, (colour,) * 10))
    return out


def _time(fn, repeats: int, device: torch.device) -> list[float]:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pool-size", type=int, default=32)
    parser.add_argument("--beam-size", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    device = torch.device(args.device)
    tokenizer = build_demo_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                         max_position_embeddings=1024)
    model = LlamaForCausalLM(config).to(device).eval()
    vlm = CausalLmVqa(model, tokenizer, VlmSettings(kind="causal_lm", batch_size=args.batch_size, score_eos=False), device)
    examples = _examples(args.pool_size + 1)
    query, pool = examples[0], examples[1:]
    step1 = [IclPrompt(query, (c,)) for c in pool]
    step2 = [IclPrompt(query, (pool[b], c)) for b in range(args.beam_size) for c in pool if c is not pool[b]]
    prompts = step1 + step2
    answers = [query.answer] * len(prompts)

    batched_nll = vlm.answer_nll(prompts, answers)
    looped_nll = torch.cat([vlm.answer_nll([p], [a]) for p, a in zip(prompts, answers)])
    max_diff = float((batched_nll - looped_nll).abs().max())
    batched = _time(lambda: vlm.answer_nll(prompts, answers), args.repeats, device)
    looped = _time(lambda: [vlm.answer_nll([p], [a]) for p, a in zip(prompts, answers)], args.repeats, device)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}; random Llama "
          f"hidden {args.hidden} x {args.layers} layers ({parameters:,} parameters)")
    print(f"one query, K = {args.pool_size}, beam {args.beam_size}, 2 shots: {len(prompts)} prompts "
          f"({len(step1)} at step 1, {len(step2)} at step 2); max |NLL batched - looped| = {max_diff:.2e}")
    b, lo = statistics.median(batched), statistics.median(looped)
    print(f"{'':28} {'batched':>12} {'per prompt':>12} {'ratio':>8}")
    print(f"{'median wall time (ms)':28} {1000 * b:12.1f} {1000 * lo:12.1f} {lo / b:8.2f}x")
    print(f"{'prompts / s':28} {len(prompts) / b:12.1f} {len(prompts) / lo:12.1f}")
    print("per-repeat (s): batched " + ", ".join(f"{t:.3f}" for t in batched) + "; per prompt " + ", ".join(f"{t:.3f}" for t in looped))


if __name__ == "__main__":
    main()
