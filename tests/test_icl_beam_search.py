"""VLM scorers (batched = unbatched), beam search (batched, exact on small pools), resumable generation."""
from __future__ import annotations

import json
import math
import os
from itertools import permutations
from types import SimpleNamespace

import pytest
import torch

from _icl_helpers import tiny_causal_lm, tiny_qwen25_vl, write_vqa_files
from lever_plugins.icl import beam_search as bs
from lever_plugins.icl.data import IclDataError, VqaExample, load_vqa_split, read_jsonl
from lever_plugins.icl.vlm import CausalLmVqa, IclPrompt, Qwen25VlVqa, VqaVlm, score_from_nll
from lever_plugins.schemas.icl import VlmSettings


def _example(qid: int, obj: str, colour: str, image_path=None) -> VqaExample:
    return VqaExample(qid, qid, f"in the park , what color is the old {obj} ?", colour, (colour,) * 10, image_path)


QUERY = _example(1, "kite", "red")
DEMOS = [_example(2, "kite", "red"), _example(3, "lamp", "blue"), _example(4, "boat", "green")]
PROMPTS = [IclPrompt(QUERY), IclPrompt(QUERY, (DEMOS[0],)), IclPrompt(QUERY, (DEMOS[1], DEMOS[2])), IclPrompt(DEMOS[2], tuple(DEMOS[:2]))]
ANSWERS = ["red", "red", "red blue", "green"]


def _reference_nll(vlm: CausalLmVqa, prompt: IclPrompt, answer: str) -> float:
    """One unpadded sequence through the model; mean NLL of the answer tokens."""
    prompt_ids = vlm.tokenizer(vlm.prompt_text(prompt))["input_ids"]
    answer_ids = vlm.tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
    if vlm.settings.score_eos:
        answer_ids = answer_ids + [vlm.tokenizer.eos_token_id]
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        log_probs = torch.log_softmax(vlm.model(input_ids=ids).logits[0].float(), -1)
    start = len(prompt_ids)
    return float(-sum(log_probs[start + i - 1, t] for i, t in enumerate(answer_ids)) / len(answer_ids))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("score_eos", [True, False])
def test_causal_lm_batched_scores_equal_single_sequences(kind, score_eos):
    model, tokenizer = tiny_causal_lm(kind)
    vlm = CausalLmVqa(model, tokenizer, VlmSettings(kind="causal_lm", batch_size=3, score_eos=score_eos))
    batched = vlm.answer_nll(PROMPTS, ANSWERS)  # two forward passes, left-padded
    expected = torch.tensor([_reference_nll(vlm, p, a) for p, a in zip(PROMPTS, ANSWERS)])
    assert batched.shape == (4,)
    torch.testing.assert_close(batched, expected, atol=2e-5, rtol=1e-4)


def test_causal_lm_prompt_puts_the_first_choice_next_to_the_query_and_generation_is_batch_invariant():
    model, tokenizer = tiny_causal_lm("llama")
    vlm = CausalLmVqa(model, tokenizer, VlmSettings(kind="causal_lm", batch_size=4, max_new_tokens=3, instruction="Answer briefly."))
    text = vlm.prompt_text(IclPrompt(QUERY, (DEMOS[0], DEMOS[1])))
    assert text == (
        "Answer briefly.\n"
        f"Question: {DEMOS[1].question} Short answer: blue\n"
        f"Question: {DEMOS[0].question} Short answer: red\n"
        f"Question: {QUERY.question} Short answer:"
    )
    together = vlm.generate(PROMPTS)
    alone = [vlm.generate([p])[0] for p in PROMPTS]
    assert together == alone and all("\n" not in a for a in together)


def test_qwen25_vl_chat_turns_and_batched_scores(tmp_path):
    from PIL import Image

    images = []
    for i in range(4):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (56, 56), (60 * i, 255 - 50 * i, 30)).save(path)
        images.append(str(path))
    query = _example(1, "kite", "red", images[0])
    demos = [_example(2, "kite", "red", images[1]), _example(3, "lamp", "blue", images[2])]
    prompts = [IclPrompt(query), IclPrompt(query, (demos[0],)), IclPrompt(query, (demos[0], demos[1]))]
    model, processor = tiny_qwen25_vl()
    vlm = Qwen25VlVqa(model, processor, VlmSettings(kind="qwen2_5_vl", batch_size=3, max_new_tokens=2))
    messages = vlm.messages(prompts[2])
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    assert messages[1]["content"][0]["text"] == "blue" and messages[3]["content"][0]["text"] == "red"  # first choice last
    assert messages[0]["content"][0] == {"type": "image"}
    batched = vlm.answer_nll(prompts, ["red", "red", "blue"])
    single = torch.cat([vlm.answer_nll([p], [a]) for p, a in zip(prompts, ["red", "red", "blue"])])
    torch.testing.assert_close(batched, single, atol=2e-5, rtol=1e-4)
    answers = vlm.generate(prompts)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    no_image = VqaExample(9, 9, "what color is the kite ?", "red", ("red",))
    with pytest.raises(IclDataError, match="question_id 9: run.vlm.use_images is true"):
        vlm.answer_nll([IclPrompt(no_image)], ["red"])


