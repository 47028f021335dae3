"""The VLM behind the pipeline: scores gold answers (beam search) and generates answers (evaluation).

Two adapters share one interface, :class:`VqaVlm`; the task kind (:mod:`~lever_plugins.icl.kinds`)
fills the templates (VQA: ``{question}``, ``{answer}``; captioning: ``{caption}``):

* :class:`CausalLmVqa` - any ``AutoModelForCausalLM`` (text only). Prompt::

      [instruction + separator] icd_1 separator icd_2 separator ... query_template(question)

  each demonstration rendered with ``icd_template``; the answer follows the query as ``" " + answer``.
* :class:`Qwen25VlVqa` - a Qwen2.5-VL-style chat VLM. Each demonstration is one user turn (its image
  and ``query_template``) and one assistant turn (its answer); the query is the last user turn and
  the answer is the assistant's reply (closed by ``<|im_end|>``).

Demonstrations appear in the prompt in **reverse selection order**: the first-chosen one sits next
to the query and each later choice is placed further left (Lever-LM's "left" construction). Beam
search and evaluation both go through :func:`prompt_demos`, so the order is the same in both.

Scoring returns the **mean negative log-likelihood per answer token** of each (prompt, answer) pair,
batched (``batch_size`` sequences per forward). Rows are left-padded so that every answer ends at the
last position; only the logits of the answer positions are computed (``logits_to_keep``), which keeps
memory at ``(B, answer_len, vocab)`` instead of ``(B, seq_len, vocab)``.
"""
from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from lever_plugins.icl.data import VqaExample, load_example_image
from lever_plugins.icl.kinds import VQA, TaskKind
from lever_plugins.schemas.icl import VlmSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class IclPrompt:
    """A query with its demonstrations in **selection order** (best / first chosen first)."""

    query: VqaExample
    demos: tuple[VqaExample, ...] = ()


