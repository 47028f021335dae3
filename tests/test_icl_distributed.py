"""The ICD-selection stages over 2 gloo processes: each rank does its share, results equal one process's.

``embed``, ``beam_search`` and ``evaluate`` split their queries by question_id over the ranks and
gather; the feature tables, ``beams.json`` and the predictions / accuracies must be exactly those of
a single process on the same data.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lever_plugins.compat import import_lavis

import_lavis()
pytestmark = [pytest.mark.lavis, pytest.mark.slow]

WORLD = 2
NUM_TRAIN, NUM_EVAL = 60, 16


def _pipeline(root: str, out: str):
    from lever_plugins.icl.pipeline import IclPipeline
    from lever_plugins.runners import distributed as lever_dist
    from lever_plugins.schema import from_mapping
    from lever_plugins.schemas.icl import IclSelectionRunSettings, VqaIclDatasetSettings

    problems: list[str] = []
    run = from_mapping(IclSelectionRunSettings, {
        "task": "lever_icl_selection", "output_dir": out, "progress_bar": False,
        "vlm": {"kind": "causal_lm", "path": os.path.join(root, "tiny_lm"), "device": "cpu", "batch_size": 4,
                "max_new_tokens": 2, "score_eos": False},
        "embed": {"encoder": "blip2", "modality": "text", "device": "cpu", "batch_size": 8, "center": True, "blip2": {
            "max_txt_len": 24, "qformer": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                           "intermediate_size": 64, "max_position_embeddings": 64, "num_query_token": 4,
                                           "vocab_file": "package:configs/demo_vqa_vocab.txt"}}},
        "beam_search": {"num_queries": 10, "pool": "similarity", "pool_size": 6, "beam_size": 2, "shots": 2},
        "evaluation": {"num_queries": NUM_EVAL, "shots": [1, 2], "methods": ["random", "similarity"]},
    }, "run", problems)
    data = from_mapping(VqaIclDatasetSettings, {"generate_demo": True, "root": root}, "datasets.lever_vqa_icl", problems)
    assert not problems, problems
    return IclPipeline(run, data, out, rank=lever_dist.rank(), world_size=lever_dist.world_size(), barrier=lever_dist.barrier)


def run_stages(root: str, out: str) -> dict:
    """embed -> beam_search -> select (rank 0) -> evaluate on this process; returns what this rank computed."""
    from lever_plugins.icl import embed as features
    from lever_plugins.runners import distributed as lever_dist

    encoded: list[int] = []
    build = features.build_encoder

    def counting_encoder(settings):
        encoder = build(settings)
        encode = encoder.encode
        encoder.encode = lambda texts, images=None: (encoded.append(len(texts)), encode(texts, images))[1]
        return encoder

    features.build_encoder = counting_encoder
    try:
        pipeline = _pipeline(root, out)
        pipeline.embed()
        vlm = pipeline.vlm()
        scored, generated = [], []
        answer_nll, generate = vlm.answer_nll, vlm.generate
        vlm.answer_nll = lambda prompts, answers: (scored.extend(p.query.question_id for p in prompts), answer_nll(prompts, answers))[1]
        vlm.generate = lambda prompts: (generated.extend(p.query.question_id for p in prompts), generate(prompts))[1]
        pipeline.beam_search()
        if lever_dist.is_main_process():
            pipeline.select()
        lever_dist.barrier()
        pipeline.evaluate(shard=True)
    finally:
        features.build_encoder = build
    return {"encoded": sum(encoded), "scored_queries": sorted(set(scored)), "generated": len(generated)}


def _worker(rank: int, init_file: str, root: str, out: str, report_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        report = run_stages(root, out)
        with open(os.path.join(report_dir, f"rank{rank}.json"), "w") as handle:
            json.dump(report, handle)
    finally:
        dist.destroy_process_group()


def _outputs(out: str) -> dict:
    from lever_plugins.icl import embed as features

    tables = features.load_tables(os.path.join(out, "embed"))
    files = {}
    for sub in ("beam_search", "evaluate"):
        for name in sorted(os.listdir(os.path.join(out, sub))):
            if name.endswith((".json", ".jsonl", ".csv", ".md")) and not name.startswith("beams.part"):
                with open(os.path.join(out, sub, name)) as handle:
                    files[f"{sub}/{name}"] = handle.read()
    return {"tables": tables, "files": files}


def test_two_processes_share_embed_beam_search_and_evaluate_and_match_one_process(tmp_path):
    from lever_plugins.datasets.demo_vqa import generate_demo_vqa

    root = str(tmp_path / "demo")
    generate_demo_vqa(root, num_train=NUM_TRAIN, num_eval=NUM_EVAL, lm_steps=2)
    mp.spawn(_worker, args=(str(tmp_path / "store"), root, str(tmp_path / "two"), str(tmp_path)), nprocs=WORLD, join=True)
    single = run_stages(root, str(tmp_path / "one"))

    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    encoded_total = 2 * NUM_TRAIN + NUM_EVAL  # train queries, train candidates (question + answer), eval queries
    assert single["encoded"] == encoded_total
    # Batches of 8 dealt in turn: train 60 = batches 0,2,4,6 (32) / 1,3,5,7 (28), twice (queries, candidates); eval 8 / 8.
    assert [r["encoded"] for r in reports] == [32 + 32 + 8, 28 + 28 + 8]
    assert not set(reports[0]["scored_queries"]) & set(reports[1]["scored_queries"])  # beam search: disjoint queries
    assert sorted(reports[0]["scored_queries"] + reports[1]["scored_queries"]) == single["scored_queries"]
    settings = 1 + 2 * 2  # zero-shot + 2 methods x 2 shot counts
    assert single["generated"] == settings * NUM_EVAL
    assert [r["generated"] for r in reports] == [settings * NUM_EVAL // 2] * 2  # 4 batches of 4 per setting, 2 each

    two, one = _outputs(str(tmp_path / "two")), _outputs(str(tmp_path / "one"))
    for name, table in one["tables"].items():
        assert torch.equal(two["tables"][name]["question_ids"], table["question_ids"])
        assert torch.equal(two["tables"][name]["embeddings"], table["embeddings"]), name  # bit for bit
    for name in ("beam_search/beams.json", "beam_search/beams_all.json", "beam_search/pools.json", "evaluate/vqa_accuracy.csv"):
        assert two["files"][name] == one["files"][name], name
    predictions = [n for n in one["files"] if n.startswith("evaluate/predictions_")]
    assert len(predictions) == settings
    for name in predictions:
        assert two["files"][name] == one["files"][name], name  # each question once, in the single-process order
