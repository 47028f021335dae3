"""The stages of ``task: lever_icl_selection`` on one recipe, each resumable and skipped when done.

==============  ===========================================  =======================================
stage           writes (defaults under run.output_dir)       skipped / resumed when
==============  ===========================================  =======================================
embed           ``embed/`` (features_dir): 3 tables          manifest matches; finished parts kept
beam_search     ``beam_search/`` (beam_dir): pools.json,     beams.json exists; finished queries in
                beams.part<rank>.jsonl, beams.json,          the part files are skipped
                beams_all.json (every kept beam)
train           checkpoint_{last,best}.pth, metrics.*        (the LAVIS runner; ``--resume``)
select          ``select/``: selections.json, pools          manifest (weights, settings) matches
evaluate        ``evaluate/``: predictions_*.jsonl,          finished predictions kept; all stale
                vqa_accuracy.{md,csv,png}, summary.json      ones moved aside when selections change
==============  ===========================================  =======================================

A stage that finds outputs made with *other* settings refuses to mix them (the message names the
folder and the differing keys), except select / evaluate, whose outputs are cheap and are redone.
"""
from __future__ import annotations

import datetime
import logging
import os
import shutil
import time
from functools import cached_property
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from lever_plugins.icl import beam_search as beams
from lever_plugins.icl import embed as features
from lever_plugins.icl import evaluate as icl_eval
from lever_plugins.icl.caption_data import caption_split
from lever_plugins.icl.data import (
    BeamEntry, IclDataError, VqaSplit, load_beam_files, load_vqa_split, read_json, split_by_question_id,
)
from lever_plugins.icl.kinds import CAPTION, TASK_KINDS, TaskKind
from lever_plugins.io import write_json_atomic
from lever_plugins.schema import expand_path
from lever_plugins.schemas.icl import CocoCaptionIclDatasetSettings, IclSelectionRunSettings, VqaIclDatasetSettings

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SELECTIONS_FILE = "selections.json"


def model_identity(folder: str) -> list:
    """``[name, size, mtime]`` of a model folder's weight and config files: a retrained or replaced
    model makes earlier beam-search scores and predictions stale."""
    suffixes = (".safetensors", ".bin", ".pt", ".pth", ".json")
    if not os.path.isdir(folder):
        return []
    out = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.endswith(suffixes) and os.path.isfile(path):
            stat = os.stat(path)
            out.append([name, stat.st_size, int(stat.st_mtime)])
    return out


