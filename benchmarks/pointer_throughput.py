"""Pointer selector throughput: batched ``predict`` versus a per-query loop, and training samples/s.

Default sizes (d_model 768, K 32, shot_num 6) and default configs of V1, V2 and V3; V3 is timed with
each ranking loss (RADI rows include the teacher's MC-dropout pass). Prints one table with the
batched/loop ratio, and checks that both ways select the same demonstrations.

    python benchmarks/pointer_throughput.py                 # CPU, torch's default thread count
    python benchmarks/pointer_throughput.py --threads 1 --device cuda
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from typing import Callable, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from lever_plugins.modules.pointer import (  # noqa: E402
    build_model_v1,
    build_model_v2,
    build_model_v3,
    mc_dropout_logits,
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    _sync(device)
    times: List[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _data(n: int, cfg, device: torch.device, seed: int):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(n, cfg.d_model, generator=gen)
    cands = torch.randn(n, cfg.K, cfg.d_model, generator=gen)
    labels = torch.stack([torch.randperm(cfg.K, generator=gen)[: cfg.shot_num] for _ in range(n)])
    beam = torch.randn(n, cfg.shot_num, generator=gen)
    return query.to(device), cands.to(device), labels.to(device), beam.to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=512, help="queries per predict measurement")
    parser.add_argument("--train-batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)

    variants = [
        ("V1", build_model_v1(), {}),
        ("V2", build_model_v2(), {}),
        ("V3 listwise", build_model_v3(), {}),
        ("V3 pairwise", build_model_v3({"ranking_loss_type": "pairwise"}), {}),
        ("V3 radi_pairwise", build_model_v3({"ranking_loss_type": "radi_pairwise"}), {"teacher": True}),
        ("V3 radi_listwise", build_model_v3({"ranking_loss_type": "radi_listwise"}), {"teacher": True}),
    ]
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "-"
    print(
        f"torch {torch.__version__}, device {device} ({gpu}), threads {torch.get_num_threads()}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    )
    print(f"d_model 768, K 32, shot_num 6; predict over {args.queries} queries; train batch {args.train_batch}")
    header = f"{'model':<18}{'params':>9}{'batched q/s':>14}{'loop q/s':>11}{'ratio':>8}{'train samples/s':>17}"
    print(header)
    print("-" * len(header))
    predict_done = set()
    for name, model, opts in variants:
        model.to(device)
        cfg = model.settings
        query, cands, labels, beam = _data(args.queries, cfg, device, seed=1)
        params = sum(p.numel() for p in model.parameters())

        arch = name.split()[0]
        if arch not in predict_done:  # the ranking loss does not change predict
            batched_s = _median_seconds(lambda: model.predict(query, cands), args.repeats, device)
            loop_n = min(args.queries, 128)
            loop_s = _median_seconds(
                lambda: [model.predict(query[i : i + 1], cands[i : i + 1]) for i in range(loop_n)],
                max(1, args.repeats // 2),
                device,
            )
            batched_pred, _ = model.predict(query[:loop_n], cands[:loop_n])
            loop_pred = torch.cat([model.predict(query[i : i + 1], cands[i : i + 1])[0] for i in range(loop_n)])
            assert torch.equal(batched_pred, loop_pred), f"{name}: batched and per-query predictions differ"
            batched_qps, loop_qps = args.queries / batched_s, loop_n / loop_s
            predict_cols = f"{batched_qps:>14,.0f}{loop_qps:>11,.0f}{batched_qps / loop_qps:>7.1f}x"
            predict_done.add(arch)
        else:
            predict_cols = f"{'(same)':>14}{'':>11}{'':>8}"

        tq, tc, tl, tb = (t[: args.train_batch] for t in (query, cands, labels, beam))
        teacher = build_model_v1().to(device) if opts.get("teacher") else None
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-2)
        model.train()

        def train_step() -> None:
            teacher_logits = None
            if teacher is not None:
                teacher_logits = mc_dropout_logits(teacher, tq, tc, tl, cfg.radi_mc_samples)
            loss = model(tq, tc, tl, beam_scores=tb, teacher_logits=teacher_logits)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        train_s = _median_seconds(train_step, args.repeats * 2, device)
        print(f"{name:<18}{params:>9,}{predict_cols}{args.train_batch / train_s:>17,.0f}")


if __name__ == "__main__":
    main()
