"""A VQAv2-format mini dataset where the right demonstrations make a tiny language model answer right.

**The planted rule.** Every question asks the colour of one of 16 objects, with distracting context::

    "in the kitchen , what color is the old kite ?"      -> "red"

Each object has one fixed colour in this dataset (16 objects, 8 colours, each colour used twice), but
nothing in a question reveals it: only a demonstration *about the same object* (or another object of
that colour) carries the answer. The place and the adjective are noise that a bag-of-words similarity
picks up as readily as the object, so similarity (RICES) selection is helped by them only partly.

**The tiny model.** :func:`train_demo_lm` trains a 2-layer Llama (~100 k parameters, word-level
tokenizer) on sequences from *random* worlds (a fresh object -> colour map per sequence), where the
query's object always appears in one of 1-3 demonstrations. It cannot memorise any map, so what it
learns is to take the answer from its context - at least to copy one of the answers it sees. On the
demo data, zero-shot it can only guess; with a demonstration of the same object it answers
correctly. Which demonstrations help is exactly what beam search finds and the selector must learn.

Files written under ``root`` (the official VQAv2 names and JSON shapes)::

    v2_OpenEnded_mscoco_train2014_questions.json   v2_mscoco_train2014_annotations.json   (supporting set)
    v2_OpenEnded_mscoco_val2014_questions.json     v2_mscoco_val2014_annotations.json     (evaluation)
    tiny_lm/        config.json, model.safetensors, tokenizer.json ... (AutoModelForCausalLM / AutoTokenizer)
    demo_vqa.json   generation parameters; a second call with the same parameters does nothing

The BLIP-2 demo features use the WordPiece vocabulary shipped as ``package:configs/demo_vqa_vocab.txt``
(:data:`VOCAB_FILE`), which covers every word generated here.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from typing import Callable, Optional, Sequence, Union

from lever_plugins.io import write_json_atomic

logger = logging.getLogger(__name__)

OBJECTS = (
    "kite", "lamp", "boat", "chair", "drum", "hat", "cup", "bell",
    "vase", "sock", "cake", "ring", "fan", "key", "bag", "bike",
)
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black")
PLACES = ("kitchen", "garden", "street", "park", "beach", "office")
ADJECTIVES = ("small", "big", "old", "new")
QUESTION = "in the {place} , what color is the {adjective} {obj} ?"
# Words of the prompt templates (run.vlm.icd_template / query_template of the demo recipe).
TEMPLATE_WORDS = ("Question", "Short", "answer", ":")
FILLER_WORDS = ("in", "the", ",", "what", "color", "is", "?")
VOCAB_FILE = "package:configs/demo_vqa_vocab.txt"

QUESTIONS_FILE = "v2_OpenEnded_mscoco_{subtype}_questions.json"
ANNOTATIONS_FILE = "v2_mscoco_{subtype}_annotations.json"
TRAIN_SUBTYPE, EVAL_SUBTYPE = "train2014", "val2014"
MARKER = "demo_vqa.json"
LM_DIR = "tiny_lm"
FORMAT_VERSION = 1


def demo_words() -> list[str]:
    """Every word the demo questions, answers and templates use."""
    return [*TEMPLATE_WORDS, *FILLER_WORDS, *OBJECTS, *COLOURS, *PLACES, *ADJECTIVES]


def demo_paths(root: Union[str, os.PathLike]) -> dict[str, str]:
    root = os.fspath(root)
    return {
        "train_questions": os.path.join(root, QUESTIONS_FILE.format(subtype=TRAIN_SUBTYPE)),
        "train_annotations": os.path.join(root, ANNOTATIONS_FILE.format(subtype=TRAIN_SUBTYPE)),
        "eval_questions": os.path.join(root, QUESTIONS_FILE.format(subtype=EVAL_SUBTYPE)),
        "eval_annotations": os.path.join(root, ANNOTATIONS_FILE.format(subtype=EVAL_SUBTYPE)),
        "lm": os.path.join(root, LM_DIR),
    }


def object_colours(seed: int) -> dict[str, str]:
    """The dataset's fixed object -> colour map (each colour used by two objects)."""
    colours = list(COLOURS) * (len(OBJECTS) // len(COLOURS))
    random.Random(f"colours:{seed}").shuffle(colours)
    return dict(zip(OBJECTS, colours))


def _split(subtype: str, count: int, first_image_id: int, colours: dict[str, str], rng: random.Random) -> tuple[dict, dict]:
    questions, annotations = [], []
    for i in range(count):
        image_id = first_image_id + i
        question_id = image_id * 1000 + 1  # VQAv2 numbering: image_id followed by three digits
        obj = rng.choice(OBJECTS)
        text = QUESTION.format(place=rng.choice(PLACES), adjective=rng.choice(ADJECTIVES), obj=obj)
        gold = colours[obj]
        # Ten annotators; now and then one or two disagree (as in VQAv2), the majority never changes.
        answers = [gold] * 10
        for slot in rng.sample(range(10), rng.choice((0, 0, 0, 1, 2))):
            answers[slot] = rng.choice([c for c in COLOURS if c != gold])
        questions.append({"image_id": image_id, "question": text, "question_id": question_id})
        annotations.append({
            "question_type": "what color is the", "multiple_choice_answer": gold, "image_id": image_id,
            "answer_type": "other", "question_id": question_id,
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(answers)],
        })
    info = {"description": "lever-plugins demo: colours of objects, learnable only in context", "version": "2.0"}
    header = {"info": info, "license": {"name": "generated"}, "data_subtype": subtype}
    return (
        {**header, "task_type": "Open-Ended", "data_type": "mscoco", "questions": questions},
        {**header, "data_type": "mscoco", "annotations": annotations},
    )