class IclPipeline:
    """Paths, data and stages of one ICD-selection run.

    Args:
        run: the validated ``run:`` block.
        data: the validated ``datasets.lever_vqa_icl`` or ``datasets.lever_coco_caption_icl`` block (its task kind).
        output_dir: ``run.output_dir`` (absolute).
        rank, world_size: this process in a torch.distributed job (beam search is sharded).
        barrier: called where all ranks must meet (a no-op outside torch.distributed).
    """

    def __init__(
        self,
        run: IclSelectionRunSettings,
        data: VqaIclDatasetSettings | CocoCaptionIclDatasetSettings,
        output_dir: str,
        *,
        rank: int = 0,
        world_size: int = 1,
        barrier: Callable[[], None] = lambda: None,
        device: Optional[torch.device] = None,
    ):
        self.run = run
        self.data = data
        self.output_dir = os.path.abspath(output_dir)
        self.rank, self.world_size, self.barrier = rank, world_size, barrier
        self.device = device
        self.features_dir = os.path.abspath(expand_path(data.features_dir)) if data.features_dir else os.path.join(self.output_dir, "embed")
        self.beam_dir = os.path.abspath(expand_path(data.beam_dir)) if data.beam_dir else os.path.join(self.output_dir, "beam_search")
        self.select_dir = os.path.join(self.output_dir, "select")
        self.eval_dir = os.path.join(self.output_dir, "evaluate")
        self._vlm = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def progress(self) -> bool:
        return self.is_main and self.run.progress_bar

    @property
    def kind(self) -> TaskKind:
        """The task kind the dataset block names (VQA or captioning)."""
        return TASK_KINDS[self.data.task_kind]

    # -------------------------------------------------------------------------------------- data
    def prepare_data(self) -> None:
        """Generate the demo (main process; the others wait) when the dataset asks for it."""
        if self.data.generate_demo:
            if self.is_main and self.kind is CAPTION:
                from lever_plugins.datasets.demo_caption import generate_demo_caption

                generate_demo_caption(expand_path(str(self.data.root)), lm_steps=self.data.demo_lm_steps)
            elif self.is_main:
                from lever_plugins.datasets.demo_vqa import generate_demo_vqa

                generate_demo_vqa(expand_path(str(self.data.root)), lm_steps=self.data.demo_lm_steps)
            self.barrier()

    @cached_property
    def files(self) -> dict[str, str]:
        return dataset_files(self.data)

    @cached_property
    def train(self) -> VqaSplit:
        return load_train_split(self.data)

    @cached_property
    def eval_split(self) -> VqaSplit:
        if self.kind is CAPTION:
            return caption_split(self.data, "eval")
        images = expand_path(self.data.eval_images) if self.data.eval_images else None
        return load_vqa_split("eval", self.files["eval_questions"], self.files["eval_annotations"],
                              images, self.data.eval_image_template)

    def vlm_path(self) -> str:
        if self.run.vlm.path:
            return expand_path(self.run.vlm.path)
        if self.data.generate_demo and self.kind is CAPTION:
            from lever_plugins.datasets.demo_caption import demo_paths

            return demo_paths(expand_path(str(self.data.root)))["lm"]
        if self.data.generate_demo:
            from lever_plugins.datasets.demo_vqa import demo_root_lm

            return demo_root_lm(expand_path(str(self.data.root)))
        raise IclDataError("run.vlm.path: required (a local model folder); null is allowed only with "
                           f"datasets.{self.data.dataset_name}.generate_demo: true")

    def vlm(self):
        if self._vlm is None:
            from lever_plugins.icl.vlm import load_vlm

            self._vlm = load_vlm(self.run.vlm, self.vlm_path(), device=self.device, kind=self.kind)
        return self._vlm

    def tables(self) -> dict[str, dict]:
        return features.load_tables(self.features_dir)

    # -------------------------------------------------------------------------------------- embed
    def embed(self) -> None:
        """Stage ``embed``: every rank encodes its share of the batches, rank 0 writes the tables
        (:func:`lever_plugins.icl.embed.embed_stage`)."""
        features.embed_stage(self.run.embed, self.train, self.eval_split, self.features_dir, progress=self.progress)
        self.barrier()

    # -------------------------------------------------------------------------------------- pools
    def pools(self, query_ids: Sequence[int], table: str) -> dict[int, list[int]]:
        """Candidate pools for ``query_ids`` (beam-search queries: ``train_query``; evaluation: ``eval_query``)."""
        settings = self.run.beam_search
        support = self.train.question_ids
        if settings.pool == "random":
            return beams.random_pools(query_ids, support, settings.pool_size, settings.seed)
        tables = self.tables()
        query_emb = features.rows_for(tables[table], query_ids, self.features_dir)
        support_emb = features.rows_for(tables["train_query"], support, self.features_dir)
        return beams.similarity_pools(query_ids, query_emb, support, support_emb, settings.pool_size)

    # -------------------------------------------------------------------------------------- beam search
    def beam_query_ids(self) -> list[int]:
        settings = self.run.beam_search
        return icl_eval.sample_queries(self.train.question_ids, settings.num_queries, settings.seed)

    def beam_fingerprint(self) -> dict:
        vlm = self.run.vlm
        fingerprint: dict[str, Any] = {
            "beam_search": self.run.beam_search.to_dict(),
            "vlm": {"kind": vlm.kind, "path": os.path.abspath(self.vlm_path()), "files": model_identity(self.vlm_path()),
                    "instruction": vlm.instruction,
                    "icd_template": vlm.icd_template, "query_template": vlm.query_template, "separator": vlm.separator,
                    "score_eos": vlm.score_eos, "use_images": vlm.use_images, "max_pixels": vlm.max_pixels},
            "train_questions": len(self.train),
            "train_first_last": [self.train.examples[0].question_id, self.train.examples[-1].question_id],
        }
        if self.run.beam_search.pool == "similarity":
            fingerprint["features"] = features.embed_fingerprint(self.run.embed, self.train, self.eval_split)
        return fingerprint

    def beam_search(self, max_queries: Optional[int] = None) -> Optional[str]:
        """Stage ``beam_search``; returns the path of ``beams.json`` once every query is done."""
        beams_path = os.path.join(self.beam_dir, beams.BEAMS_FILE)
        pools_path = os.path.join(self.beam_dir, beams.POOLS_FILE)
        fingerprint = self.beam_fingerprint()
        hint = f"delete that folder or point datasets.{self.data.dataset_name}.beam_dir at a new one"
        query_ids = self.beam_query_ids()
        if self.is_main:
            os.makedirs(self.beam_dir, exist_ok=True)
            manifest = features.check_manifest(self.beam_dir, fingerprint, "beam-search results", hint)
            if manifest is None:
                write_json_atomic(os.path.join(self.beam_dir, MANIFEST), {"fingerprint": fingerprint}, indent=2)
            if not os.path.isfile(pools_path):
                pools = self.pools(query_ids, "train_query")
                write_json_atomic(pools_path, {str(q): pools[q] for q in query_ids})
        self.barrier()
        if os.path.isfile(beams_path):
            logger.info("beam search: reusing %s", beams_path)
            all_path = os.path.join(self.beam_dir, beams.ALL_BEAMS_FILE)
            if self.is_main and not os.path.isfile(all_path) and beams.write_all_beams(self.beam_dir, query_ids):
                logger.info("beam search: wrote %s (every kept beam) from the part files of an earlier run", all_path)
            self.barrier()
            return beams_path
        pools = {int(q): [int(c) for c in p] for q, p in read_json(pools_path, "candidate-pool").items()}
        missing = [q for q in query_ids if q not in pools]
        if missing:
            raise IclDataError(f"{pools_path}: no pool for question_ids {missing[:5]}; {hint}")
        vlm = self.vlm()
        beams.run_beam_search(
            vlm, self.train, query_ids, pools, self.beam_dir, beam_size=self.run.beam_search.beam_size,
            shots=self.run.beam_search.shots, score=self.run.beam_search.score, rank_by=self.run.beam_search.rank_by, rank=self.rank,
            world_size=self.world_size, progress=self.progress, max_queries=max_queries,
        )
        if max_queries is not None:
            return beams.merge_beam_parts(self.beam_dir, query_ids) if self.is_main else None
        # Ranks finish at different times: wait on the files rather than in a collective (no timeout).
        while len(beams.finished_records(self.beam_dir).keys() & set(query_ids)) < len(query_ids):
            time.sleep(1)
        path = beams.merge_beam_parts(self.beam_dir, query_ids) if self.is_main else None
        self.barrier()
        return path or beams_path

    def build_datasets(self) -> dict:
        """``{"train": ..., "val": ...}`` :class:`~lever_plugins.icl.beam_dataset.PointerBeamDataset` s."""
        return build_pointer_datasets(self.data, self.train, self.features_dir, self.beam_dir)

    # -------------------------------------------------------------------------------------- select
    def eval_query_ids(self) -> list[int]:
        settings = self.run.evaluation
        return icl_eval.sample_queries(self.eval_split.question_ids, settings.num_queries, settings.seed)

    def select(self, selector: Optional[torch.nn.Module] = None, weights: Optional[dict] = None) -> dict:
        """Stage ``select``: demonstrations per evaluation query for every method; cached by manifest."""
        settings = self.run.evaluation
        max_shots = max(settings.shots)
        fingerprint = {
            "evaluation": {k: settings.to_dict()[k] for k in ("num_queries", "shots", "methods", "seed")},
            "pools": {k: self.run.beam_search.to_dict()[k] for k in ("pool", "pool_size", "seed")},
            "features": features.embed_fingerprint(self.run.embed, self.train, self.eval_split),
            "weights": weights if "pointer" in settings.methods else None,
        }
        path = os.path.join(self.select_dir, SELECTIONS_FILE)
        manifest_path = os.path.join(self.select_dir, MANIFEST)
        if os.path.isfile(path) and os.path.isfile(manifest_path) and read_json(manifest_path, "select manifest").get("fingerprint") == fingerprint:
            logger.info("select: reusing %s", path)
            return _int_keys(read_json(path, "selections"))
        query_ids = self.eval_query_ids()
        support = self.train.question_ids
        tables = self.tables()
        query_emb = features.rows_for(tables["eval_query"], query_ids, self.features_dir)
        selections: dict[str, dict[int, list[int]]] = {}
        for method in settings.methods:
            if method == "random":
                selections[method] = icl_eval.select_random(query_ids, support, max_shots, settings.seed)
            elif method == "similarity":
                support_emb = features.rows_for(tables["train_query"], support, self.features_dir)
                selections[method] = icl_eval.select_similarity(query_ids, query_emb, support, support_emb, max_shots)
            else:
                if selector is None:
                    raise ValueError("select: method 'pointer' needs a trained selector")
                shot_num = selector.settings.shot_num
                if max_shots > shot_num:
                    raise ValueError(
                        f"run.evaluation.shots asks for {max_shots} demonstrations but the selector picks "
                        f"model.shot_num = {shot_num}; raise model.shot_num or lower the shot counts"
                    )
                pools = self.pools(query_ids, "eval_query")
                cand_ids = tables["train_candidate"]["question_ids"].tolist()
                selections[method] = icl_eval.select_pointer(
                    selector, query_ids, query_emb, pools, {q: i for i, q in enumerate(cand_ids)},
                    tables["train_candidate"]["embeddings"],
                )
                write_json_atomic(os.path.join(self.select_dir, "eval_pools.json"), {str(q): pools[q] for q in query_ids})
        write_json_atomic(path, {m: {str(q): v for q, v in sel.items()} for m, sel in selections.items()})
        write_json_atomic(manifest_path, {"fingerprint": fingerprint, "query_ids": query_ids}, indent=2)
        logger.info("select: %d evaluation queries, methods %s -> %s", len(query_ids), ", ".join(selections), path)
        return selections

    # -------------------------------------------------------------------------------------- evaluate
    def evaluate(self, shard: bool = False) -> dict[str, str]:
        """Stage ``evaluate``: VQA accuracy (captioning: CIDEr) per (method, shots) + zero-shot; returns the report paths.

        ``shard``: every rank calls it and generates its share of the answers (rank 0 writes the
        files); otherwise the calling process does everything.
        """
        sharded = shard and self.world_size > 1
        main = self.is_main or not sharded
        path = os.path.join(self.select_dir, SELECTIONS_FILE)
        if not os.path.isfile(path):
            raise IclDataError(f"{path}: not found; run the select stage first (run.stages)")
        selections = _int_keys(read_json(path, "selections"))
        select_manifest = read_json(os.path.join(self.select_dir, MANIFEST), "select manifest")
        query_ids = [int(q) for q in select_manifest["query_ids"]]
        vlm_settings = self.run.vlm.to_dict()
        for key in ("device", "batch_size", "dtype"):
            vlm_settings.pop(key)
        fingerprint = {"select": select_manifest["fingerprint"], "vlm": vlm_settings, "vlm_path": os.path.abspath(self.vlm_path()),
                       "vlm_files": model_identity(self.vlm_path())}
        manifest_path = os.path.join(self.eval_dir, MANIFEST)
        if main:
            if os.path.isfile(manifest_path) and read_json(manifest_path, "evaluate manifest").get("fingerprint") != fingerprint:
                stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
                aside = f"{self.eval_dir}.old-{stamp}"
                shutil.move(self.eval_dir, aside)
                logger.warning("evaluate: selections or VLM changed; the previous predictions were moved to %s", aside)
            os.makedirs(self.eval_dir, exist_ok=True)
            write_json_atomic(manifest_path, {"fingerprint": fingerprint}, indent=2)
        if sharded:
            self.barrier()
        rows = icl_eval.evaluate_vqa(
            self.vlm(), self.eval_split, self.train, query_ids,
            {m: selections[m] for m in self.run.evaluation.methods if m in selections},
            self.run.evaluation.shots, self.eval_dir, progress=self.progress, shard=sharded, kind=self.kind,
        )
        paths = icl_eval.report_paths(self.eval_dir, self.kind)
        if main:
            icl_eval.write_report(rows, self.eval_dir, self.kind)
            with open(paths["markdown"], encoding="utf-8") as handle:
                logger.info("%s (%d queries):\n%s", self.kind.metric_title, len(query_ids), handle.read())
        if sharded:
            self.barrier()
        return paths


