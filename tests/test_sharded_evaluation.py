"""SEPS retrieval evaluation sharded over 2 gloo processes gives exactly the single-process result."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lever_plugins.compat import import_lavis

import_lavis()
pytestmark = [pytest.mark.lavis, pytest.mark.slow]

WORLD = 2
MODES = {
    "all_pairs": ({"eval_mode": "all_pairs", "eval_image_block": 2}, "flickr"),
    "rerank_coco_folds": ({"eval_mode": "rerank", "k_test": 2}, "coco"),
}


def evaluate_all_modes(root: str) -> dict:
    from torch.utils.data import DataLoader

    from lever_plugins.datasets.retrieval import build_split, load_dense_captions
    from lever_plugins.models.blip2_seps import Blip2SepsModel
    from lever_plugins.schemas.seps_retrieval import SepsRetrievalRunSettings
    from lever_plugins.tasks.seps_retrieval import SepsRetrievalTask

    dense_path = os.path.join(root, "dense_captions.json")
    dataset = build_split("val", root=root, images="images", annotation_file="annotations/val.json",
                          dense=load_dense_captions(dense_path), dense_path=dense_path, image_size=64)
    torch.manual_seed(0)
    model = Blip2SepsModel.from_config({"arch": "lever_blip2_seps", "model_type": "tiny"}).eval()
    loader = DataLoader(dataset, batch_size=4, collate_fn=dataset.collater)
    results = {}
    for name, (keys, protocol) in MODES.items():
        dataset.protocol, dataset.fold_images = protocol, (3 if protocol == "coco" else None)
        settings = SepsRetrievalRunSettings(task="lever_seps_retrieval", output_dir="/tmp/unused", progress_bar=False,
                                            lr_sched="lever_multistep_lr", lr_milestones=[5], **keys)
        result = SepsRetrievalTask(settings).evaluation(model, loader)
        results[name] = {key: result[key] for key in ("sims", "i2t", "t2i", "itc") if key in result}
        results[name]["fold_sims"] = [list(pair) for pair in result.get("fold_sims", [])]
    return results


def _worker(rank: int, init_file: str, root: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = evaluate_all_modes(root)
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_score_their_shares_and_get_the_single_process_matrices(tmp_path):
    from lever_plugins.datasets.demo_retrieval import generate_demo_retrieval

    root = str(generate_demo_retrieval(tmp_path / "demo", num_train=1, num_val=6, num_test=1))
    mp.spawn(_worker, args=(str(tmp_path / "store"), root, str(tmp_path)), nprocs=WORLD, join=True)
    single = evaluate_all_modes(root)
    for rank in range(WORLD):
        sharded = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for name, expected in single.items():
            assert set(sharded[name]) == set(expected)
            for key, value in expected.items():
                if key == "fold_sims":
                    assert len(value) == (2 if name == "rerank_coco_folds" else 0) == len(sharded[name][key])
                    for got_pair, want_pair in zip(sharded[name][key], value):
                        for got, want in zip(got_pair, want_pair):
                            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
                else:
                    torch.testing.assert_close(sharded[name][key], value, atol=1e-6, rtol=0, msg=f"{name} {key}")
