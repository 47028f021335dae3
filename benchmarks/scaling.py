"""Scale-out on this machine: 1 vs N processes (gloo on CPU, nccl on GPU) for training and evaluation.

Training (weak scaling, as a cluster run: each process keeps its batch, the global batch grows):
samples/s of the tiny CIR and SEPS models under DDP with gathered negatives, and the same with
``gather_negatives`` off, whose difference is the all-gather's cost. Evaluation: wall time of the
sharded CIR (demo val split) and SEPS (generated Flickr-format split, all pairs) evaluations.
Every process uses one CPU thread, so N processes use N cores.

    python benchmarks/scaling.py                     # 1 vs 2 CPU processes
    python benchmarks/scaling.py --procs 1 2 4 8 --device cuda
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _build(kind: str):
    from lever_plugins.compat import import_lavis

    import_lavis()
    torch.manual_seed(0)
    if kind == "cir":
        from lever_plugins.models.blip2_cir import Blip2CirModel

        return Blip2CirModel.from_config({"arch": "lever_blip2_cir", "model_type": "tiny", "use_gated_fusion": True,
                                          "gated_fusion": {"num_heads": 4}})
    from lever_plugins.models.blip2_seps import Blip2SepsModel

    return Blip2SepsModel.from_config({"arch": "lever_blip2_seps", "model_type": "tiny"})


def _batch(kind: str, size: int, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    words = ["make it blue", "move it to the left", "a red circle on the right", "a green cross at the top"]
    texts = [words[(seed + i) % len(words)] for i in range(size)]
    images = torch.randn(size, 3, 64, 64, generator=generator)
    if kind == "cir":
        return {"reference_image": images, "target_image": torch.randn(size, 3, 64, 64, generator=generator),
                "text_input": texts}
    return {"image": images, "text_input": texts, "dense_text": [t + " and a blue square" for t in texts],
            "image_id": torch.arange(seed * size, (seed + 1) * size)}


def _eval_dataset(kind: str, root: str):
    if kind == "cir":
        from torch.utils.data import DataLoader

        from lever_plugins.datasets.cirr import CirrGalleryDataset, CirrTripletDataset
        from lever_plugins.datasets.transforms import cir_image_transform

        transform = cir_image_transform(64, 1.25)
        dataset = CirrTripletDataset(root, "val", transform, load_target_image=False)
        dataset.gallery = CirrGalleryDataset(root, "val", transform)
        return DataLoader(dataset, batch_size=64, collate_fn=dataset.collater)
    from torch.utils.data import DataLoader

    from lever_plugins.datasets.retrieval import build_split, load_dense_captions

    dense_path = os.path.join(root, "dense_captions.json")
    dataset = build_split("val", root=root, images="images", annotation_file="annotations/val.json",
                          dense=load_dense_captions(dense_path), dense_path=dense_path, image_size=64)
    return DataLoader(dataset, batch_size=64, collate_fn=dataset.collater)


def _evaluate(kind: str, model, loader) -> None:
    if kind == "cir":
        from lever_plugins.schemas.cir import ComposedRetrievalRunSettings
        from lever_plugins.tasks.composed_retrieval import ComposedRetrievalTask

        settings = ComposedRetrievalRunSettings(task="lever_composed_retrieval", output_dir="/tmp/unused", progress_bar=False)
        ComposedRetrievalTask(settings).evaluation(model, loader)
        return
    from lever_plugins.schemas.seps_retrieval import SepsRetrievalRunSettings
    from lever_plugins.tasks.seps_retrieval import SepsRetrievalTask

    settings = SepsRetrievalRunSettings(task="lever_seps_retrieval", output_dir="/tmp/unused", progress_bar=False,
                                        lr_sched="lever_multistep_lr", lr_milestones=[5], eval_mode="all_pairs",
                                        eval_image_block=4)
    SepsRetrievalTask(settings).evaluation(model, loader)


def worker(rank: int, world: int, store: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    if args.device == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo", init_method=f"file://{store}",
                                rank=rank, world_size=world)
    results = {}
    for kind in ("cir", "seps"):
        for gather in ((True, False) if world > 1 else (True,)):
            model = _build(kind).to(device)
            model.gather_negatives = gather
            wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank] if args.device == "cuda" else None) \
                if world > 1 else model
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            batches = [_batch(kind, args.batch, seed=1000 * rank + step) for step in range(args.steps + 1)]

            def step(samples):
                samples = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in samples.items()}
                optimizer.zero_grad(set_to_none=True)
                wrapped(samples)["loss"].backward()
                optimizer.step()

            step(batches[0])  # warm-up
            if world > 1:
                dist.barrier()
            start = time.perf_counter()
            for samples in batches[1:]:
                step(samples)
            if args.device == "cuda":
                torch.cuda.synchronize()
            if world > 1:
                dist.barrier()
            results[f"train_{kind}_{'gather' if gather else 'local'}"] = time.perf_counter() - start
        model.eval()
        loader = _eval_dataset(kind, args.cir_root if kind == "cir" else args.seps_root)
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        _evaluate(kind, model, loader)
        if world > 1:
            dist.barrier()
        results[f"eval_{kind}"] = time.perf_counter() - start
    if rank == 0:
        with open(os.path.join(out, f"world{world}.json"), "w") as handle:
            json.dump(results, handle)
    if world > 1:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch", type=int, default=16, help="training samples per process and step")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    from lever_plugins.datasets.demo_cirr import generate_demo_cirr
    from lever_plugins.datasets.demo_retrieval import generate_demo_retrieval

    with tempfile.TemporaryDirectory() as work:
        args.cir_root = os.path.join(work, "cirr")
        generate_demo_cirr(args.cir_root, image_size=64)
        args.seps_root = str(generate_demo_retrieval(Path(work) / "flickr", num_train=1, num_val=60, num_test=1))
        results = {}
        for world in args.procs:
            store = os.path.join(work, f"store{world}")
            mp.spawn(worker, args=(world, store, args, work), nprocs=world, join=True)
            with open(os.path.join(work, f"world{world}.json")) as handle:
                results[world] = json.load(handle)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {os.cpu_count()} cores, device {args.device}, torch {torch.__version__}, load {load:.2f}; "
          f"batch {args.batch} per process, {args.steps} steps, 1 thread per process")
    base = results[args.procs[0]]
    print("| processes | CIR train samples/s | speed-up | all-gather cost | SEPS train samples/s | speed-up | "
          "all-gather cost | CIR eval s | speed-up | SEPS eval s | speed-up |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for world, r in results.items():
        cells = [str(world)]
        for kind in ("cir", "seps"):
            rate = world * args.batch * args.steps / r[f"train_{kind}_gather"]
            base_rate = args.procs[0] * args.batch * args.steps / base[f"train_{kind}_gather"]
            local = r.get(f"train_{kind}_local")
            cost = f"{100 * (r[f'train_{kind}_gather'] / local - 1):+.1f}%" if local else "-"
            cells += [f"{rate:.1f}", f"{rate / base_rate:.2f}x", cost]
        for kind in ("cir", "seps"):
            cells += [f"{r[f'eval_{kind}']:.2f}", f"{base[f'eval_{kind}'] / r[f'eval_{kind}']:.2f}x"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
