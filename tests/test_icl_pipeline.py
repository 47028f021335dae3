"""ICD-selection plugin in LAVIS: model wrapper, dataset, task metrics, features, VQA table, demo, recipes."""
from __future__ import annotations

import csv
import json
import os
import random

import pytest
import torch
from click.testing import CliRunner

from _icl_helpers import tiny_causal_lm, write_vqa_files
from lever_plugins.compat import import_lavis

import_lavis()
pytestmark = pytest.mark.lavis

from lever_plugins.cli import main  # noqa: E402
from lever_plugins.icl.beam_dataset import PointerBeamDataset  # noqa: E402
from lever_plugins.icl import embed as features  # noqa: E402
from lever_plugins.icl import evaluate as icl_eval  # noqa: E402
from lever_plugins.icl.data import BeamEntry, IclDataError, load_vqa_split  # noqa: E402
from lever_plugins.icl.vlm import CausalLmVqa  # noqa: E402
from lever_plugins.metrics.vqa import vqa_accuracy  # noqa: E402
from lever_plugins.models.pointer_selector import PointerSelectorModel  # noqa: E402
from lever_plugins.recipes import load_recipe  # noqa: E402
from lever_plugins.schema import RecipeError  # noqa: E402
from lever_plugins.schemas.icl import EmbedSettings, IclSelectionRunSettings, VlmSettings  # noqa: E402
from lever_plugins.tasks.icl_selection import IclSelectionTask  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "recipes", "demo", "icl_pointer.yaml")


def _model(model_type: str, **keys) -> PointerSelectorModel:
    return PointerSelectorModel.from_config({"arch": "lever_pointer_selector", "model_type": model_type, **keys})


def test_presets_give_the_seed_sizes_and_forward_returns_loss_parts():
    assert _model("v1").parameter_count() == 131_456
    assert _model("v2").parameter_count() == 197_760
    assert _model("v2", hidden_dim=256).parameter_count() == 592_128
    v2 = _model("v2")
    assert v2.selector.settings.label_smoothing == 0.1 and v2.selector.settings.num_heads == 4
    small = dict(d_model=16, hidden_dim=8, K=6, shot_num=2)
    batch = {"query_emb": torch.randn(3, 16), "cand_emb": torch.randn(3, 6, 16),
             "labels": torch.tensor([[0, 1], [2, 3], [5, 4]]), "beam_scores": torch.rand(3, 2)}
    v1_out = _model("v1", **small)(batch)
    assert set(v1_out) == {"loss", "ce_loss", "logits_std"}
    v3 = _model("v3", **small, ranking_loss_weight=0.5)
    out = v3(batch)
    assert set(out) == {"loss", "ce_loss", "ranking_loss", "logits_std"}
    assert float(out["loss"].detach()) == pytest.approx(float(out["ce_loss"] + 0.5 * out["ranking_loss"]), rel=1e-5)
    out["loss"].backward()
    assert all(p.grad is not None for p in v3.parameters())
    with pytest.raises(RecipeError, match="model.ranking_loss_weight: read only by model_type v3"):
        _model("v1", ranking_loss_weight=0.5)