def build_demo_tokenizer(*, add_bos: bool = True, split_capitalised: bool = False, words: Optional[Sequence[str]] = None):
    """Word-level ``PreTrainedTokenizerFast`` over ``words`` (default :func:`demo_words`; built offline, no download).

    Args:
        add_bos: prepend ``<s>`` to every encoded text (the demo's VLM is trained with it).
        split_capitalised: a capitalised word is always a token of its own (``"redQuestion"`` -> ``red``,
            ``Question``), even when nothing separates it from the word before.
        words: the vocabulary after the special tokens and ``"\n"`` (the caption demo passes its own).
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate([*specials, "\n", *(demo_words() if words is None else words)])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # Newlines are tokens (they separate demonstrations); spaces only separate words.
    splits = [
        pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
        pre_tokenizers.Punctuation(behavior="isolated"),
        *([pre_tokenizers.Split(Regex("[A-Z][a-z]*"), behavior="isolated")] if split_capitalised else []),
        pre_tokenizers.Split(Regex("[ \t]+"), behavior="removed"),
    ]
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(splits)
    if add_bos:
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>",
    )


def _lm_sequence(tokenizer, rng: random.Random) -> tuple[list[int], list[int]]:
    """A random-world training sequence in the pipeline's prompt format; returns (ids, target positions):
    the answer's and the separator's after it, so the model learns to end its answer.
    """
    from lever_plugins.schemas.icl import VlmSettings

    template = VlmSettings(kind="causal_lm")
    objects = rng.sample(OBJECTS, rng.randint(1, 3))
    world = {obj: rng.choice(COLOURS) for obj in objects}

    def question(obj: str) -> str:
        return QUESTION.format(place=rng.choice(PLACES), adjective=rng.choice(ADJECTIVES), obj=obj)

    demos = [template.icd_template.format(question=question(o), answer=world[o]) for o in objects]
    query = rng.choice(objects)
    prompt = template.separator.join([*demos, template.query_template.format(question=question(query))])
    # The answer, then the separator: the model learns to end its answer where a demonstration's ends.
    ids = tokenizer(prompt)["input_ids"] + tokenizer(" " + world[query] + template.separator, add_special_tokens=False)["input_ids"]
    return ids, [len(ids) - 2, len(ids) - 1]


def train_demo_lm(
    out_dir: str, steps: int = 300, seed: int = 0, batch_size: int = 32, lr: float = 3e-3, *,
    words: Optional[Sequence[str]] = None, sequence: Optional[Callable] = None,
) -> dict:
    """Train the tiny in-context copier (see the module docstring) and save it with its tokenizer.

    Args:
        words: tokenizer vocabulary (default :func:`demo_words`).
        sequence: ``(tokenizer, rng) -> (ids, target positions)``, one training sequence (default: the
            VQA demo's random worlds); the loss is the cross-entropy of the target tokens.

    Returns:
        ``{"steps", "final_loss", "parameters"}``.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sequence = sequence or _lm_sequence
    tokenizer = build_demo_tokenizer(words=words)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        rng = random.Random(f"lm:{seed}")
        loss_value = float("nan")
        for step in range(steps):
            rows = [sequence(tokenizer, rng) for _ in range(batch_size)]
            length = max(len(ids) for ids, _ in rows)
            ids = torch.full((batch_size, length), tokenizer.pad_token_id, dtype=torch.long)
            for i, (row, _) in enumerate(rows):
                ids[i, :len(row)] = torch.tensor(row)
            logits = model(input_ids=ids).logits
            # Loss on the targets (VQA: the query's answer, the one token the context determines, and the
            # separator after it), gathered target slot by slot: every row's first target, then every second...
            slots = range(max(len(targets) for _, targets in rows))
            rows_index = torch.tensor([i for j in slots for i, (_, t) in enumerate(rows) if j < len(t)])
            positions = torch.tensor([t[j] for j in slots for _, t in rows if j < len(t)])
            loss = torch.nn.functional.cross_entropy(logits[rows_index, positions - 1], ids[rows_index, positions])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for group in optimizer.param_groups:  # linear decay to 10 %: a stable end point
                group["lr"] = lr * (1.0 - 0.9 * step / max(steps - 1, 1))
            optimizer.step()
            loss_value = float(loss.detach())
    finally:
        torch.random.set_rng_state(generator_state)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"steps": steps, "final_loss": loss_value, "parameters": sum(p.numel() for p in model.parameters())}