def prompt_demos(prompt: IclPrompt) -> list[VqaExample]:
    """Demonstrations in prompt order: the first-chosen one next to the query (see module docstring)."""
    return list(reversed(prompt.demos))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available; use 'auto' or 'cpu'")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def answer_nll_from_logits(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean NLL per row over the masked target positions.

    Args:
        logits: ``(B, A, V)`` predictions for the ``A`` target positions.
        targets: ``(B, A)`` token ids.
        mask: ``(B, A)`` 1 where the position belongs to the answer.

    Returns:
        ``(B,)`` float32.
    """
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    token_nll = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    mask = mask.to(token_nll.dtype)
    return (token_nll * mask).sum(-1) / mask.sum(-1).clamp(min=1)


class VqaVlm:
    """Interface of the VLM adapters."""

    settings: VlmSettings
    device: torch.device
    kind: TaskKind = VQA

    def answer_nll(self, prompts: Sequence[IclPrompt], answers: Sequence[str]) -> torch.Tensor:
        """Mean NLL per answer token of ``answers[i]`` after ``prompts[i]``: ``(N,)`` float32 on CPU."""
        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
        out = []
        size = self.settings.batch_size
        for start in range(0, len(prompts), size):
            out.append(self._answer_nll_batch(prompts[start:start + size], answers[start:start + size]).cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def generate(self, prompts: Sequence[IclPrompt]) -> list[str]:
        """Greedy short answers, one per prompt (batched)."""
        out: list[str] = []
        size = self.settings.batch_size
        for start in range(0, len(prompts), size):
            out.extend(self._generate_batch(prompts[start:start + size]))
        return out

    def _answer_nll_batch(self, prompts: Sequence[IclPrompt], answers: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def _generate_batch(self, prompts: Sequence[IclPrompt]) -> list[str]:
        raise NotImplementedError


def _accepts(fn: Any, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return False


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, length - len(row):] = torch.tensor(list(row), dtype=torch.long)
            mask[i, length - len(row):] = 1
    return ids, mask


def _cut_answer(text: str, stops: Sequence[str]) -> str:
    for stop in stops:
        if stop and stop in text:
            text = text.split(stop, 1)[0]
    return text.strip()


class CausalLmVqa(VqaVlm):
    """Text-only adapter for any causal language model (``AutoModelForCausalLM``) and its tokenizer."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, settings: VlmSettings, device: Optional[torch.device] = None,
                 kind: TaskKind = VQA):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.settings = settings
        self.kind = kind
        self.device = device or next(model.parameters()).device
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token_id is None:
                raise ValueError("the tokenizer has neither a pad nor an eos token; give it one")
            tokenizer.pad_token = tokenizer.eos_token
        self._keep = _accepts(model.forward, "logits_to_keep")
        self._positions = _accepts(model.forward, "position_ids")

    def prompt_text(self, prompt: IclPrompt) -> str:
        s = self.settings
        parts = [s.icd_template.format(**self.kind.demo_values(d)) for d in prompt_demos(prompt)]
        parts.append(s.query_template.format(**self.kind.query_values(prompt.query)))
        if s.instruction:
            parts.insert(0, s.instruction)
        return s.separator.join(parts)

    def _prompt_ids(self, prompt: IclPrompt) -> list[int]:
        return list(self.tokenizer(self.prompt_text(prompt), add_special_tokens=True)["input_ids"])

    def _answer_ids(self, answer: str) -> list[int]:
        ids = list(self.tokenizer(" " + answer, add_special_tokens=False)["input_ids"])
        if self.settings.score_eos and self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        if not ids:
            raise ValueError(f"answer {answer!r} tokenizes to nothing")
        return ids

    def _forward_kwargs(self, ids: torch.Tensor, mask: torch.Tensor, keep: int) -> dict:
        kwargs: dict = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
        if self._positions:
            # Left padding: positions must count real tokens only (models with absolute positions).
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0).to(self.device)
        if self._keep:
            kwargs["logits_to_keep"] = keep
        return kwargs

    @torch.no_grad()
    def _answer_nll_batch(self, prompts: Sequence[IclPrompt], answers: Sequence[str]) -> torch.Tensor:
        answer_ids = [self._answer_ids(a) for a in answers]
        rows = [self._prompt_ids(p) + a for p, a in zip(prompts, answer_ids)]
        ids, mask = _left_pad(rows, self.tokenizer.pad_token_id)
        longest = max(len(a) for a in answer_ids)
        logits = self.model(**self._forward_kwargs(ids, mask, longest + 1)).logits
        logits = logits[:, -(longest + 1):-1]  # position t predicts token t + 1
        targets = ids[:, -longest:].to(logits.device)
        answer_mask = torch.zeros_like(targets)
        for i, a in enumerate(answer_ids):
            answer_mask[i, longest - len(a):] = 1
        return answer_nll_from_logits(logits, targets, answer_mask)

    @torch.no_grad()
    def _generate_batch(self, prompts: Sequence[IclPrompt]) -> list[str]:
        rows = [self._prompt_ids(p) for p in prompts]
        ids, mask = _left_pad(rows, self.tokenizer.pad_token_id)
        output = self.model.generate(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device), max_new_tokens=self.settings.max_new_tokens,
            do_sample=False, num_beams=1, pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
        )
        new_tokens = output[:, ids.shape[1]:]
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [_cut_answer(t, (self.settings.separator, "\n")) for t in texts]


