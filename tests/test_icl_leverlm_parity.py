"""Our beam search computes what Lever-LM's own beam search computes: the InfoScores and the beams kept.

How ``tests/data/leverlm_parity/expected.json`` was produced (once, outside this repository):
Lever-LM (ForJadeForest/Lever-LM, commit 11d61e44) was checked out in a scratch folder and its own
``generate_data.generate_single_sample_icd`` (the beam loop: each beam's ``topk`` of
``utils.get_info_score``, then ``lever_lm.utils.beam_filter``) was run with
``open_mmicl.interface.LLMInterface`` (its text-only interface) on :func:`_icl_helpers.parity_lm`
(a tiny Llama whose weights are drawn from a fixed generator, so nothing needs to be stored) and
its tokenizer. Settings: openicl ``PromptTemplate("Question: <Q> Short answer: <A>")``,
``split_token "Short answer:"``, ``icd_join_char " "``, no instruction, ``construct_order left``,
``scorer infoscore``, beam 3, 3 shots, right padding (as ``gen_data`` sets it), fp32
(``interface.autocast_context`` replaced by a null context: Lever-LM's ``get_autocast("fp32")``
returns the class ``suppress`` rather than a context). Modules that the two functions do not use
(hydra, datasets, faiss, open_flamingo, ...) were stubbed so that the files import. Every
``get_info_score`` call was recorded (query, context in prompt order, candidates, the returned
scores) with the final ``{"id_list", "score_list"}`` of six queries with pools of six candidates.

What Lever-LM does, for the record (checked in that run):

* ``construct_order: left`` puts each new demonstration at the far left (``[new_icd] +
  chosen``), so the first choice stays next to the query; ``id_list`` is in prompt order
  ``[last chosen, ..., first chosen, query]``. Our ``icds`` are in selection order (its reverse).
* InfoScore = ``exp(-mean CE)`` with ICDs minus without, the CE averaged over the positions after
  ``mask_length`` = the token count of ``concat_prompt(icds) + query text up to split_token``,
  i.e. the answer, then the join character and EOS that ``prepare_input`` appends (EOS is not
  scored when pad = eos, as for Qwen). The tokenizer chosen here makes that count exact: it adds
  no BOS and splits a capitalised word off (``concat_prompt`` joins the last demonstration to the
  query without ``icd_join_char``), and a space join adds no token. Then our ``exp(-NLL)`` of
  ``" " + answer`` + EOS (``score_eos``) is the same number.
* The beams kept are those with the highest **last-step** gain (``beam_filter`` on the step's
  scores), which is our default ``rank_by: last_gain``.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from _icl_helpers import parity_lm
from lever_plugins.icl import beam_search as bs
from lever_plugins.icl.data import VqaExample
from lever_plugins.icl.vlm import CausalLmVqa, IclPrompt, score_from_nll
from lever_plugins.schemas.icl import BeamSearchSettings, VlmSettings

DATA = Path(__file__).parent / "data" / "leverlm_parity" / "expected.json"


@pytest.fixture(scope="module")
def recorded() -> dict:
    return json.loads(DATA.read_text())


@pytest.fixture(scope="module")
def vlm() -> CausalLmVqa:
    model, tokenizer = parity_lm()
    # Lever-LM's prompt for this template: parts joined by icd_join_char " ", the answer after "Short answer: ".
    return CausalLmVqa(model, tokenizer, VlmSettings(kind="causal_lm", separator=" ", instruction="", score_eos=True, batch_size=5))


def _examples(recorded) -> dict[int, VqaExample]:
    return {e["idx"]: VqaExample(e["idx"], e["idx"], e["question"], e["answer"], (e["answer"],)) for e in recorded["examples"]}


def test_info_scores_equal_leverlm_get_info_score(recorded, vlm):
    examples = _examples(recorded)
    calls = recorded["get_info_score_calls"]
    assert len(calls) == 6 * (1 + 3 + 3)  # per query: zero-shot context, then 3 beams at steps 2 and 3
    for call in calls:
        query = examples[call["query"]]
        chosen = tuple(examples[i] for i in reversed(call["context"]))  # Lever-LM's prompt order -> selection order
        prompts = [IclPrompt(query, chosen)] + [IclPrompt(query, chosen + (examples[c],)) for c in call["candidates"]]
        scores = score_from_nll(vlm.answer_nll(prompts, [query.answer] * len(prompts)), "prob_gain")
        torch.testing.assert_close(scores[1:] - scores[0], torch.tensor(call["info_scores"]), atol=2e-7, rtol=0)


@pytest.mark.parametrize("query_id", [100, 101, 102, 103, 104, 105])
def test_kept_beams_equal_leverlm_beam_loop(recorded, vlm, query_id):
    examples = _examples(recorded)
    pool_ids = recorded["pools"][str(query_id)]
    pool = [examples[c] for c in pool_ids]
    expected = recorded["beams"][str(query_id)]
    want = [[pool_ids.index(c) for c in reversed(seq[:-1])] for seq in expected["id_list"]]
    assert all(seq[-1] == query_id for seq in expected["id_list"])
    assert BeamSearchSettings().rank_by == "last_gain"  # Lever-LM's ranking is the default
    result = bs.beam_search_query(vlm, examples[query_id], pool, beam_size=recorded["beam_size"],
                                  shots=recorded["few_shot_num"], score="prob_gain")
    assert [b["icds"] for b in result["beams"]] == want  # the same beams, in the same order (best first)
    assert result["icds"] == want[0]
    # Lever-LM keeps the last step's gain of each beam; ours keeps every step's.
    assert [b["scores"][-1] for b in result["beams"]] == pytest.approx(expected["score_list"], abs=2e-7)


def test_cumulative_ranking_is_a_setting_and_keeps_other_beams(recorded, vlm):
    examples = _examples(recorded)
    differing = 0
    for query_id in recorded["queries"]:
        pool_ids = recorded["pools"][str(query_id)]
        expected = recorded["beams"][str(query_id)]
        want = [[pool_ids.index(c) for c in reversed(seq[:-1])] for seq in expected["id_list"]]
        result = bs.beam_search_query(vlm, examples[query_id], [examples[c] for c in pool_ids], beam_size=3, shots=3,
                                      score="prob_gain", rank_by="cumulative_gain")
        differing += [b["icds"] for b in result["beams"]] != want
        finals = [sum(b["scores"]) for b in result["beams"]]
        assert finals == sorted(finals, reverse=True)  # ranked by the gain over zero-shot
    assert differing == 5  # of 6 queries: the two rankings are not the same search
    with pytest.raises(ValueError, match="unknown rank_by"):
        bs.beam_search_query(vlm, examples[100], [examples[c] for c in recorded["pools"]["100"]], 3, 1, "prob_gain", "best")