# ------------------------------------------------------------------------------------------ beam search


class TableVlm(VqaVlm):
    """A scorer with known answers: NLL from a table over the *set* of demonstrations (by question_id)."""

    def __init__(self, table: dict, default: float = 3.0):
        self.table = table
        self.default = default
        self.settings = SimpleNamespace(batch_size=10_000)
        self.calls: list[int] = []
        self.queries: list[int] = []

    def answer_nll(self, prompts, answers):
        self.calls.append(len(prompts))
        self.queries.extend(p.query.question_id for p in prompts)
        return torch.tensor([self.table.get(frozenset(d.question_id for d in p.demos), self.default) for p in prompts])


POOL = [_example(10 + i, "x", "red") for i in range(3)]  # question_ids 10 (A), 11 (B), 12 (C)
A, B, C = 10, 11, 12


def _table():
    return {
        frozenset(): 2.0,
        frozenset({A}): 1.0, frozenset({B}): 1.2, frozenset({C}): 1.3,
        frozenset({A, B}): 0.9, frozenset({A, C}): 0.95, frozenset({B, C}): 0.1,
    }


def test_beam_search_scores_all_extensions_in_one_batch_per_step():
    vlm = TableVlm(_table())
    result = bs.beam_search_query(vlm, QUERY, POOL, beam_size=2, shots=2, score="prob_gain", rank_by="cumulative_gain")
    # base, then all 3 candidates, then 2 beams x 2 remaining candidates: one scorer call per step.
    assert vlm.calls == [1, 3, 4]
    assert result["icds"] == [1, 2]  # B then C: beam 2 keeps B and finds the best pair
    p = lambda nll: math.exp(-nll)  # noqa: E731
    assert result["scores"] == pytest.approx([p(1.2) - p(2.0), p(0.1) - p(1.2)])
    assert sum(result["scores"]) == pytest.approx(result["final_score"] - result["base_score"])
    assert result["beams"][1]["icds"] == [0, 1]  # runner-up: A then B (0.9)
    # Lever-LM's ranking (the default): the last step's gain; B then A gains more over B than A then B over A.
    lever = bs.beam_search_query(TableVlm(_table()), QUERY, POOL, beam_size=2, shots=2, score="prob_gain")
    assert [b["icds"] for b in lever["beams"]] == [[1, 2], [1, 0]]
    assert lever["beams"][1]["scores"] == pytest.approx([p(1.2) - p(2.0), p(0.9) - p(1.2)])


def test_greedy_beam_misses_what_a_wider_beam_finds_and_logprob_gain_is_the_log_score():
    greedy = bs.beam_search_query(TableVlm(_table()), QUERY, POOL, beam_size=1, shots=2, score="logprob_gain")
    assert greedy["icds"] == [0, 1]  # A first, then B
    assert greedy["scores"] == pytest.approx([-1.0 + 2.0, -0.9 + 1.0])


def test_exhaustive_beam_equals_brute_force():
    generator = torch.Generator().manual_seed(3)
    pool = [_example(20 + i, "x", "red") for i in range(5)]
    table = {frozenset(s): float(torch.rand(1, generator=generator)) * 3
             for k in range(4) for s in permutations([e.question_id for e in pool], k)}
    result = bs.beam_search_query(TableVlm(table), QUERY, pool, beam_size=5 * 4 * 3, shots=3, score="prob_gain",
                                  rank_by="cumulative_gain")
    best = min(permutations(range(5), 3), key=lambda seq: (table[frozenset(pool[i].question_id for i in seq)], seq))
    assert frozenset(result["icds"]) == frozenset(best)
    assert result["final_score"] == pytest.approx(math.exp(-table[frozenset(pool[i].question_id for i in best)]))


def test_score_kinds():
    nll = torch.tensor([0.0, math.log(2.0)])
    assert score_from_nll(nll, "prob_gain").tolist() == pytest.approx([1.0, 0.5])
    assert score_from_nll(nll, "logprob_gain").tolist() == pytest.approx([0.0, -math.log(2.0)])
    with pytest.raises(ValueError, match="unknown score"):
        score_from_nll(nll, "gain")