class Qwen25VlVqa(VqaVlm):
    """Chat adapter for Qwen2.5-VL-style models (``Qwen2_5_VLForConditionalGeneration`` + its processor)."""

    END_OF_TURN = "<|im_end|>"

    def __init__(self, model: torch.nn.Module, processor: Any, settings: VlmSettings, device: Optional[torch.device] = None,
                 kind: TaskKind = VQA):
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.settings = settings
        self.kind = kind
        self.device = device or next(model.parameters()).device
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._keep = _accepts(model.forward, "logits_to_keep")

    def _user_turn(self, example: VqaExample) -> dict:
        content: list[dict] = []
        if self.settings.use_images:
            content.append({"type": "image"})
        content.append({"type": "text", "text": self.settings.query_template.format(**self.kind.query_values(example))})
        return {"role": "user", "content": content}

    def messages(self, prompt: IclPrompt) -> list[dict]:
        messages: list[dict] = []
        if self.settings.instruction:
            messages.append({"role": "system", "content": [{"type": "text", "text": self.settings.instruction}]})
        for demo in prompt_demos(prompt):
            messages.append(self._user_turn(demo))
            messages.append({"role": "assistant", "content": [{"type": "text", "text": demo.answer}]})
        messages.append(self._user_turn(prompt.query))
        return messages

    def prompt_text(self, prompt: IclPrompt) -> str:
        return self.processor.apply_chat_template(self.messages(prompt), tokenize=False, add_generation_prompt=True)

    def _images(self, prompts: Sequence[IclPrompt]) -> Optional[list]:
        if not self.settings.use_images:
            return None
        hint = "run.vlm.use_images is true but no image folder is set (datasets.lever_vqa_icl.train_images / eval_images)"
        return [load_example_image(example, hint) for prompt in prompts for example in [*prompt_demos(prompt), prompt.query]]

    def _inputs(self, texts: list[str], prompts: Sequence[IclPrompt]) -> dict:
        kwargs: dict = {"text": texts, "padding": True, "return_tensors": "pt"}
        images = self._images(prompts)
        if images:
            kwargs["images"] = images
        inputs = self.processor(**kwargs)
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}

    @torch.no_grad()
    def _answer_nll_batch(self, prompts: Sequence[IclPrompt], answers: Sequence[str]) -> torch.Tensor:
        suffix = self.END_OF_TURN if self.settings.score_eos else ""
        answer_lengths = [len(self.tokenizer(a + suffix, add_special_tokens=False)["input_ids"]) for a in answers]
        texts = [self.prompt_text(p) + a + suffix for p, a in zip(prompts, answers)]
        inputs = self._inputs(texts, prompts)
        longest = max(answer_lengths)
        if self._keep:
            inputs["logits_to_keep"] = longest + 1
        logits = self.model(**inputs).logits[:, -(longest + 1):-1]
        ids = inputs["input_ids"]
        targets = ids[:, -longest:]
        answer_mask = torch.zeros_like(targets)
        for i, n in enumerate(answer_lengths):
            answer_mask[i, longest - n:] = 1
        answer_mask = answer_mask * inputs["attention_mask"][:, -longest:]
        return answer_nll_from_logits(logits, targets, answer_mask)

    @torch.no_grad()
    def _generate_batch(self, prompts: Sequence[IclPrompt]) -> list[str]:
        inputs = self._inputs([self.prompt_text(p) for p in prompts], prompts)
        output = self.model.generate(
            **inputs, max_new_tokens=self.settings.max_new_tokens, do_sample=False, num_beams=1,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        texts = self.tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return [_cut_answer(t, ("\n",)) for t in texts]


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    """``from_pretrained``'s dtype argument: ``dtype`` since transformers 4.56, ``torch_dtype`` before."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def load_vlm(settings: VlmSettings, path: str, device: Optional[torch.device] = None, kind: TaskKind = VQA) -> VqaVlm:
    """Load the VLM of ``settings`` from the local folder ``path`` (never from a hub), prompting for ``kind``.

    ``device`` overrides ``settings.device`` (e.g. this rank's GPU under torch.distributed).
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"run.vlm.path: model folder not found: {path}")
    device = device or resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    if settings.kind == "causal_lm":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **_dtype_kwarg(dtype)).to(device)
        logger.info("VLM: causal LM from %s (%s, %s)", path, dtype, device)
        return CausalLmVqa(model, tokenizer, settings, device, kind)
    try:
        from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
    except ImportError as exc:  # transformers < 4.49 (the legacy LAVIS environment)
        raise RuntimeError(
            f"run.vlm.kind qwen2_5_vl needs transformers >= 4.49 with Qwen2.5-VL ({exc}); use the modern environment"
        ) from None
    processor_kwargs = {"max_pixels": settings.max_pixels} if settings.max_pixels else {}
    processor = AutoProcessor.from_pretrained(path, local_files_only=True, **processor_kwargs)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, local_files_only=True, **_dtype_kwarg(dtype)).to(device)
    logger.info("VLM: Qwen2.5-VL from %s (%s, %s)", path, dtype, device)
    return Qwen25VlVqa(model, processor, settings, device, kind)


def score_from_nll(nll: torch.Tensor, kind: str) -> torch.Tensor:
    """Beam-search score of a prompt from the answer's mean NLL.

    ``prob_gain`` (Lever-LM's InfoScore): ``exp(-mean NLL)``, the geometric-mean token probability of
    the gold answer; ``logprob_gain``: ``-mean NLL``, its log. A candidate's gain is the difference
    of this score with and without it.
    """
    if kind == "prob_gain":
        return torch.exp(-nll)
    if kind == "logprob_gain":
        return -nll
    raise ValueError(f"unknown score {kind!r}; expected prob_gain or logprob_gain")