def dataset_files(data: VqaIclDatasetSettings) -> dict[str, str]:
    """The four question / annotation files of the dataset block (the demo's when generated)."""
    if data.generate_demo:
        from lever_plugins.datasets.demo_vqa import demo_paths

        return demo_paths(expand_path(str(data.root)))
    return {key: expand_path(str(getattr(data, key)))
            for key in ("train_questions", "train_annotations", "eval_questions", "eval_annotations")}


def load_train_split(data: VqaIclDatasetSettings | CocoCaptionIclDatasetSettings) -> VqaSplit:
    """The supporting set of the dataset block: VQA questions, or caption images."""
    if isinstance(data, CocoCaptionIclDatasetSettings):
        return caption_split(data, "train")
    files = dataset_files(data)
    images = expand_path(data.train_images) if data.train_images else None
    return load_vqa_split("train", files["train_questions"], files["train_annotations"], images, data.train_image_template)


def read_beam_entries(beam_dir: str, train: VqaSplit) -> list[BeamEntry]:
    """Checked entries of ``beam_dir``'s ``beams.json`` + ``pools.json`` (+ ``beams_all.json`` if present)."""
    beams_path = os.path.join(beam_dir, beams.BEAMS_FILE)
    if not os.path.isfile(beams_path):
        raise IclDataError(f"{beams_path}: not found; run the beam_search stage first (run.stages)")
    all_path = os.path.join(beam_dir, beams.ALL_BEAMS_FILE)
    return load_beam_files(beams_path, os.path.join(beam_dir, beams.POOLS_FILE), candidates=train,
                           all_beams_path=all_path if os.path.isfile(all_path) else None)