def _planted(num_objects=10, d=24, k=12, support_size=240, queries=300, seed=0):
    """Features: object one-hot + noise. Beam labels: the two same-object candidates of each pool."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    objects = [i % num_objects for i in range(support_size)]
    emb = torch.randn(support_size, d, generator=gen) * 0.4
    emb[torch.arange(support_size), torch.tensor(objects)] += 2.0
    ids = list(range(5000, 5000 + support_size))
    table = {"question_ids": torch.tensor(ids), "embeddings": emb}
    entries = []
    for _ in range(queries):
        q = rng.randrange(support_size)
        same = [i for i in range(support_size) if objects[i] == objects[q] and i != q]
        other = [i for i in range(support_size) if objects[i] != objects[q]]
        pool = rng.sample(same, 2) + rng.sample(other, k - 2)
        order = list(range(k))
        rng.shuffle(order)
        pool = [pool[i] for i in order]
        labels = (order.index(0), order.index(1))
        entries.append(BeamEntry(ids[q], tuple(ids[p] for p in pool), labels, (0.8, 0.1)))
    return table, entries


def test_dataset_shapes_and_collate():
    table, entries = _planted(queries=5)
    dataset = PointerBeamDataset(entries, table, table)
    item = dataset[0]
    assert item["query_emb"].shape == (24,) and item["cand_emb"].shape == (12, 24)
    assert item["labels"].shape == (2,) and item["beam_scores"].tolist() == pytest.approx([0.8, 0.1])
    assert torch.equal(item["cand_emb"][item["labels"][0]], table["embeddings"][entries[0].pool[entries[0].icds[0]] - 5000])
    batch = dataset.collater([dataset[i] for i in range(4)])
    assert batch["cand_emb"].shape == (4, 12, 24) and batch["question_id"].dtype == torch.long
    with pytest.raises(IclDataError, match=r"beams.json: question_id 5000 has pool candidates without features: \[77\]"):
        PointerBeamDataset([BeamEntry(5000, (77, 5001), (0,), (1.0,))], table, table, "beams.json")


def _task(**run_keys) -> IclSelectionTask:
    settings = IclSelectionRunSettings(task="lever_icl_selection", output_dir="/tmp/unused",
                                       embed=EmbedSettings(encoder="transformers", path="/x", modality="text"), **run_keys)
    return IclSelectionTask(settings)


def test_selector_learns_a_planted_rule_and_the_task_reports_step_metrics(tmp_path):
    from lavis.common.registry import registry

    table, entries = _planted()
    train = PointerBeamDataset(entries[:240], table, table)
    val = PointerBeamDataset(entries[240:], table, table)
    model = _model("v3", d_model=24, hidden_dim=32, K=12, shot_num=2, dropout=0.0)
    task = _task()
    registry.mapping["paths"]["result_dir"] = str(tmp_path)
    loader = torch.utils.data.DataLoader(val, batch_size=32, collate_fn=val.collater)
    before = task.after_evaluation(task.evaluation(model.eval(), loader), "val", 0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(8):
        for batch in torch.utils.data.DataLoader(train, batch_size=32, shuffle=True, collate_fn=train.collater):
            optimizer.zero_grad()
            model(batch)["loss"].backward()
            optimizer.step()
    after = task.after_evaluation(task.evaluation(model.eval(), loader), "val", 1)
    assert set(after) >= {"top1", "top3", "top5", "mrr", "ndcg@6", "ce_loss", "ranking_loss", "logits_std", "agg_metrics"}
    assert after["agg_metrics"] == after["mrr"]
    # Step 2 is easier: one same-object candidate is left once step 1's label is masked.
    assert after["step2_top1"] > after["step1_top1"] and after["step1_top1"] == pytest.approx(2 * after["top1"] - after["step2_top1"])
    chance_top1 = 100 * (1 / 12 + 1 / 11) / 2
    assert after["top1"] > 5 * chance_top1 and after["top3"] > 85 and after["mrr"] > 0.7
    assert after["mrr"] > before["mrr"] + 0.3
    assert json.loads((tmp_path / "val_epoch1_metrics.json").read_text())["top1"] == after["top1"]


def test_radi_student_distils_from_a_frozen_teacher_checkpoint(tmp_path):
    small = dict(d_model=16, hidden_dim=8, K=6, shot_num=2)
    teacher = _model("v1", **small)
    path = tmp_path / "teacher.pth"
    torch.save({"config": {"model": {"arch": "lever_pointer_selector", "model_type": "v1", **small}},
                "model": teacher.state_dict()}, path)
    student = _model("v3", **small, ranking_loss_type="radi_listwise", radi_hot_k=2, radi_cold_k=2,
                     radi_mc_samples=3, teacher_checkpoint=str(path))
    assert not any(k.startswith("_teacher") for k in student.state_dict())  # the teacher is not saved with the student
    batch = {"query_emb": torch.randn(4, 16), "cand_emb": torch.randn(4, 6, 16),
             "labels": torch.tensor([[0, 1], [2, 3], [5, 4], [1, 0]]), "beam_scores": torch.rand(4, 2)}
    assert student.teacher_logits(batch).shape == (3, 4, 2, 6)
    out = student(batch)
    out["loss"].backward()
    assert torch.isfinite(out["ranking_loss"]) and float(out["ranking_loss"]) > 0
    assert all(p.grad is None for p in student._teacher.parameters())
    assert all(p.grad is not None for p in student.selector.parameters())
    wrong = tmp_path / "wrong.pth"
    torch.save({"config": {"model": {"arch": "lever_pointer_selector", "model_type": "v1", **small, "K": 8}},
                "model": _model("v1", **{**small, "K": 8}).state_dict()}, wrong)
    with pytest.raises(RecipeError, match="the teacher has K = 8, this model 6"):
        _model("v3", **small, ranking_loss_type="radi_pairwise", teacher_checkpoint=str(wrong))


def test_model_must_match_pool_size_and_shot_counts():
    task = _task()
    task.pipeline = None
    model = _model("v1", K=16, shot_num=1)
    with pytest.raises(RecipeError) as info:
        task._check_model(model)
    problems = info.value.problems
    assert "model.K: 16 must equal run.beam_search.pool_size (32), the candidates per query" in problems
    assert "model.shot_num: 1 is fewer than the 2 shots run.evaluation.shots asks for" in problems


# ------------------------------------------------------------------------------------------ features


def _splits(tmp_path, with_images=False):
    colours = ["red", "blue", "green", "yellow"]
    rows = [(100 + i, i, f"in the park , what color is the old {['kite', 'lamp', 'boat'][i % 3]} ?", [colours[i % 4]] * 10)
            for i in range(12)]
    eval_rows = [(900 + i, 50 + i, f"in the beach , what color is the new {['kite', 'lamp'][i % 2]} ?", ["red"] * 10)
                 for i in range(4)]
    images = None
    if with_images:
        from PIL import Image

        images = tmp_path / "images"
        images.mkdir()
        for _, image_id, _, _ in rows + eval_rows:
            Image.new("RGB", (40, 30), (image_id * 5 % 255, 100, 200)).save(images / f"{image_id}.jpg")
        images = str(images)
    train = load_vqa_split("train", *write_vqa_files(tmp_path, "train", rows), images, "{image_id}.jpg")
    eval_split = load_vqa_split("eval", *write_vqa_files(tmp_path, "eval", eval_rows), images, "{image_id}.jpg")
    return train, eval_split


def _blip2_embed(modality="text", **keys) -> EmbedSettings:
    blip2 = {"max_txt_len": 16, "qformer": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                            "intermediate_size": 64, "max_position_embeddings": 32, "num_query_token": 4,
                                            "vocab_file": "package:configs/demo_vqa_vocab.txt"}}
    if modality != "text":
        blip2["vision"] = {"image_size": 28, "patch_size": 14, "width": 32, "depth": 1, "num_heads": 2,
                           "mlp_ratio": 2.0, "precision": "fp32"}
    problems: list[str] = []
    from lever_plugins.schema import from_mapping

    settings = from_mapping(EmbedSettings, {"encoder": "blip2", "modality": modality, "device": "cpu", "blip2": blip2, **keys},
                            "run.embed", problems)
    assert not problems, problems
    return settings


def test_blip2_text_features_are_cached_reused_and_guarded(tmp_path):
    train, eval_split = _splits(tmp_path)
    cache = str(tmp_path / "features")
    tables = features.embed_stage(_blip2_embed(), train, eval_split, cache, progress=False)
    assert tables["train_query"]["embeddings"].shape == (12, 32) and tables["eval_query"]["embeddings"].shape == (4, 32)
    assert tables["train_query"]["question_ids"].tolist() == train.question_ids
    torch.testing.assert_close(tables["train_candidate"]["embeddings"].norm(dim=-1), torch.ones(12))
    assert not torch.allclose(tables["train_candidate"]["embeddings"], tables["train_query"]["embeddings"])  # + answer
    stamp = os.path.getmtime(features.table_path(cache, "train_query"))
    again = features.embed_stage(_blip2_embed(), train, eval_split, cache, progress=False)
    assert os.path.getmtime(features.table_path(cache, "train_query")) == stamp
    assert torch.equal(again["eval_query"]["embeddings"], tables["eval_query"]["embeddings"])
    with pytest.raises(IclDataError, match=r"other settings \(encoder.pooling: 'mean' -> 'cls'\)"):
        features.embed_stage(_blip2_embed(pooling="cls"), train, eval_split, cache, progress=False)
    assert json.loads((tmp_path / "features" / "manifest.json").read_text())["dim"] == 32


def test_blip2_multimodal_features_read_the_images(tmp_path):
    train, eval_split = _splits(tmp_path, with_images=True)
    tables = features.embed_stage(_blip2_embed("multimodal", candidate_text="question"), train, eval_split,
                                  str(tmp_path / "mm"), progress=False)
    assert tables["train_query"]["embeddings"].shape == (12, 32)
    assert torch.equal(tables["train_candidate"]["embeddings"], tables["train_query"]["embeddings"])
    os.remove(eval_split.examples[0].image_path)
    with pytest.raises(IclDataError, match=r"image file is missing \(referenced by question_id 900\)"):
        features.embed_stage(_blip2_embed("image", candidate_text="question"), train, eval_split, str(tmp_path / "img"), progress=False)


def test_transformers_text_encoder_from_a_local_folder(tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path / "encoder"
    BertModel(BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)).save_pretrained(folder)
    BertTokenizerFast(vocab_file=os.path.join(REPO, "lever_plugins", "configs", "demo_vqa_vocab.txt")).save_pretrained(folder)
    train, eval_split = _splits(tmp_path)
    settings = EmbedSettings(encoder="transformers", path=str(folder), modality="text", pooling="cls", device="cpu")
    tables = features.embed_stage(settings, train, eval_split, str(tmp_path / "cache"), progress=False)
    assert tables["train_candidate"]["embeddings"].shape == (12, 16)


# ------------------------------------------------------------------------------------------ evaluation


class CountingVlm(CausalLmVqa):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.generated = 0

    def generate(self, prompts):
        self.generated += len(prompts)
        return super().generate(prompts)


def test_vqa_table_on_a_tiny_model_is_the_official_metric_and_resumes(tmp_path):
    train, eval_split = _splits(tmp_path)
    model, tokenizer = tiny_causal_lm("llama")
    vlm = CountingVlm(model, tokenizer, VlmSettings(kind="causal_lm", batch_size=3, max_new_tokens=2, score_eos=False))
    queries = eval_split.question_ids
    support = train.question_ids
    selections = {
        "random": icl_eval.select_random(queries, support, 2, seed=0),
        "pointer": {q: support[:2] for q in queries},
    }
    out = str(tmp_path / "evaluate")
    rows = icl_eval.evaluate_vqa(vlm, eval_split, train, queries, selections, [1, 2], out, progress=False)
    assert [(r["method"], r["shots"]) for r in rows] == [("zero_shot", 0), ("random", 1), ("random", 2), ("pointer", 1), ("pointer", 2)]
    assert vlm.generated == 5 * len(queries)
    for row in rows:
        records = [json.loads(line) for line in open(icl_eval.predictions_path(out, row["method"], row["shots"]))]
        assert [len(r["demos"]) for r in records] == [row["shots"]] * len(queries)
        recomputed = [vqa_accuracy(r["prediction"], list(eval_split[r["question_id"]].answers)) for r in records]
        assert row["accuracy"] == pytest.approx(100 * sum(recomputed) / len(recomputed))
    assert json.loads(open(icl_eval.predictions_path(out, "pointer", 2)).readline())["demos"] == support[:2]
    again = icl_eval.evaluate_vqa(vlm, eval_split, train, queries, selections, [1, 2], out, progress=False)
    assert vlm.generated == 5 * len(queries) and again == rows  # finished predictions are reused
    paths = icl_eval.write_report(rows, out)
    markdown = open(paths["markdown"]).read().splitlines()
    assert markdown[0] == "| method | 1-shot | 2-shot |" and markdown[2].startswith("| zero-shot |")
    assert list(csv.reader(open(paths["csv"])))[1][:2] == ["zero_shot", "0"]
    assert open(paths["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_rices_picks_the_most_similar_supporting_examples():
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7], [-1.0, 0.0]])
    picks = icl_eval.select_similarity([900], torch.tensor([[0.9, 0.1]]), [1, 2, 3, 4], emb, shots=3)
    assert picks == {900: [1, 3, 2]}


# ------------------------------------------------------------------------------------------ demo + recipes


def test_demo_generator_writes_vqav2_files_with_the_planted_rule(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, BertTokenizer

    from lever_plugins.datasets.demo_vqa import VOCAB_FILE, generate_demo_vqa, object_colours
    from lever_plugins.schema import expand_path

    paths = generate_demo_vqa(tmp_path / "demo", num_train=60, num_eval=12, lm_steps=2)
    train = load_vqa_split("train", paths["train_questions"], paths["train_annotations"])
    eval_split = load_vqa_split("eval", paths["eval_questions"], paths["eval_annotations"])
    assert len(train) == 60 and len(eval_split) == 12 and not set(train.question_ids) & set(eval_split.question_ids)
    colours = object_colours(0)
    for example in train.examples + eval_split.examples:
        assert example.answer == colours[example.question.split()[-2]]
        assert example.answers.count(example.answer) >= 8 and len(example.answers) == 10
    bert = BertTokenizer(vocab_file=expand_path(VOCAB_FILE))
    lm_tokenizer = AutoTokenizer.from_pretrained(paths["lm"], local_files_only=True)
    for example in train.examples[:20]:
        assert "[UNK]" not in bert.tokenize(f"{example.question} {example.answer}")
        assert lm_tokenizer.unk_token_id not in lm_tokenizer(f"Question: {example.question} Short answer: {example.answer}")["input_ids"]
    assert AutoModelForCausalLM.from_pretrained(paths["lm"], local_files_only=True).config.num_hidden_layers == 2
    stamp = os.path.getmtime(paths["train_questions"])
    generate_demo_vqa(tmp_path / "demo", num_train=60, num_eval=12, lm_steps=2)
    assert os.path.getmtime(paths["train_questions"]) == stamp  # idempotent


@pytest.mark.parametrize("name", ["vqav2_pointer_v1.yaml", "vqav2_pointer_v2.yaml", "vqav2_pointer_v3.yaml"])
def test_real_recipes_validate(name):
    resolved = load_recipe(os.path.join(REPO, "recipes", name))
    model, run = resolved.data["model"], resolved.data["run"]
    assert model["model_type"] == name[-7:-5] and model["d_model"] == 768 and model["K"] == run["beam_search"]["pool_size"]
    assert run["beam_search"]["num_queries"] == 5000 and run["beam_search"]["beam_size"] == 5
    assert run["vlm"]["kind"] == "qwen2_5_vl" and run["stages"][0] == "embed"


def test_demo_recipe_dry_run_plan():
    result = CliRunner().invoke(main, ["run", DEMO, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "#   stages: embed -> beam_search -> train -> select -> evaluate" in result.output
    assert "#   selector: PointerSelectorV3(d_model=64, hidden_dim=64, K=32, shot_num=2): 12,480 parameters" in result.output
    assert "#   train: the v3 selector on every kept beam of each query" in result.output
    bad = CliRunner().invoke(main, ["validate", DEMO, "--set", "run.stages=[train,embed]", "--set", "model.num_heads=2"])
    assert bad.exit_code == 2
    assert "error: " + DEMO + ": model.num_heads: read only by model_type v2 (this is v3); leave it out (or at its default, 4), or set model_type: v2" in bad.output


def test_centring_uses_the_supporting_set_mean_for_queries_and_candidates():
    raw = {"train_query": torch.tensor([[1.0, 0.0], [3.0, 0.0]]), "eval_query": torch.tensor([[2.0, 1.0]]),
           "train_candidate": torch.tensor([[0.0, 2.0], [0.0, 4.0]])}
    out = features.finish_tables(raw, center=True, normalize=False)
    assert out["train_query"].tolist() == [[-1.0, 0.0], [1.0, 0.0]]
    assert out["eval_query"].tolist() == [[0.0, 1.0]]  # the training queries' mean, not its own
    assert out["train_candidate"].tolist() == [[0.0, -1.0], [0.0, 1.0]]
    assert features.finish_tables(raw, center=False, normalize=True)["eval_query"].norm().item() == pytest.approx(1.0)


def test_block_mismatches_stop_the_run_before_any_stage(tmp_path):
    result = CliRunner().invoke(main, [
        "run", DEMO, "--set", f"run.output_dir={tmp_path / 'out'}", "--set", f"datasets.lever_vqa_icl.root={tmp_path / 'demo'}",
        "--set", "run.beam_search.pool_size=16", "--set", "model.d_model=32",
    ])
    assert result.exit_code == 2, result.output
    assert "model.K: 32 must equal run.beam_search.pool_size (16)" in result.output
    assert "model.d_model: 32 must equal the feature width, run.embed.blip2.qformer.hidden_size (64)" in result.output
    assert not (tmp_path / "demo").exists() and not (tmp_path / "out" / "embed").exists()


def test_select_and_evaluate_run_once_in_one_process_and_on_every_rank_under_the_launcher(monkeypatch):
    from lever_plugins.runners import distributed as lever_dist

    calls = []

    class Pipeline:
        def select(self, selector, weights):
            calls.append("select")

        def evaluate(self, shard=False):
            calls.append(f"evaluate shard={shard}")
            return {"markdown": "m", "png": "p"}

    from lever_plugins.schemas.icl import IclEvaluateSettings

    task = _task(evaluation=IclEvaluateSettings(methods=["random"]))
    task.pipeline = Pipeline()
    task.after_training_all_ranks(None)  # one process: nothing to share
    task.after_training(None)  # the main process does both, alone
    assert calls == ["select", "evaluate shard=False"]
    calls.clear()
    monkeypatch.setattr(lever_dist, "world_size", lambda: 2)
    monkeypatch.setattr(lever_dist, "barrier", lambda: calls.append("barrier"))
    task.after_training(None)  # main process only: left to every rank
    assert calls == []
    task.after_training_all_ranks(None)
    assert calls == ["select", "barrier", "evaluate shard=True"]
    calls.clear()
    monkeypatch.setattr(lever_dist, "is_main_process", lambda: False)
    task.after_training_all_ranks(None)  # another rank: waits for the selections, evaluates its share
    assert calls == ["barrier", "evaluate shard=True"]
