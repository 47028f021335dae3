"""ICD selection on captions: the Karpathy reader, caption prompts and scoring, CIDEr, the caption report and recipes."""
from __future__ import annotations

import csv
import json
import math
import os
from collections import Counter

import pytest
import torch

from lever_plugins.icl import beam_search as bs
from lever_plugins.icl import evaluate as icl_eval
from lever_plugins.icl.caption_data import load_karpathy_split
from lever_plugins.icl.data import IclDataError, VqaSplit
from lever_plugins.icl.kinds import CAPTION
from lever_plugins.icl.vlm import CausalLmVqa, IclPrompt, score_from_nll
from lever_plugins.metrics.caption import caption_tokens, cider
from lever_plugins.recipes import load_recipe
from lever_plugins.schema import RecipeError
from lever_plugins.schemas.icl import CocoCaptionIclDatasetSettings, VlmSettings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "recipes", "demo", "icl_caption.yaml")


def _image(cocoid, split, sentences, filepath="val2014"):
    return {"filepath": filepath, "filename": f"COCO_{filepath}_{cocoid:012d}.jpg", "cocoid": cocoid, "split": split,
            "sentences": [{"raw": s, "tokens": s.lower().split()} for s in sentences]}


def _write(tmp_path, payload, name="dataset_coco.json"):
    path = tmp_path / name
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return str(path)


GOOD = {"images": [
    _image(30, "test", ["A dog on a  sofa.", "A sleeping dog."]),
    _image(20, "restval", ["Two cats.", "Cats playing.", "A pair of cats."]),
    _image(10, "train", ["A red bus.", "A bus on a street."], filepath="train2014"),
    _image(40, "val", ["A boat."]),
], "dataset": "coco"}


# ----------------------------------------------------------------------------------------- reader