def build_pointer_datasets(
    data: VqaIclDatasetSettings | CocoCaptionIclDatasetSettings, train: VqaSplit, features_dir: str, beam_dir: str,
) -> dict:
    """Train / val :class:`~lever_plugins.icl.beam_dataset.PointerBeamDataset` s split by question_id.

    The split is by query (question_id), so all beams of a query fall on one side. ``train`` holds
    every kept beam of its queries (``train_on: all``, as Lever-LM) or only the best
    (``train_on: best``); ``val`` always scores the best beam of each held-out query, so its metrics
    compare across ``train_on``. Beam scores go through ``beam_score_transform``, fitted on the
    training sequences' scores and applied unchanged to val.
    """
    from lever_plugins.icl.beam_dataset import PointerBeamDataset
    from lever_plugins.modules.ranking import BeamScoreTransform

    entries = read_beam_entries(beam_dir, train)
    beams_path = os.path.join(beam_dir, beams.BEAMS_FILE)
    lengths = {len(icds) for e in entries for icds, _ in e.sequences}
    if len(lengths) > 1:
        raise IclDataError(f"{beams_path}: entries have different numbers of icds {sorted(lengths)}; the selector needs one")
    train_on = data.train_on
    if train_on == "all" and entries and not any(e.beams for e in entries):
        logger.warning("%s: %s has no %s (best beams only: the seeds' format or an older run); "
                       "training on the best beam of each query", data.dataset_name, beams_path, beams.ALL_BEAMS_FILE)
    tables = features.load_tables(features_dir)
    train_ids, val_ids = split_by_question_id([e.question_id for e in entries], data.val_fraction, data.split_seed)
    by_id = {e.question_id: e for e in entries}
    train_entries = [by_id[q] for q in train_ids]
    fitted = [score for e in train_entries for _, scores in (e.sequences if train_on == "all" else e.sequences[:1])
              for score in scores]
    # float32, as the datasets hold them: a rank is then exact for the training scores themselves.
    transform = BeamScoreTransform(data.beam_score_transform, torch.tensor(fitted, dtype=torch.float32))
    logger.info("%s: %s", data.dataset_name, transform.describe())
    out = {}
    for split, split_entries, sequences in (("train", train_entries, train_on), ("val", [by_id[q] for q in val_ids], "best")):
        out[split] = PointerBeamDataset(split_entries, tables["train_query"], tables["train_candidate"], beams_path,
                                        sequences=sequences, score_transform=transform)
        logger.info("%s %s: %d beam-search queries, %d sequences", data.dataset_name, split, len(split_entries), len(out[split]))
    return out


def _int_keys(selections: Mapping[str, Mapping[str, Sequence[int]]]) -> dict[str, dict[int, list[int]]]:
    return {m: {int(q): [int(d) for d in v] for q, v in sel.items()} for m, sel in selections.items()}
