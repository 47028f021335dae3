"""SEPS all-pairs evaluation: our chunked, vectorised head versus the per-caption loop (LAPS structure).

Full head size (embed 512, 196 patches + CLS, 30-word captions, 100-word dense captions) on a slice of
the Flickr30K test shape (1,000 images x 5,000 captions). Each implementation runs in its own
subprocess so that peak memory is the growth of that process's maximum RSS
(``resource.getrusage``) over its state after building the inputs; the parent checks that both give
the same scores and prints the ratios plus projected times for the full test sets on this machine.

The loop re-runs selection and aggregation over every image once per caption, so its cost per caption
is constant: it runs on the first ``--loop-captions`` captions only and its pairs/s is measured there.

    python benchmarks/seps_all_pairs.py                      # 100 images x 500 captions, both modes
    python benchmarks/seps_all_pairs.py --images 20 --captions 100 --loop-captions 10   # quick look
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = {"paper-dual": (True, True), "paper-single": (True, False), "code-dual": (False, True), "code-single": (False, False)}
FULL_SETS = {
    "Flickr30K test (1K x 5K)": 1_000 * 5_000,
    "COCO 1K, 5 folds (5 x 1K x 5K)": 5 * 1_000 * 5_000,
    "COCO 5K (5K x 25K)": 5_000 * 25_000,
}


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def train_worker(args: argparse.Namespace) -> None:
    """One training step (forward + SEPSLoss + backward) on a B x B batch; write CPU time and peak memory."""
    import torch

    sys.path.insert(0, str(REPO))
    from lever_plugins import CrossSparseAggrNet, SEPSLoss

    torch.set_num_threads(args.threads)
    paper, dual = MODES[args.mode]
    torch.manual_seed(0)
    head = CrossSparseAggrNet(
        use_paper_version=paper, use_dual_aggr=dual, pair_chunk_size=args.chunk, checkpoint_pairs=args.checkpoint
    ).train()
    g = torch.Generator().manual_seed(1)
    b = args.batch
    batch = (
        torch.randn(b, 197, 512, generator=g),
        torch.randn(b, 30, 512, generator=g),
        torch.full((b,), 30),
        torch.randn(b, 100, 512, generator=g),
        torch.full((b,), 100),
    )
    criterion = SEPSLoss()
    sims, mask = head(*(x[:2] for x in batch))  # warm-up
    criterion(sims, mask)[0].backward()
    base = _max_rss_mb()
    cpu = time.process_time()
    sims, mask = head(*batch)
    criterion(sims, mask)[0].backward()
    cpu = time.process_time() - cpu
    with open(os.path.join(args.out, "train.json"), "w") as f:
        json.dump({"cpu_seconds": cpu, "peak_mb": _max_rss_mb() - base}, f)


def worker(args: argparse.Namespace) -> None:
    """Run one implementation; write its timing, memory and scores under ``args.out``."""
    import torch

    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "tests"))
    from _seps_reference import per_caption_loop_similarity
    from lever_plugins import CrossSparseAggrNet

    torch.set_num_threads(args.threads)
    paper, dual = MODES[args.mode]
    torch.manual_seed(0)
    head = CrossSparseAggrNet(
        embed_size=512, num_patches=196, use_paper_version=paper, use_dual_aggr=dual, pair_chunk_size=args.chunk
    ).eval()
    g = torch.Generator().manual_seed(1)
    num_captions = args.captions if args.impl == "ours" else args.loop_captions
    img = torch.randn(args.images, 197, 512, generator=g)
    cap = torch.randn(args.captions, 30, 512, generator=g)[:num_captions]
    cap_lens = torch.full((num_captions,), 30)
    long_cap = torch.randn(args.images, 100, 512, generator=g)
    long_lens = torch.full((args.images,), 100)

    def run(*batch):
        if args.impl == "ours":
            return head(*batch)
        return per_caption_loop_similarity(head, *batch)

    walls, cpus = [], []
    with torch.no_grad():
        run(img[:2], cap[:2], cap_lens[:2], long_cap[:2], long_lens[:2])  # warm-up (MKL, allocator)
        base = _max_rss_mb()
        for _ in range(args.repeats):
            wall, cpu = time.perf_counter(), time.process_time()
            sims = run(img, cap, cap_lens, long_cap, long_lens)
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
        peak = _max_rss_mb() - base
    torch.save(sims, os.path.join(args.out, f"{args.impl}.pt"))
    with open(os.path.join(args.out, f"{args.impl}.json"), "w") as f:
        json.dump({"pairs": sims.numel(), "seconds": min(walls), "cpu_seconds": min(cpus), "peak_mb": peak}, f)


def _spawn(args: argparse.Namespace, impl: str, mode: str, out: str) -> dict:
    command = [
        sys.executable, __file__, "--worker", impl, "--mode", mode, "--out", out,
        "--images", str(args.images), "--captions", str(args.captions), "--loop-captions", str(args.loop_captions),
        "--chunk", str(args.chunk), "--threads", str(args.threads), "--repeats", str(args.repeats),
    ]
    subprocess.run(command, check=True)
    with open(os.path.join(out, f"{impl}.json")) as f:
        return json.load(f)


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100, help="images in the slice (Flickr30K test: 1000)")
    parser.add_argument("--captions", type=int, default=500, help="captions in the slice (Flickr30K test: 5000)")
    parser.add_argument("--loop-captions", type=int, default=50, help="captions the per-caption loop runs on")
    parser.add_argument("--chunk", type=int, default=256, help="pair_chunk_size of our head")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: stable on a busy box)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per implementation; the fastest counts")
    parser.add_argument("--modes", default="paper-dual,code-single", help=f"comma-separated, from {sorted(MODES)}")
    parser.add_argument(
        "--memory-sweep",
        default="64,256,1024",
        help="pair_chunk_size values for a memory sweep of our head (first mode; also at 2x captions); '' = none",
    )
    parser.add_argument(
        "--train-batches",
        default="32,64,128",
        help="batch sizes B for a training-step memory check (B x B pairs, with and without checkpoint_pairs); '' = none",
    )
    parser.add_argument("--worker", choices=["ours", "loop", "train"], help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=32, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="paper-dual", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "train":
        train_worker(args)
        return
    if args.worker:
        args.impl = args.worker
        worker(args)
        return
    if not 1 <= args.loop_captions <= args.captions:
        parser.error("--loop-captions must be between 1 and --captions")

    import torch

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} threads; "
        f"slice {args.images} images x {args.captions} captions (loop: {args.loop_captions} captions), "
        f"pair_chunk_size {args.chunk}"
    )
    rows = []
    for mode in args.modes.split(","):
        with tempfile.TemporaryDirectory() as out:
            ours = _spawn(args, "ours", mode, out)
            loop = _spawn(args, "loop", mode, out)
            ours_sims = torch.load(os.path.join(out, "ours.pt"))
            loop_sims = torch.load(os.path.join(out, "loop.pt"))
        diff = (ours_sims[:, : args.loop_captions] - loop_sims).abs().max().item()
        assert torch.allclose(ours_sims[:, : args.loop_captions], loop_sims, atol=1e-5, rtol=1e-5), diff
        ours_rate, loop_rate = ours["pairs"] / ours["seconds"], loop["pairs"] / loop["seconds"]
        rows.append((mode, ours, loop, ours_rate, loop_rate, diff))

    print()
    print(
        "| mode | impl | pairs | wall s | pairs/s | CPU s | pairs/CPU-s | peak MB | speed-up (wall) "
        "| speed-up (CPU) | max abs diff |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for mode, ours, loop, ours_rate, loop_rate, diff in rows:
        cpu_ratio = (ours["pairs"] / ours["cpu_seconds"]) / (loop["pairs"] / loop["cpu_seconds"])
        for name, r, rate in (("loop", loop, loop_rate), ("ours", ours, ours_rate)):
            first = name == "loop"
            print(
                f"| {mode} | {name} | {r['pairs']:,} | {r['seconds']:.1f} | {rate:,.0f} | {r['cpu_seconds']:.1f} "
                f"| {r['pairs'] / r['cpu_seconds']:,.0f} | {r['peak_mb']:.0f} "
                + ("| 1.0x | 1.0x | |" if first else f"| **{ours_rate / loop_rate:.1f}x** | **{cpu_ratio:.1f}x** | {diff:.1e} |")
            )
    if args.memory_sweep:
        mode = args.modes.split(",")[0]
        print()
        print(f"Peak memory of our head ({mode}) against pair_chunk_size and the number of captions:")
        print()
        print("| pair_chunk_size | images x captions | pairs | peak MB | pairs/s |")
        print("| ---: | --- | ---: | ---: | ---: |")
        runs = [(int(c), args.captions) for c in args.memory_sweep.split(",")] + [(args.chunk, 2 * args.captions)]
        for chunk, captions in runs:
            sweep = argparse.Namespace(**{**vars(args), "chunk": chunk, "captions": captions, "repeats": 1})
            with tempfile.TemporaryDirectory() as out:
                r = _spawn(sweep, "ours", mode, out)
            print(
                f"| {chunk} | {args.images} x {captions} | {r['pairs']:,} | {r['peak_mb']:.0f} "
                f"| {r['pairs'] / r['seconds']:,.0f} |"
            )

    if args.train_batches:
        mode = args.modes.split(",")[0]
        print()
        print(f"One training step ({mode}: forward + SEPSLoss + backward), B images x B captions:")
        print()
        print("| B | pairs | peak MB | CPU s | peak MB, checkpoint_pairs | CPU s, checkpoint_pairs |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: |")
        for b in [int(x) for x in args.train_batches.split(",")]:
            cells = []
            for checkpointed in (False, True):
                with tempfile.TemporaryDirectory() as out:
                    command = [
                        sys.executable, __file__, "--worker", "train", "--mode", mode, "--out", out,
                        "--batch", str(b), "--chunk", str(args.chunk), "--threads", str(args.threads),
                    ] + (["--checkpoint"] if checkpointed else [])
                    subprocess.run(command, check=True)
                    with open(os.path.join(out, "train.json")) as f:
                        r = json.load(f)
                cells.append(f"{r['peak_mb']:.0f} | {r['cpu_seconds']:.1f}")
            print(f"| {b} | {b * b:,} | " + " | ".join(cells) + " |")

    print()
    print("Projected all-pairs wall time on this machine (pairs / measured wall pairs/s):")
    print()
    print("| set | pairs | " + " | ".join(f"{m} loop | {m} ours" for m, *_ in rows) + " |")
    print("| --- | ---: | " + " | ".join("---: | ---:" for _ in rows) + " |")
    for name, pairs in FULL_SETS.items():
        cells = " | ".join(f"{_hours(pairs / lr)} | {_hours(pairs / orate)}" for _, _, _, orate, lr, _ in rows)
        print(f"| {name} | {pairs / 1e6:.0f}M | {cells} |")


if __name__ == "__main__":
    main()
