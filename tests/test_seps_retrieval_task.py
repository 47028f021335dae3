"""The ``lever_seps_retrieval`` task: re-ranking, metrics, hard-negative schedule, evaluation, figures."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from lever_plugins.compat import import_lavis

import_lavis()
pytestmark = pytest.mark.lavis

from lever_plugins.metrics.retrieval import coco_1k_5fold_metrics, retrieval_metrics  # noqa: E402
from lever_plugins.schema import RecipeError  # noqa: E402
from lever_plugins.schemas.seps_retrieval import SepsRetrievalRunSettings  # noqa: E402
from lever_plugins.tasks.seps_retrieval import (  # noqa: E402
    SepsRetrievalTask,
    directional_metrics,
    pad_cat,
    plot_loss_curves,
    rerank_similarities,
    retrieval_report,
)


def settings(**overrides) -> SepsRetrievalRunSettings:
    base = dict(task="lever_seps_retrieval", output_dir="/tmp/unused", progress_bar=False, lr_sched="lever_multistep_lr",
                lr_milestones=[5])
    base.update(overrides)
    return SepsRetrievalRunSettings(**base)


def test_rerank_scores_exactly_the_candidates_one_call_per_image():
    generator = torch.Generator().manual_seed(0)
    itc = torch.randn(6, 12, generator=generator)
    head = torch.randn(6, 12, generator=generator)
    calls = []

    def score(image, captions):
        calls.append((image, captions.tolist()))
        return head[image, captions]

    i2t, t2i = rerank_similarities(itc, 3, score)
    assert [c[0] for c in calls] == list(range(6))
    top_captions = itc.topk(3, dim=1).indices
    top_images = itc.topk(3, dim=0).indices
    for image, captions in calls:
        expected = set(top_captions[image].tolist()) | {t for t in range(12) if image in top_images[:, t].tolist()}
        assert set(captions) == expected
    for image in range(6):
        candidates = top_captions[image]
        torch.testing.assert_close(i2t[image, candidates], head[image, candidates])
        others = torch.ones(12, dtype=torch.bool)
        others[candidates] = False
        assert (i2t[image, others] < i2t[image, candidates].min()).all()
    for caption in range(12):
        candidates = top_images[:, caption]
        torch.testing.assert_close(t2i[candidates, caption], head[candidates, caption])


def test_rerank_with_every_candidate_is_the_all_pairs_matrix():
    generator = torch.Generator().manual_seed(1)
    itc, head = torch.randn(4, 8, generator=generator), torch.randn(4, 8, generator=generator)
    i2t, t2i = rerank_similarities(itc, 100, lambda v, c: head[v, c])
    torch.testing.assert_close(i2t, head)
    torch.testing.assert_close(t2i, head)


def test_directional_metrics_take_each_direction_from_its_own_matrix():
    txt2img = torch.tensor([0, 0, 1, 1])
    perfect = torch.tensor([[1.0, 0.9, 0.0, 0.1], [0.0, 0.1, 1.0, 0.9]])
    wrong = -perfect
    metrics = directional_metrics(perfect, wrong, txt2img)
    assert metrics["i2t_r1"] == 100.0 and metrics["t2i_r1"] == 0.0
    assert metrics["rsum"] == pytest.approx(sum(v for k, v in metrics.items() if k != "rsum"))
    assert metrics == {**directional_metrics(perfect, wrong, txt2img)}
    same = directional_metrics(perfect, perfect, txt2img)
    assert same == retrieval_metrics(perfect, txt2img)


def test_report_adds_itc_baseline_and_coco_1k_folds():
    generator = torch.Generator().manual_seed(2)
    txt2img = torch.arange(8).repeat_interleave(2)
    sims, itc = torch.randn(8, 16, generator=generator), torch.randn(8, 16, generator=generator)
    folds = [(slice(0, 4), torch.arange(0, 8)), (slice(4, 8), torch.arange(8, 16))]
    report = retrieval_report({"mode": "all_pairs", "sims": sims, "itc": itc, "txt2img": txt2img, "folds": folds})
    assert report["rsum"] == retrieval_metrics(sims, txt2img)["rsum"]
    assert report["itc_rsum"] == retrieval_metrics(itc, txt2img)["rsum"]
    assert report["1k_rsum"] == pytest.approx(coco_1k_5fold_metrics(sims, txt2img, n_folds=2)["rsum"])
    assert report["1k_itc_i2t_r1"] == pytest.approx(coco_1k_5fold_metrics(itc, txt2img, n_folds=2)["i2t_r1"])
    flickr = retrieval_report({"mode": "all_pairs", "sims": sims, "itc": itc, "txt2img": txt2img, "folds": []})
    assert not any(k.startswith("1k_") for k in flickr)


def test_pad_cat_pads_to_the_longest():
    out = pad_cat([torch.ones(2, 3, 4), torch.ones(1, 5, 4)])
    assert out.shape == (3, 5, 4) and out[:2, 3:].abs().sum() == 0 and out[2].sum() == 20


def test_max_violation_switches_on_after_warmup():
    from lever_plugins.modules.seps import SEPSLoss

    model = SimpleNamespace(seps_loss=SEPSLoss(max_violation=False))
    task = SepsRetrievalTask(settings(warmup_epochs=2))
    for epoch, expected in ((0, False), (1, False), (2, True), (3, True)):
        task.on_train_epoch_start(model, epoch)
        assert model.seps_loss.max_violation is expected
    untouched = SimpleNamespace(seps_loss=SEPSLoss(max_violation=True))
    SepsRetrievalTask(settings(warmup_epochs=None)).on_train_epoch_start(untouched, 0)
    assert untouched.seps_loss.max_violation is True


def test_backbone_lr_scale_needs_a_schedule_that_honours_it():
    import lever_plugins.registry  # noqa: F401  (LAVIS's build_model looks the arch up in its registry)
    from omegaconf import OmegaConf

    cfg = SimpleNamespace(model_cfg=OmegaConf.create({"arch": "lever_blip2_seps", "model_type": "tiny"}))
    with pytest.raises(RecipeError, match="backbone_lr_scale=0.1 needs run.lr_sched lever_multistep_lr"):
        SepsRetrievalTask(settings(lr_sched="linear_warmup_cosine_lr", lr_milestones=[])).build_model(cfg)
    model = SepsRetrievalTask(settings()).build_model(cfg)
    assert model.settings.backbone_lr_scale == 0.1


def test_loss_curves_png_from_metrics_jsonl(tmp_path):
    pytest.importorskip("matplotlib")
    records = [
        {"epoch": 0, "split": "train", "loss": 3.0, "loss_align": 2.5, "loss_ratio": 0.05, "keep_ratio": 0.7},
        {"epoch": 0, "split": "val", "rsum": 100.0, "itc_rsum": 90.0},
        {"epoch": 1, "split": "train", "loss": 2.0, "loss_align": 1.8, "loss_ratio": 0.01, "keep_ratio": 0.55},
        {"epoch": 1, "split": "val", "rsum": 150.0, "itc_rsum": 120.0},
        {"epoch": "best", "split": "test", "rsum": 140.0},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    out = plot_loss_curves(path, tmp_path / "fig" / "loss_curves.png", target_ratio=0.5)
    from PIL import Image

    with Image.open(out) as image:
        assert image.format == "PNG" and image.size[0] > image.size[1] > 200
    path.write_text(json.dumps(records[1]) + "\n")
    assert plot_loss_curves(path, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


@pytest.fixture(scope="module")
def tiny_eval(tmp_path_factory):
    """A tiny model and a generated val split of 6 images (30 captions)."""
    from torch.utils.data import DataLoader

    from lever_plugins.datasets.demo_retrieval import generate_demo_retrieval
    from lever_plugins.datasets.retrieval import build_split, load_dense_captions
    from lever_plugins.models.blip2_seps import Blip2SepsModel

    root = generate_demo_retrieval(tmp_path_factory.mktemp("demo"), num_train=1, num_val=6, num_test=1)
    dense_path = root / "dense_captions.json"
    dataset = build_split("val", root=root, images="images", annotation_file="annotations/val.json",
                          dense=load_dense_captions(dense_path), dense_path=dense_path, image_size=64)
    torch.manual_seed(0)
    model = Blip2SepsModel.from_config({"arch": "lever_blip2_seps", "model_type": "tiny"}).eval()
    return model, dataset, DataLoader(dataset, batch_size=4, collate_fn=dataset.collater)


def test_evaluation_all_pairs_equals_full_rerank_and_matches_the_head(tiny_eval):
    model, dataset, loader = tiny_eval
    dataset.protocol, dataset.fold_images = "flickr", None
    all_pairs = SepsRetrievalTask(settings(eval_mode="all_pairs", eval_image_block=4)).evaluation(model, loader)
    rerank = SepsRetrievalTask(settings(eval_mode="rerank", k_test=1000)).evaluation(model, loader)
    assert all_pairs["sims"].shape == (6, 30)
    torch.testing.assert_close(rerank["i2t"], all_pairs["sims"])
    torch.testing.assert_close(rerank["t2i"], all_pairs["sims"])
    with torch.no_grad():
        images = model.encode_images(torch.stack([dataset[i]["image"] for i in range(6)]))
        dense = model.encode_dense_texts(dataset.dense_text)
        captions = model.encode_texts(dataset.text)
        direct = model.head_similarity(images.embeddings, dense.embeddings, dense.lengths, captions.embeddings, captions.lengths)
        itc = model.itc_similarity(images.itc, captions.itc)
    torch.testing.assert_close(all_pairs["sims"], direct, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(all_pairs["itc"], itc, rtol=1e-4, atol=1e-5)
    metrics = SepsRetrievalTask(settings()).after_evaluation(all_pairs, "val", 0)
    assert metrics["agg_metrics"] == metrics["rsum"] == retrieval_metrics(all_pairs["sims"], dataset.txt2img)["rsum"]


def test_evaluation_coco_protocol_reranks_within_each_fold(tiny_eval):
    model, dataset, loader = tiny_eval
    dataset.protocol, dataset.fold_images = "coco", 3
    try:
        result = SepsRetrievalTask(settings(eval_mode="rerank", k_test=2)).evaluation(model, loader)
        full = SepsRetrievalTask(settings(eval_mode="all_pairs")).evaluation(model, loader)
    finally:
        dataset.protocol, dataset.fold_images = "flickr", None
    assert len(result["fold_sims"]) == 2
    fold_i2t, fold_t2i = result["fold_sims"][1]
    assert fold_i2t.shape == (3, 15)
    itc_fold = result["itc"][3:6, 15:30]
    for image in range(3):  # the fold's own ITC top-2 captions carry the head's scores
        top = itc_fold[image].topk(2).indices
        torch.testing.assert_close(fold_i2t[image, top], full["sims"][3 + image, 15 + top])
    report = retrieval_report(result)
    assert {"1k_rsum", "1k_itc_rsum", "rsum", "itc_rsum"} <= set(report)
