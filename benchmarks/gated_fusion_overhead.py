"""Step-time overhead of the gated fusion plugin on a full-size BLIP-2 Q-Former fusion pass.

Times, in one run and side by side, the CIR fusion pass of a BLIP-2 Q-Former with and without
``GatedFusionModule`` in front of it:

* baseline: 32 queries + the modification-text tokens self-attend together while cross-attending the
  reference-image tokens (``Qformer.bert(text_ids, query_embeds=..., encoder_hidden_states=image)``);
* plugin:   ``image = GatedFusionModule(1408, text_width=768)(image, Qformer.bert.embeddings(text_ids))``
  first (alpha set nonzero so it does real work), then the same pass.

"train" = forward, loss, backward and an AdamW step over the Q-Former (+ plugin) parameters;
"eval" = forward under ``torch.no_grad()``. Full size: ViT-g tokens 257 x 1408 (random, as the frozen
image encoder would output them; the ViT itself is not run), BERT-base Q-Former (12 layers, hidden 768,
12 heads, intermediate 3072, cross-attention every 2 layers), random init. Runs alternate baseline
and plugin so that drift in machine speed hits both; medians are reported.

    python benchmarks/gated_fusion_overhead.py --device cpu --repeats 3
    python benchmarks/gated_fusion_overhead.py --device cuda --repeats 30 --amp
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lever_plugins.compat import import_lavis  # noqa: E402
from lever_plugins.modules.gated_fusion import GatedFusionModule  # noqa: E402

VISION_WIDTH = 1408  # EVA ViT-g
NUM_IMAGE_TOKENS = 257  # CLS + 16 x 16 patches at 224 px
NUM_QUERIES = 32


def build_qformer(num_layers: int):
    """BLIP-2's Q-Former (LAVIS ``BertLMHeadModel``) at BERT-base size, random init, no download."""
    import_lavis()
    from lavis.models.blip2_models.Qformer import BertConfig, BertLMHeadModel

    config = BertConfig.from_dict(
        {
            "vocab_size": 30523,  # bert-base-uncased + BLIP-2's [DEC] token
            "hidden_size": 768,
            "num_hidden_layers": num_layers,
            "num_attention_heads": 12,
            "intermediate_size": 3072,
            "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1,
            "attention_probs_dropout_prob": 0.1,
            "max_position_embeddings": 512,
            "type_vocab_size": 2,
            "initializer_range": 0.02,
            "layer_norm_eps": 1e-12,
            "pad_token_id": 0,
        }
    )
    config.encoder_width = VISION_WIDTH
    config.add_cross_attention = True
    config.cross_attention_freq = 2
    config.query_length = NUM_QUERIES
    qformer = BertLMHeadModel(config)
    query_tokens = torch.nn.Parameter(torch.randn(1, NUM_QUERIES, config.hidden_size) * config.initializer_range)
    return qformer, query_tokens


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def make_timer(fn: Callable[[], None], sync: Callable[[], None]) -> Callable[[], tuple[float, float]]:
    """Wrap ``fn`` to return (wall ms, process CPU ms) of one call."""

    def timed() -> tuple[float, float]:
        sync()
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        sync()
        return (time.perf_counter() - wall) * 1e3, (time.process_time() - cpu) * 1e3

    return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--text-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per variant first")
    parser.add_argument("--num-layers", type=int, default=12, help="Q-Former layers (12 = BLIP-2)")
    parser.add_argument("--amp", action="store_true", help="autocast (fp16 on cuda, bf16 on cpu), as LAVIS trains")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--alpha", type=float, default=0.1, help="plugin alpha (nonzero: the update is real work)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16

    qformer, query_tokens = build_qformer(args.num_layers)
    qformer.to(device)
    query_tokens = torch.nn.Parameter(query_tokens.detach().to(device))
    fusion = GatedFusionModule(VISION_WIDTH, text_width=qformer.config.hidden_size).to(device)
    with torch.no_grad():
        fusion.alpha.fill_(args.alpha)

    batch, text_len = args.batch, args.text_len
    image_embeds = torch.randn(batch, NUM_IMAGE_TOKENS, VISION_WIDTH, device=device)
    image_atts = torch.ones(batch, NUM_IMAGE_TOKENS, dtype=torch.long, device=device)
    text_ids = torch.randint(1000, 30000, (batch, text_len), device=device)
    text_ids[:, 0] = 101  # [CLS]
    text_atts = torch.ones(batch, text_len, dtype=torch.long, device=device)
    text_atts[: batch // 2, text_len * 3 // 4 :] = 0  # some padded captions, as in a real batch
    query_atts = torch.ones(batch, NUM_QUERIES, dtype=torch.long, device=device)
    attention_mask = torch.cat([query_atts, text_atts], dim=1)
    loss_weights = torch.randn(NUM_QUERIES, qformer.config.hidden_size, device=device)

    base_params = list(qformer.parameters()) + [query_tokens]
    optimizers = {
        False: torch.optim.AdamW(base_params, lr=1e-5, betas=(0.9, 0.98), eps=1e-7, weight_decay=0.05),
        True: torch.optim.AdamW(
            base_params + list(fusion.parameters()), lr=1e-5, betas=(0.9, 0.98), eps=1e-7, weight_decay=0.05
        ),
    }

    def fusion_pass(use_plugin: bool) -> torch.Tensor:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=args.amp):
            image = image_embeds
            if use_plugin:
                text_embeds = qformer.bert.embeddings(input_ids=text_ids)
                image = fusion(image, text_embeds, text_atts)
            output = qformer.bert(
                text_ids,
                query_embeds=query_tokens.expand(batch, -1, -1),
                attention_mask=attention_mask,
                encoder_hidden_states=image,
                encoder_attention_mask=image_atts,
                return_dict=True,
            )
            return output.last_hidden_state[:, :NUM_QUERIES]

    def train_step(use_plugin: bool) -> None:
        optimizer = optimizers[use_plugin]
        optimizer.zero_grad(set_to_none=True)
        loss = (fusion_pass(use_plugin).float() * loss_weights).mean()
        loss.backward()
        optimizer.step()

    def eval_forward(use_plugin: bool) -> None:
        with torch.no_grad():
            fusion_pass(use_plugin)

    # Matmul/attention FLOPs per call, counted by torch (independent of machine load).
    from torch.utils.flop_counter import FlopCounterMode

    flops: dict[str, dict[bool, int]] = {}
    for mode, step, train in (("train step", train_step, True), ("eval forward", eval_forward, False)):
        qformer.train(train)
        fusion.train(train)
        flops[mode] = {}
        for flag in (False, True):
            counter = FlopCounterMode(display=False)
            with counter:
                step(flag)
            flops[mode][flag] = counter.get_total_flops()

    results: dict[str, dict[bool, list[tuple[float, float]]]] = {}
    for mode, step, train in (("train step", train_step, True), ("eval forward", eval_forward, False)):
        qformer.train(train)
        fusion.train(train)
        timers = {flag: make_timer(lambda flag=flag: step(flag), sync) for flag in (False, True)}
        for _ in range(args.warmup):
            for flag in (False, True):
                timers[flag]()
        results[mode] = {False: [], True: []}
        for _ in range(args.repeats):
            for flag in (False, True):
                results[mode][flag].append(timers[flag]())
        print(f"  {mode}: done", file=sys.stderr)

    qformer_count = sum(p.numel() for p in qformer.parameters()) + query_tokens.numel()
    plugin_count = sum(p.numel() for p in fusion.parameters())
    threads = torch.get_num_threads()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu_name()}, {threads} threads"
    print(
        f"gated fusion overhead | device {args.device} ({where}) | torch {torch.__version__} | amp {args.amp}\n"
        f"batch {batch}, image tokens {NUM_IMAGE_TOKENS}x{VISION_WIDTH}, queries {NUM_QUERIES}, text {text_len}, "
        f"Q-Former layers {args.num_layers}, repeats {args.repeats} (median), warm-up {args.warmup}\n"
        f"parameters: Q-Former {qformer_count:,}, plugin {plugin_count:,} (+{100 * plugin_count / qformer_count:.1f}%)"
    )
    # Process CPU time is reported on CPU because wall time is unreliable on a shared machine.
    clocks = [("wall", 0)] + ([("cpu", 1)] if device.type == "cpu" else [])
    print(f"{'':20s}{'baseline ms':>13s}{'gated ms':>11s}{'ratio':>8s}{'overhead':>10s}")
    for mode, timings in results.items():
        for clock, index in clocks:
            base = statistics.median(t[index] for t in timings[False])
            gated = statistics.median(t[index] for t in timings[True])
            label = f"{mode} ({clock})"
            print(f"{label:20s}{base:13.1f}{gated:11.1f}{gated / base:8.3f}{100 * (gated / base - 1):9.1f}%")
    for mode, counts in flops.items():
        base, gated = counts[False] / 1e9, counts[True] / 1e9
        label = f"{mode} (GFLOP)"
        print(f"{label:20s}{base:13.1f}{gated:11.1f}{gated / base:8.3f}{100 * (gated / base - 1):9.1f}%")
    for mode, timings in results.items():
        for flag, name in ((False, "baseline"), (True, "gated")):
            walls = ", ".join(f"{t[0]:.0f}" for t in timings[flag])
            print(f"  {mode} {name} wall ms per repeat: {walls}")
    if device.type == "cuda":
        print(f"peak CUDA memory (both variants, one process): {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
