"""SEPS all-pairs evaluation: our chunked, vectorised head versus the per-caption loop (LAPS structure).

Full head size (embed 512, 196 patches + CLS, 30-word captions, 100-word dense captions) on a slice of
the Flickr30K test shape (1,000 images x 5,000 captions). Each implementation runs in its own
subprocess so that peak memory is the growth of that process's maximum RSS
(``resource.getrusage``; on CUDA ``torch.cuda.max_memory_allocated``) over its state after building the
inputs; the parent checks that both give the same scores and prints the ratios plus projected times
for the full test sets on this machine.

The loop re-runs selection and aggregation over every image once per caption, so its cost per caption
is constant: it runs on the first ``--loop-captions`` captions only and its pairs/s is measured there.

``--laps PATH`` instead times LAPS's own head (``CrossSparseAggrNet_v2`` in ``lib/cross_net.py`` of a
local checkout of CrossmodalGroup/LAPS, imported from that path; nothing of it is copied here) and ours
in one process, interleaved, on the same weights, at the ViT-224 shape (64 images x 128 captions
by default); ``--compare-module FILE`` adds another version of our head (e.g. an older
``lever_plugins/modules/seps.py`` from ``git show``) to that comparison.

    python benchmarks/seps_all_pairs.py                      # 100 images x 500 captions, both modes
    python benchmarks/seps_all_pairs.py --images 20 --captions 100 --loop-captions 10   # quick look
    python benchmarks/seps_all_pairs.py --laps /tmp/laps --threads 2                     # against LAPS
    python benchmarks/seps_all_pairs.py --modes '' --memory-sweep '' --train-batches 128 \
        --train-modes paper-dual,code-single                                              # training memory
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = {"paper-dual": (True, True), "paper-single": (True, False), "code-dual": (False, True), "code-single": (False, False)}
FULL_SETS = {
    "Flickr30K test (1K x 5K)": 1_000 * 5_000,
    "COCO 1K, 5 folds (5 x 1K x 5K)": 5 * 1_000 * 5_000,
    "COCO 5K (5K x 25K)": 5_000 * 25_000,
}


DTYPES = ("float32", "bfloat16", "float16")


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _peak_mb(device: str) -> float:
    """Peak memory so far: process max RSS on CPU, the allocator's peak on CUDA."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return _max_rss_mb()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def train_worker(args: argparse.Namespace) -> None:
    """One training step (forward + SEPSLoss + backward) on a B x B batch; write CPU time and peak memory."""
    import torch

    sys.path.insert(0, str(REPO))
    from lever_plugins import CrossSparseAggrNet, SEPSLoss

    torch.set_num_threads(args.threads)
    paper, dual = MODES[args.mode]
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    head = CrossSparseAggrNet(
        use_paper_version=paper, use_dual_aggr=dual, pair_chunk_size=args.chunk, checkpoint_pairs=args.checkpoint
    ).train().to(args.device, dtype)
    g = torch.Generator().manual_seed(1)
    b = args.batch
    batch = (
        torch.randn(b, 197, 512, generator=g).to(args.device, dtype),
        torch.randn(b, 30, 512, generator=g).to(args.device, dtype),
        torch.full((b,), 30, device=args.device),
        torch.randn(b, 100, 512, generator=g).to(args.device, dtype),
        torch.full((b,), 100, device=args.device),
    )
    criterion = SEPSLoss()
    sims, mask = head(*(x[:2] for x in batch))  # warm-up
    criterion(sims.float(), mask)[0].backward()
    head.zero_grad(set_to_none=True)
    _sync(args.device)
    base = _peak_mb(args.device)
    wall, cpu = time.perf_counter(), time.process_time()
    sims, mask = head(*batch)
    criterion(sims.float(), mask)[0].backward()
    _sync(args.device)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    with open(os.path.join(args.out, "train.json"), "w") as f:
        json.dump({"cpu_seconds": cpu, "seconds": wall, "peak_mb": _peak_mb(args.device) - base}, f)