def test_karpathy_reader_keeps_the_asked_splits_keyed_by_cocoid(tmp_path):
    path = _write(tmp_path, GOOD)
    train = load_karpathy_split("train", path, "/coco", ["train", "restval"])
    assert train.question_ids == [10, 20]  # sorted by cocoid, val and test left out
    bus = train[10]
    assert bus.answer == "A red bus." and bus.answers == ("A red bus.", "A bus on a street.") and bus.question == ""
    assert bus.image_path == os.path.join("/coco", "train2014", "COCO_train2014_000000000010.jpg")
    test = load_karpathy_split("eval", path, "/coco", ["test"])
    assert test.question_ids == [30] and test[30].answer == "A dog on a sofa."  # whitespace normalised


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("images"), "expected {'images': [...]}"),
    (lambda d: d["images"][1].pop("filename"), "cocoid 20 has no 'filename'"),
    (lambda d: d["images"][1].pop("cocoid"), "image #1 has no 'cocoid'"),
    (lambda d: d["images"][1].update(cocoid="x7"), "image #1 has a 'cocoid' that is not an integer: 'x7'"),
    (lambda d: d["images"][1].update(split="training"), "cocoid 20 has split 'training'; expected one of"),
    (lambda d: d["images"][1].update(sentences=[]), "cocoid 20 has no 'sentences'"),
    (lambda d: d["images"][1]["sentences"][1].pop("raw"), "cocoid 20 sentence #1 has no 'raw' caption text"),
    (lambda d: d["images"].append(_image(20, "test", ["again"])), "cocoid 20 appears twice"),
    (lambda d: d["images"].__setitem__(1, "oops"), "image #1 is not an object"),
])
def test_karpathy_reader_errors_name_the_file_the_image_and_the_key(tmp_path, mutate, message):
    data = json.loads(json.dumps(GOOD))
    mutate(data)
    path = _write(tmp_path, data)
    with pytest.raises(IclDataError) as info:
        load_karpathy_split("train", path, "/coco", ["train", "restval"])
    text = str(info.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text


def test_karpathy_reader_missing_or_broken_files_and_empty_splits(tmp_path):
    with pytest.raises(IclDataError, match="dataset_coco.json: Karpathy caption file not found"):
        load_karpathy_split("train", str(tmp_path / "dataset_coco.json"), "/coco", ["train"])
    broken = _write(tmp_path, '{"images": [', "broken.json")
    with pytest.raises(IclDataError, match=r"broken.json: not valid JSON \(line 1"):
        load_karpathy_split("train", broken, "/coco", ["train"])
    only_test = _write(tmp_path, {"images": [GOOD["images"][0]]}, "test_only.json")
    with pytest.raises(IclDataError, match=r"test_only.json: no images with split in \['train', 'restval'\]"):
        load_karpathy_split("train", only_test, "/coco", ["train", "restval"])
    with pytest.raises(IclDataError, match="splits must be some of"):
        load_karpathy_split("train", only_test, "/coco", ["training"])


def test_caption_dataset_settings_need_files_or_the_demo_and_disjoint_splits():
    with pytest.raises(ValueError) as info:
        CocoCaptionIclDatasetSettings()
    assert "karpathy_json: required (a local Karpathy-format dataset_coco.json)" in str(info.value)
    assert "images: required (a local image folder)" in str(info.value)
    with pytest.raises(ValueError, match=r"eval_splits: \['test'\] also in train_splits"):
        CocoCaptionIclDatasetSettings(karpathy_json="a.json", images="/coco", train_splits=["train", "test"])
    with pytest.raises(ValueError, match="karpathy_json: the demo generates its own files"):
        CocoCaptionIclDatasetSettings(generate_demo=True, root="/tmp/x", karpathy_json="a.json")


def test_demo_generator_writes_the_karpathy_format_with_png_images(tmp_path):
    from lever_plugins.datasets.demo_caption import TEMPLATES, generate_demo_caption
    from lever_plugins.datasets.files import load_image

    paths = generate_demo_caption(tmp_path / "demo", lm_steps=1)
    support = load_karpathy_split("train", paths["karpathy_json"], paths["images"], ["train", "restval"])
    queries = load_karpathy_split("eval", paths["karpathy_json"], paths["images"], ["test"])
    assert (len(support), len(queries)) == (800, 200)
    example = queries.examples[0]
    assert len(example.answers) == len(TEMPLATES) and example.answer == example.answers[0]
    assert example.image_path.endswith(".png") and load_image(example.image_path, "test", IclDataError).size == (32, 32)
    # Every image's five captions name the same colour and shape, each template once.
    words = [Counter(caption_tokens(c).split()) for c in example.answers]
    assert len({frozenset(w for w in ws if ws[w] and all(w in o for o in words)) for ws in words}) == 1
    assert os.path.isfile(os.path.join(paths["lm"], "config.json"))
    assert generate_demo_caption(tmp_path / "demo", lm_steps=1) == paths  # a second call does nothing


# ----------------------------------------------------------------------------------------- prompts + scores


def _caption_lm(score_eos=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lever_plugins.datasets.demo_caption import caption_words
    from lever_plugins.datasets.demo_vqa import build_demo_tokenizer

    tokenizer = build_demo_tokenizer(words=caption_words())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    settings = VlmSettings(kind="causal_lm", batch_size=3, score_eos=score_eos, icd_template="Caption: {caption}",
                           query_template="Caption:")
    return CausalLmVqa(LlamaForCausalLM(config).eval(), tokenizer, settings, kind=CAPTION)


def _caption_example(cocoid, text):
    from lever_plugins.icl.data import VqaExample

    return VqaExample(cocoid, cocoid, "", text, (text, text.upper()))


QUERY = _caption_example(1, "A red circle.")
DEMOS = [_caption_example(2, "The circle is red."), _caption_example(3, "A picture of a blue square.")]


def test_caption_prompt_shows_captions_first_choice_next_to_the_query():
    vlm = _caption_lm()
    assert vlm.prompt_text(IclPrompt(QUERY, tuple(DEMOS))) == (
        "Caption: A picture of a blue square.\nCaption: The circle is red.\nCaption:"
    )


@pytest.mark.parametrize("score_eos", [False, True])
def test_beam_search_scores_exactly_the_caption_tokens(score_eos):
    vlm = _caption_lm(score_eos)
    tokenizer = vlm.tokenizer
    prompts = [IclPrompt(QUERY), IclPrompt(QUERY, (DEMOS[0],)), IclPrompt(QUERY, tuple(DEMOS))]
    expected = []
    for prompt in prompts:
        prompt_ids = tokenizer(vlm.prompt_text(prompt))["input_ids"]
        caption_ids = tokenizer(" A red circle.", add_special_tokens=False)["input_ids"]
        assert [tokenizer.convert_ids_to_tokens(i) for i in caption_ids] == ["A", "red", "circle", "."]
        targets = caption_ids + ([tokenizer.eos_token_id] if score_eos else [])
        with torch.no_grad():
            log_probs = torch.log_softmax(vlm.model(input_ids=torch.tensor([prompt_ids + targets])).logits[0], -1)
        expected.append(-sum(float(log_probs[len(prompt_ids) + i - 1, t]) for i, t in enumerate(targets)) / len(targets))
    nll = vlm.answer_nll(prompts, [QUERY.answer] * 3)  # left-padded, one batch of 3
    torch.testing.assert_close(nll, torch.tensor(expected), atol=2e-5, rtol=1e-4)
    # The beam search's zero-shot score and first-step gains come from these same numbers.
    record = bs.beam_search_query(vlm, QUERY, DEMOS, beam_size=2, shots=1, score="prob_gain")
    base = math.exp(-expected[0])
    assert record["base_score"] == pytest.approx(base, rel=1e-5)
    step1 = score_from_nll(vlm.answer_nll([IclPrompt(QUERY, (d,)) for d in DEMOS], [QUERY.answer] * 2), "prob_gain")
    assert sorted(record["beams"][i]["scores"][0] for i in range(2)) == pytest.approx(sorted((step1 - base).tolist()), abs=1e-7)


# ----------------------------------------------------------------------------------------- CIDEr


def _reference_cider(predictions, references, sigma=6.0):
    """CIDEr-D from its definition (Vedantam et al. 2015, with the -D clipping and length penalty), independently."""
    def grams(text, n):
        words = text.split()
        return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))

    keys = list(predictions)
    df = [Counter() for _ in range(4)]
    for key in keys:
        for n in range(4):
            df[n].update({g for ref in references[key] for g in grams(caption_tokens(ref), n + 1)})
    scores = {}
    for key in keys:
        hyp = caption_tokens(predictions[key])
        total = 0.0
        for ref in map(caption_tokens, references[key]):
            penalty = math.exp(-((len(hyp.split()) - len(ref.split())) ** 2) / (2 * sigma ** 2))
            for n in range(4):
                g_h = {g: c * math.log(len(keys) / max(1.0, df[n][g])) for g, c in grams(hyp, n + 1).items()}
                g_r = {g: c * math.log(len(keys) / max(1.0, df[n][g])) for g, c in grams(ref, n + 1).items()}
                norm = math.sqrt(sum(v * v for v in g_h.values())) * math.sqrt(sum(v * v for v in g_r.values()))
                dot = sum(min(v, g_r.get(g, 0.0)) * g_r.get(g, 0.0) for g, v in g_h.items())
                total += penalty * (dot / norm if norm else 0.0) / 4
        scores[key] = 10.0 * total / len(references[key])
    return sum(scores.values()) / len(scores), scores