def test_pools_are_per_query_deterministic_and_never_hold_the_query():
    support = list(range(100, 140))
    pools = bs.random_pools([100, 105], support, pool_size=8, seed=0)
    assert all(len(p) == 8 and q not in p and len(set(p)) == 8 for q, p in pools.items())
    assert bs.random_pools([105], support, pool_size=8, seed=0)[105] == pools[105]  # other queries do not matter
    assert bs.random_pools([105], support, pool_size=8, seed=1)[105] != pools[105]
    emb = torch.eye(4)
    query = torch.tensor([[1.0, 0.9, 0.0, 0.0]])
    assert bs.similarity_pools([7], query, [5, 6, 7, 8], emb, pool_size=2) == {7: [5, 6]}
    assert bs.similarity_pools([5], emb[:1], [5, 6, 7, 8], emb, pool_size=2)[5][0] != 5
    with pytest.raises(ValueError, match="pool_size 8 needs more than 5"):
        bs.random_pools([1], [1, 2, 3, 4, 5], pool_size=8, seed=0)


def _support(tmp_path, count=10):
    rows = [(1000 + i, i, f"in the park , what color is the old {'kite' if i % 2 else 'lamp'} ?",
             ["red" if i % 2 else "blue"] * 10) for i in range(count)]
    qpath, apath = write_vqa_files(tmp_path / "data", "train", rows)
    return load_vqa_split("train", qpath, apath)


def test_killed_generation_resumes_where_it_stopped(tmp_path):
    support = _support(tmp_path)
    queries = support.question_ids[:6]
    pools = bs.random_pools(queries, support.question_ids, pool_size=4, seed=0)
    out = str(tmp_path / "beams")
    first = TableVlm({}, default=1.0)
    assert bs.run_beam_search(first, support, queries, pools, out, beam_size=2, shots=2, score="prob_gain",
                              progress=False, max_queries=2) == 2
    assert bs.merge_beam_parts(out, queries) is None  # not finished: no beams.json yet
    part = bs.part_path(out, 0)
    kept = read_jsonl(part)
    with open(part, "a") as handle:
        handle.write('{"question_id": %d, "icds": [0' % queries[2])  # killed while writing the third

    second = TableVlm({}, default=1.0)
    assert bs.run_beam_search(second, support, queries, pools, out, beam_size=2, shots=2, score="prob_gain", progress=False) == 4
    assert sorted(set(second.queries)) == queries[2:]  # finished queries were not scored again
    path = bs.merge_beam_parts(out, queries)
    with open(path) as handle:
        merged = json.load(handle)
    assert sorted(int(k) for k in merged) == queries
    assert all(set(v) == {"icds", "scores"} and len(v["icds"]) == 2 for v in merged.values())
    assert read_jsonl(part)[:2] == kept
    third = TableVlm({}, default=1.0)
    assert bs.run_beam_search(third, support, queries, pools, out, beam_size=2, shots=2, score="prob_gain", progress=False) == 0
    assert third.calls == []


def test_every_kept_beam_is_written_keyed_by_question_id_with_its_own_scores(tmp_path):
    from lever_plugins.icl.data import load_beam_files

    support = _support(tmp_path)
    queries = support.question_ids[:4]
    pools = bs.random_pools(queries, support.question_ids, pool_size=5, seed=0)
    out = str(tmp_path / "beams")
    # NLL depends on which demonstrations are shown: every beam has its own gains.
    table = {frozenset(s): 2.0 - 0.1 * len(s) - 0.01 * sum(q % 7 for q in s)
             for q in queries for s in permutations(pools[q], 1)}
    table.update({frozenset(s): 1.7 - 0.02 * sum(q % 5 for q in s) for q in queries for s in permutations(pools[q], 2)})
    bs.run_beam_search(TableVlm(table), support, queries, pools, out, beam_size=3, shots=2, score="prob_gain", progress=False)
    records = {r["question_id"]: r for r in read_jsonl(bs.part_path(out, 0))}
    path = bs.merge_beam_parts(out, queries)
    with open(os.path.join(out, bs.ALL_BEAMS_FILE)) as handle:
        everything = json.load(handle)
    with open(path) as handle:
        best = json.load(handle)
    assert sorted(int(q) for q in everything) == queries
    for q in queries:
        kept = everything[str(q)]
        assert len(kept) == 3 and kept[0] == best[str(q)]  # best first, equal to the beams.json entry
        assert kept == [{"icds": b["icds"], "scores": b["scores"]} for b in records[q]["beams"]]
        assert len({tuple(b["icds"]) for b in kept}) == 3
        assert len({tuple(b["scores"]) for b in kept}) > 1  # not the best beam's scores copied
    with open(os.path.join(out, bs.POOLS_FILE), "w") as handle:
        json.dump({str(q): pools[q] for q in queries}, handle)
    entries = load_beam_files(path, os.path.join(out, bs.POOLS_FILE), all_beams_path=os.path.join(out, bs.ALL_BEAMS_FILE))
    assert [len(e.sequences) for e in entries] == [3] * 4
    assert entries[0].sequences[1] == (tuple(everything[str(queries[0])][1]["icds"]), tuple(everything[str(queries[0])][1]["scores"]))