def worker(args: argparse.Namespace) -> None:
    """Run one implementation; write its timing, memory and scores under ``args.out``."""
    import torch

    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "tests"))
    from _seps_reference import per_caption_loop_similarity
    from lever_plugins import CrossSparseAggrNet

    torch.set_num_threads(args.threads)
    paper, dual = MODES[args.mode]
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    head = CrossSparseAggrNet(
        embed_size=512, num_patches=196, use_paper_version=paper, use_dual_aggr=dual, pair_chunk_size=args.chunk
    ).eval().to(args.device, dtype)
    g = torch.Generator().manual_seed(1)
    num_captions = args.captions if args.impl == "ours" else args.loop_captions
    img = torch.randn(args.images, 197, 512, generator=g).to(args.device, dtype)
    cap = torch.randn(args.captions, 30, 512, generator=g)[:num_captions].to(args.device, dtype)
    cap_lens = torch.full((num_captions,), 30, device=args.device)
    long_cap = torch.randn(args.images, 100, 512, generator=g).to(args.device, dtype)
    long_lens = torch.full((args.images,), 100, device=args.device)

    def run(*batch):
        if args.impl == "ours":
            return head(*batch)
        return per_caption_loop_similarity(head, *batch)

    walls, cpus = [], []
    with torch.no_grad():
        run(img[:2], cap[:2], cap_lens[:2], long_cap[:2], long_lens[:2])  # warm-up (MKL, allocator)
        _sync(args.device)
        base = _peak_mb(args.device)
        for _ in range(args.repeats):
            wall, cpu = time.perf_counter(), time.process_time()
            sims = run(img, cap, cap_lens, long_cap, long_lens)
            _sync(args.device)
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
        peak = _peak_mb(args.device) - base
    torch.save(sims.float().cpu(), os.path.join(args.out, f"{args.impl}.pt"))
    with open(os.path.join(args.out, f"{args.impl}.json"), "w") as f:
        json.dump({"pairs": sims.numel(), "seconds": min(walls), "cpu_seconds": min(cpus), "peak_mb": peak}, f)