def test_cider_on_a_corpus_computed_by_hand():
    # Two images, every n-gram in one image's references only: idf = log 2 for all of them.
    # "a b" = its reference: unigram and bigram cosines 1, no 3-/4-grams: 10 * (1 + 1 + 0 + 0) / 4 = 5.
    # "c" against "c d": unigram cosine log2^2 / (log2 * sqrt(2) log2) = 1/sqrt(2), length penalty exp(-1/72).
    corpus, per_image = cider({"A": "A b.", "B": "C"}, {"A": ["a b"], "B": ["c d"]})
    partial = 10 * (math.exp(-1 / 72) / math.sqrt(2)) / 4
    assert per_image["A"] == pytest.approx(5.0) and per_image["B"] == pytest.approx(partial)
    assert corpus == pytest.approx((5.0 + partial) / 2)


def test_cider_equals_its_definition_and_rewards_consensus_and_rare_words():
    references = {
        1: ["a man riding a red bike", "a man on a bike", "a person riding a bicycle down the street"],
        2: ["a cat sitting on a sofa", "a grey cat on a couch", "a cat resting on the sofa"],
        3: ["two dogs playing in the park", "dogs running on grass", "two dogs in a park"],
        4: ["a man holding an umbrella", "a person with an umbrella in the rain", "a man under a black umbrella"],
    }
    predictions = {1: "a man riding a bike", 2: "a cat on a sofa!", 3: "Two dogs in the park.", 4: "a man in the rain"}
    corpus, per_image = cider(predictions, references)
    expected_corpus, expected = _reference_cider(predictions, references)
    assert corpus == pytest.approx(expected_corpus, rel=1e-9)
    assert per_image == pytest.approx(expected, rel=1e-9)
    # A caption matching every reference scores more than one overlapping partly (same corpus, same idf).
    same = {1: "a man on a bike"}
    all_refs = {**references, 1: ["a man on a bike"] * 3}
    exact, _ = cider({**predictions, **same}, all_refs)
    part, _ = cider({**predictions, 1: "a man on a street"}, all_refs)
    assert exact > part > 0
    # idf: a word in every image's references weighs nothing; a word in one image's references does.
    common = {k: [r + " photo" for r in refs] for k, refs in references.items()}
    assert cider({**predictions, 1: "photo"}, common)[1][1] == 0.0
    assert cider({**predictions, 1: "bike"}, common)[1][1] > 0.0