def test_part_records_without_beams_give_the_best_beam_only(tmp_path):
    out = tmp_path / "beams"
    out.mkdir()
    with open(bs.part_path(str(out), 0), "w") as handle:  # a part file from before "beams" was recorded
        handle.write(json.dumps({"question_id": 5, "icds": [1, 0], "scores": [0.4, 0.1]}) + "\n")
    bs.merge_beam_parts(str(out), [5])
    assert json.loads((out / bs.ALL_BEAMS_FILE).read_text()) == {"5": [{"icds": [1, 0], "scores": [0.4, 0.1]}]}
    assert bs.write_all_beams(str(out), [5, 6]) is None  # query 6 is not finished


def test_sharded_ranks_split_the_queries(tmp_path):
    support = _support(tmp_path)
    queries = support.question_ids[:5]
    pools = bs.random_pools(queries, support.question_ids, pool_size=3, seed=0)
    out = str(tmp_path / "beams")
    seen = []
    for rank in (0, 1):
        vlm = TableVlm({}, default=1.0)
        bs.run_beam_search(vlm, support, queries, pools, out, beam_size=1, shots=1, score="prob_gain",
                           rank=rank, world_size=2, progress=False)
        seen.append(sorted(set(vlm.queries)))
    assert seen == [queries[0::2], queries[1::2]]
    assert os.path.isfile(bs.part_path(out, 1)) and bs.merge_beam_parts(out, queries)


def test_pipeline_beam_stage_writes_seed_format_reuses_it_and_refuses_other_settings(tmp_path):
    from lever_plugins.icl.pipeline import IclPipeline
    from lever_plugins.schemas.icl import BeamSearchSettings, EmbedSettings, IclSelectionRunSettings, VqaIclDatasetSettings

    support = _support(tmp_path, count=12)
    eval_q, eval_a = write_vqa_files(tmp_path / "data", "eval", [(9000, 90, "in the park , what color is the old kite ?", ["red"] * 10)])
    model, tokenizer = tiny_causal_lm("llama")
    model.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    data = VqaIclDatasetSettings(train_questions=str(tmp_path / "data" / "train_questions.json"),
                                 train_annotations=str(tmp_path / "data" / "train_annotations.json"),
                                 eval_questions=eval_q, eval_annotations=eval_a)

    def pipeline(beam_size=2):
        run = IclSelectionRunSettings(
            task="lever_icl_selection", output_dir=str(tmp_path / "out"), progress_bar=False,
            embed=EmbedSettings(encoder="transformers", path=str(tmp_path / "unused"), modality="text"),
            vlm=VlmSettings(kind="causal_lm", path=str(tmp_path / "lm"), device="cpu", score_eos=False),
            beam_search=BeamSearchSettings(num_queries=5, pool_size=4, beam_size=beam_size, shots=2),
        )
        return IclPipeline(run, data, str(tmp_path / "out"))

    path = pipeline().beam_search()
    beams = json.loads(open(path).read())
    pools = json.loads(open(tmp_path / "out" / "beam_search" / "pools.json").read())
    assert len(beams) == 5 and set(beams) == set(pools)
    assert all(len(pools[q]) == 4 and int(q) not in pools[q] and set(pools[q]) <= set(support.question_ids) for q in beams)
    assert all(len(b["icds"]) == len(b["scores"]) == 2 and max(b["icds"]) < 4 for b in beams.values())
    part = bs.part_path(str(tmp_path / "out" / "beam_search"), 0)
    stamp = os.path.getmtime(part)
    assert pipeline().beam_search() == path and os.path.getmtime(part) == stamp  # done: nothing recomputed
    everything_path = tmp_path / "out" / "beam_search" / bs.ALL_BEAMS_FILE
    everything = json.loads(everything_path.read_text())
    assert set(everything) == set(beams) and all(len(everything[q]) == 2 and everything[q][0] == beams[q] for q in beams)
    everything_path.unlink()  # a beam_dir from before beams_all.json: rebuilt from the part files, nothing rescored
    assert pipeline().beam_search() == path and os.path.getmtime(part) == stamp
    assert json.loads(everything_path.read_text()) == everything
    with pytest.raises(IclDataError) as info:
        pipeline(beam_size=3).beam_search()
    assert str(tmp_path / "out" / "beam_search") in str(info.value) and "beam_search.beam_size: 2 -> 3" in str(info.value)
    os.utime(tmp_path / "lm" / "model.safetensors", (1, 1))  # the scorer was replaced
    with pytest.raises(IclDataError, match="vlm.files"):
        pipeline().beam_search()