def _import_by_path(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _laps_class(checkout: Path) -> type:
    """``CrossSparseAggrNet_v2`` from a LAPS checkout's ``lib/cross_net.py``, imported from that path.

    Its ``from lib.xttn import ...`` needs a package named ``lib``: one is put in ``sys.modules`` for the
    import and whatever was there before is restored afterwards.
    """
    lib = checkout / "lib"
    if not (lib / "cross_net.py").is_file() or not (lib / "xttn.py").is_file():
        raise SystemExit(f"--laps {checkout}: expected lib/cross_net.py and lib/xttn.py (a CrossmodalGroup/LAPS checkout)")
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "lib" or k.startswith("lib.")}
    try:
        package = types.ModuleType("lib")
        package.__path__ = [str(lib)]
        sys.modules["lib"] = package
        _import_by_path("lib.xttn", lib / "xttn.py")
        return _import_by_path("lib.cross_net", lib / "cross_net.py").CrossSparseAggrNet_v2
    finally:
        for k in [k for k in sys.modules if k == "lib" or k.startswith("lib.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def laps_comparison(args: argparse.Namespace) -> None:
    """LAPS's head and ours in this process, interleaved, on the same weights (public-code mode, single branch)."""
    import torch

    sys.path.insert(0, str(REPO))
    from lever_plugins import CrossSparseAggrNet

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    laps_cls = _laps_class(Path(args.laps).expanduser().resolve())
    torch.manual_seed(0)
    ours = CrossSparseAggrNet(
        embed_size=512, num_patches=196, sparse_ratio=0.5, aggr_ratio=0.4, use_paper_version=False,
        use_dual_aggr=False, pair_chunk_size=args.chunk,
    )
    opt = types.SimpleNamespace(  # the fields CrossSparseAggrNet_v2 reads (LAPS arguments.py defaults)
        embed_size=512, num_patches=196, sparse_ratio=0.5, aggr_ratio=0.4, attention_weight=0.8, ratio_weight=2.0
    )
    laps = laps_cls(opt)
    state = {f"aggr_net.weight.{k[len('aggregation.'):]}": v for k, v in ours.state_dict().items() if k.startswith("aggregation.")}
    state["aggr_net.scale"] = ours.aggregation_scale.detach().reshape(1, 1, 1)
    laps.load_state_dict(state, strict=True)
    heads = {"LAPS CrossSparseAggrNet_v2": laps, "ours": ours, "ours + dense captions": ours}
    if args.compare_module:
        other = _import_by_path("_seps_compare", Path(args.compare_module)).CrossSparseAggrNet(
            embed_size=512, num_patches=196, sparse_ratio=0.5, aggr_ratio=0.4, use_paper_version=False,
            use_dual_aggr=False, pair_chunk_size=args.compare_chunk or args.chunk,
        )
        other.load_state_dict(ours.state_dict())
        heads = {**dict(list(heads.items())[:1]), f"{args.compare_label}": other,
                 f"{args.compare_label} + dense captions": other, **dict(list(heads.items())[1:])}
    for head in heads.values():
        head.eval().to(args.device, dtype)

    g = torch.Generator().manual_seed(1)
    b_v, b_t = args.images, args.captions
    img = torch.randn(b_v, 197, 512, generator=g).to(args.device, dtype)
    cap = torch.randn(b_t, 30, 512, generator=g).to(args.device, dtype)
    cap_lens = torch.full((b_t,), 30, device=args.device)
    dense = torch.randn(b_v, 100, 512, generator=g).to(args.device, dtype)
    dense_lens = torch.full((b_v,), 100, device=args.device)

    def call(name: str) -> torch.Tensor:
        if name.endswith("dense captions"):
            return heads[name](img, cap, cap_lens, dense, dense_lens)
        return heads[name](img, cap, cap_lens)

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} threads, "
        f"{args.device}, {args.dtype}; {b_v} images (196 patches + CLS) x {b_t} captions (30 words), C 512, "
        f"sparse 0.5, aggregation 0.4, eval, pair_chunk_size {args.chunk}; {_load()}"
    )
    walls = {name: [] for name in heads}
    cpus = {name: [] for name in heads}
    scores = {}
    with torch.no_grad():
        for name in heads:  # warm-up
            call(name)
        for _ in range(args.repeats):
            for name in heads:
                _sync(args.device)
                wall, cpu = time.perf_counter(), time.process_time()
                scores[name] = call(name)
                _sync(args.device)
                walls[name].append(time.perf_counter() - wall)
                cpus[name].append(time.process_time() - cpu)
    print(f"after the runs: {_load()}")
    pairs = b_v * b_t
    reference = scores["LAPS CrossSparseAggrNet_v2"].float()
    laps_rate = pairs / statistics.median(walls["LAPS CrossSparseAggrNet_v2"])
    print()
    print(
        f"Medians of {args.repeats} interleaved repeats; 'x LAPS, same repeat' is the median over repeats of the "
        "ratio to LAPS's run in the same repeat (robust to load that changes between repeats):"
    )
    print()
    print(
        "| head | pairs/s (wall, median) | pairs/CPU-s (median) | x LAPS (wall) | x LAPS, same repeat (wall) "
        "| x LAPS (CPU) | max abs score diff vs LAPS | wall pairs/s per repeat |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    laps_walls = walls["LAPS CrossSparseAggrNet_v2"]
    laps_cpu = pairs / statistics.median(cpus["LAPS CrossSparseAggrNet_v2"])
    for name in heads:
        rate, cpu_rate = pairs / statistics.median(walls[name]), pairs / statistics.median(cpus[name])
        paired = statistics.median(lw / w for lw, w in zip(laps_walls, walls[name]))
        diff = "" if name.startswith("LAPS") else (
            "(dense branch added)" if name.endswith("dense captions")
            else f"{(scores[name].float() - reference).abs().max().item():.1e}"
        )
        each = ", ".join(f"{pairs / w:,.0f}" for w in walls[name])
        print(
            f"| {name} | {rate:,.0f} | {cpu_rate:,.0f} | {rate / laps_rate:.1f}x | {paired:.1f}x "
            f"| {cpu_rate / laps_cpu:.1f}x | {diff} | {each} |"
        )


def _spawn(args: argparse.Namespace, impl: str, mode: str, out: str) -> dict:
    command = [
        sys.executable, __file__, "--worker", impl, "--mode", mode, "--out", out,
        "--images", str(args.images), "--captions", str(args.captions), "--loop-captions", str(args.loop_captions),
        "--chunk", str(args.chunk), "--threads", str(args.threads), "--repeats", str(args.repeats),
        "--device", args.device, "--dtype", args.dtype,
    ]
    subprocess.run(command, check=True)
    with open(os.path.join(out, f"{impl}.json")) as f:
        return json.load(f)


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, help="images in the slice (default 100; --laps: 64; Flickr30K test: 1000)")
    parser.add_argument(
        "--captions", type=int, help="captions in the slice (default 500; --laps: 128; Flickr30K test: 5000)"
    )
    parser.add_argument("--loop-captions", type=int, default=50, help="captions the per-caption loop runs on")
    parser.add_argument("--chunk", type=int, default=256, help="pair_chunk_size of our head")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: stable on a busy box)")
    parser.add_argument(
        "--repeats", type=int, help="runs per implementation (default 2, the fastest counts; --laps: 5, medians)"
    )
    parser.add_argument(
        "--modes", default="paper-dual,code-single", help=f"comma-separated, from {sorted(MODES)}; '' = no loop comparison"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype of the head and its inputs")
    parser.add_argument(
        "--laps", metavar="PATH",
        help="a local CrossmodalGroup/LAPS checkout: time its CrossSparseAggrNet_v2 against ours in one process "
        "(ViT-224 shape; --images/--captions default to 64 x 128 there) and skip everything else",
    )
    parser.add_argument(
        "--compare-module", metavar="FILE",
        help="with --laps: also time the CrossSparseAggrNet of this file (e.g. an older lever_plugins/modules/seps.py)",
    )
    parser.add_argument("--compare-label", default="ours, other version", help="its row label")
    parser.add_argument("--compare-chunk", type=int, help="its pair_chunk_size (default: --chunk)")
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
    parser.add_argument("--train-modes", help="modes of the training-step check (default: the first of --modes)")
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
    if args.laps:
        args.images, args.captions = args.images or 64, args.captions or 128
        args.repeats = args.repeats or 5
        laps_comparison(args)
        return
    args.images, args.captions, args.repeats = args.images or 100, args.captions or 500, args.repeats or 2
    if not 1 <= args.loop_captions <= args.captions:
        parser.error("--loop-captions must be between 1 and --captions")

    import torch

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} threads, "
        f"{args.device}, {args.dtype}; slice {args.images} images x {args.captions} captions "
        f"(loop: {args.loop_captions} captions), pair_chunk_size {args.chunk}; {_load()}"
    )
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes + (args.train_modes or "").split(",")) - set(MODES) - {""})
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; choose from {sorted(MODES)}")
    tolerance = 1e-5 if args.dtype == "float32" else 5e-2
    rows = []
    for mode in modes:
        with tempfile.TemporaryDirectory() as out:
            ours = _spawn(args, "ours", mode, out)
            loop = _spawn(args, "loop", mode, out)
            ours_sims = torch.load(os.path.join(out, "ours.pt"))
            loop_sims = torch.load(os.path.join(out, "loop.pt"))
        diff = (ours_sims[:, : args.loop_captions] - loop_sims).abs().max().item()
        assert torch.allclose(ours_sims[:, : args.loop_captions], loop_sims, atol=tolerance, rtol=tolerance), diff
        ours_rate, loop_rate = ours["pairs"] / ours["seconds"], loop["pairs"] / loop["seconds"]
        rows.append((mode, ours, loop, ours_rate, loop_rate, diff))

    if rows:
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
    if args.memory_sweep and modes:
        mode = modes[0]
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

    train_modes = [m for m in (args.train_modes or (modes[0] if modes else "paper-dual")).split(",") if m]
    if args.train_batches:
        print()
        print("One training step (forward + SEPSLoss + backward, dense captions), B images x B captions:")
        print()
        print(
            "| mode | B | pairs | peak MB | CPU s | wall s | peak MB, checkpoint_pairs | CPU s, checkpoint_pairs "
            "| wall s, checkpoint_pairs |"
        )
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for mode in train_modes if args.train_batches else []:
        for b in [int(x) for x in args.train_batches.split(",")]:
            cells = []
            for checkpointed in (False, True):
                with tempfile.TemporaryDirectory() as out:
                    command = [
                        sys.executable, __file__, "--worker", "train", "--mode", mode, "--out", out,
                        "--batch", str(b), "--chunk", str(args.chunk), "--threads", str(args.threads),
                        "--device", args.device, "--dtype", args.dtype,
                    ] + (["--checkpoint"] if checkpointed else [])
                    subprocess.run(command, check=True)
                    with open(os.path.join(out, "train.json")) as f:
                        r = json.load(f)
                cells.append(f"{r['peak_mb']:.0f} | {r['cpu_seconds']:.1f} | {r['seconds']:.1f}")
            print(f"| {mode} | {b} | {b * b:,} | " + " | ".join(cells) + " |")
    print(f"\n{_load()}")
    if not rows:
        return

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