def test_caption_tokens_and_cider_input_errors():
    assert caption_tokens("  A man's Dog, running!\n") == "a man s dog running"
    with pytest.raises(ValueError, match="no references for"):
        cider({1: "a"}, {2: ["a"]})
    with pytest.raises(ValueError, match="images without reference captions"):
        cider({1: "a"}, {1: []})


# ----------------------------------------------------------------------------------------- evaluate + recipes


class _FixedCaptioner:
    class settings:  # noqa: N801 - attribute bag like VlmSettings
        batch_size = 2

    def __init__(self, answer):
        self.answer = answer

    def generate(self, prompts):
        return [self.answer(p) for p in prompts]


def test_caption_evaluation_reports_corpus_cider_per_method(tmp_path):
    split = VqaSplit("eval", [_caption_example(q, text) for q, text in ((11, "A red circle."), (12, "The square is blue."),
                                                                          (13, "A green cross."))])
    support = VqaSplit("train", [_caption_example(q, f"A {c} {s}.") for q, c, s in ((1, "red", "circle"), (2, "blue", "square"))])
    # With a demonstration the captioner copies its caption; zero-shot it says nothing useful.
    vlm = _FixedCaptioner(lambda p: p.demos[0].answer if p.demos else "something")
    selections = {"random": {11: [2], 12: [1], 13: [1]}, "similarity": {11: [1], 12: [2], 13: [2]}}
    rows = icl_eval.evaluate_vqa(vlm, split, support, [11, 12, 13], selections, [1], str(tmp_path), progress=False, kind=CAPTION)
    by_method = {r["method"]: r["cider"] for r in rows}
    for method in selections:
        predictions = {q: support[selections[method][q][0]].answer for q in (11, 12, 13)}
        assert by_method[method] == pytest.approx(100 * cider(predictions, {q: list(split[q].answers) for q in (11, 12, 13)})[0])
    assert by_method["similarity"] > by_method["random"] and "accuracy" not in rows[0]
    record = json.loads(open(icl_eval.predictions_path(str(tmp_path), "similarity", 1)).readline())
    assert set(record) == {"question_id", "prediction", "demos"}  # CIDEr is a corpus score: none per prediction
    paths = icl_eval.write_report(rows, str(tmp_path), CAPTION)
    assert [os.path.basename(paths[k]) for k in ("markdown", "csv", "png")] == ["cider.md", "cider.csv", "cider.png"]
    table = list(csv.DictReader(open(paths["csv"])))
    assert [r["method"] for r in table] == ["zero_shot", "random", "similarity"] and "cider" in table[0]


def test_caption_recipes_validate_and_check_the_task_kind():
    resolved = load_recipe(DEMO)
    assert resolved.data["datasets"]["lever_coco_caption_icl"]["eval_splits"] == ["test"]
    from lever_plugins.datasets.demo_caption import ICD_TEMPLATE, QUERY_TEMPLATE, SEPARATOR

    vlm = resolved.data["run"]["vlm"]
    assert (vlm["icd_template"], vlm["query_template"], vlm["separator"]) == (ICD_TEMPLATE, QUERY_TEMPLATE, SEPARATOR)
    load_recipe(os.path.join(REPO, "recipes", "coco_caption_pointer_v3.yaml"))
    with pytest.raises(RecipeError) as info:
        load_recipe(DEMO, ["run.vlm.icd_template='Question: {question} Short answer: {answer}'", "run.embed.modality=multimodal",
                           "run.embed.blip2.qformer.vocab_file=package:configs/demo_vqa_vocab.txt"])
    assert info.value.problems == [
        "run.vlm.icd_template: unknown placeholder(s) ['answer', 'question']; allowed: ['caption'] "
        "(the captioning templates of datasets.lever_coco_caption_icl)"]
    with pytest.raises(RecipeError) as info:
        load_recipe(DEMO, ["run.embed.modality=text", "run.embed.blip2.vision={}"])
    assert any(p.startswith("run.embed: captioning queries are images without text") for p in info.value.problems)


def test_caption_dry_run_plan_names_cider():
    from click.testing import CliRunner

    from lever_plugins.cli import main

    result = CliRunner().invoke(main, ["run", DEMO, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "evaluate: CIDEr at shots [1, 2] + zero-shot" in result.output and "cider.{md,csv,png}" in result.output
    assert "(the generated demo LM under datasets.lever_coco_caption_icl.root)" in result.output