def generate_demo_vqa(
    root: Union[str, os.PathLike],
    *,
    num_train: int = 800,
    num_eval: int = 200,
    lm_steps: int = 300,
    seed: int = 0,
) -> dict[str, str]:
    """Write the demo dataset and its tiny model under ``root`` (idempotent; see the module docstring).

    Returns:
        The paths of :func:`demo_paths`.
    """
    root = os.fspath(root)
    params = {"format": FORMAT_VERSION, "num_train": num_train, "num_eval": num_eval, "lm_steps": lm_steps, "seed": seed}
    paths = demo_paths(root)
    marker = os.path.join(root, MARKER)
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as handle:
            if json.load(handle).get("params") == params:
                return paths
    os.makedirs(root, exist_ok=True)
    colours = object_colours(seed)
    rng = random.Random(f"data:{seed}")
    for subtype, count, first in ((TRAIN_SUBTYPE, num_train, 100_000), (EVAL_SUBTYPE, num_eval, 900_000)):
        questions, annotations = _split(subtype, count, first, colours, rng)
        write_json_atomic(os.path.join(root, QUESTIONS_FILE.format(subtype=subtype)), questions)
        write_json_atomic(os.path.join(root, ANNOTATIONS_FILE.format(subtype=subtype)), annotations)
    staging = tempfile.mkdtemp(prefix=".tiny_lm-", dir=root)
    try:
        stats = train_demo_lm(staging, steps=lm_steps, seed=seed)
        if os.path.isdir(paths["lm"]):
            shutil.rmtree(paths["lm"])
        os.replace(staging, paths["lm"])
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging)
    logger.info("demo VQA: %d + %d questions and a tiny LM (%s parameters, final loss %.3f) in %s",
                num_train, num_eval, f"{stats['parameters']:,}", stats["final_loss"], root)
    write_json_atomic(marker, {"params": params, "object_colours": colours, "lm": stats})
    return paths


def demo_root_lm(root: Optional[str]) -> str:
    """Folder of the generated tiny LM under ``root``."""
    if not root:
        raise ValueError("the demo language model lives under datasets.lever_vqa_icl.root, which is not set")
    return demo_paths(root)["lm"]
