"""In-context demonstration (ICD) selection pipeline for VQA (SPEC §7, issue 4).

Stages, each resumable and each a step of ``lever-plugins run`` with ``task: lever_icl_selection``:

* :mod:`~lever_plugins.icl.embed` - query / candidate features, cached to disk;
* :mod:`~lever_plugins.icl.beam_search` - candidate pools and VLM-scored beam search (training data);
* training - the LAVIS task :mod:`lever_plugins.tasks.icl_selection` (pointer selectors V1/V2/V3);
* :mod:`~lever_plugins.icl.evaluate` - ICD selection for evaluation queries and VQA accuracy of the VLM
  prompted with them, against zero-shot, random and similarity (RICES) selection.

Nothing in this package imports LAVIS except the BLIP-2 feature extractor and the dataset builder
(:mod:`~lever_plugins.icl.builder`, which reads the pipeline's feature cache and beam-search files).
"""
