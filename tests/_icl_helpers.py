"""Shared builders for the ICD-selection tests: VQAv2-format files and tiny random VLMs (no downloads)."""
from __future__ import annotations

import json
import os
from typing import Sequence

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_vqa_files(root, name: str, rows: Sequence[tuple[int, int, str, Sequence[str]]]) -> tuple[str, str]:
    """Write ``rows`` = (question_id, image_id, question, answers) as VQAv2 questions + annotations files."""
    os.makedirs(root, exist_ok=True)
    questions = {"questions": [{"question_id": q, "image_id": i, "question": text} for q, i, text, _ in rows]}
    annotations = {"annotations": [
        {"question_id": q, "image_id": i, "multiple_choice_answer": max(set(a), key=list(a).count),
         "answers": [{"answer": x, "answer_id": k + 1} for k, x in enumerate(a)]}
        for q, i, _, a in rows
    ]}
    qpath, apath = os.path.join(root, f"{name}_questions.json"), os.path.join(root, f"{name}_annotations.json")
    with open(qpath, "w") as handle:
        json.dump(questions, handle)
    with open(apath, "w") as handle:
        json.dump(annotations, handle)
    return qpath, apath


def tiny_causal_lm(kind: str = "llama", seed: int = 0):
    """A random tiny causal LM over the demo vocabulary + its word-level tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from lever_plugins.datasets.demo_vqa import build_demo_tokenizer

    tokenizer = build_demo_tokenizer()
    torch.manual_seed(seed)
    if kind == "gpt2":
        config = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=32, n_layer=2, n_head=4,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        model = GPT2LMHeadModel(config)
    else:
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        model = LlamaForCausalLM(config)
    return model.eval(), tokenizer


def tiny_qwen25_vl(seed: int = 0):
    """A random tiny ``Qwen2_5_VLForConditionalGeneration`` + processor (word-level tokenizer, chat template)."""
    import torch
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import (
        Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, Qwen2TokenizerFast, Qwen2VLImageProcessor,
    )
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    from lever_plugins.datasets.demo_vqa import demo_words

    words = ["<unk>", "\n", "user", "assistant", "system", *demo_words()]
    vocab = {w: i for i, w in enumerate(words + QWEN_SPECIALS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
        pre_tokenizers.Punctuation(behavior="isolated"),
        pre_tokenizers.Split(Regex("[ \t]+"), behavior="removed"),
    ])
    tokenizer = Qwen2TokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<|endoftext|>",
                                   eos_token="<|im_end|>", additional_special_tokens=QWEN_SPECIALS[1:])
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56), tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(), chat_template=QWEN_CHAT_TEMPLATE,
    )
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           fullatt_block_indexes=[0], window_size=56, patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"], bos_token_id=vocab["<|im_start|>"],
        eos_token_id=vocab["<|im_end|>"], pad_token_id=vocab["<|endoftext|>"],
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval(), processor


def parity_tokenizer():
    """Word-level tokenizer over the demo words for the Lever-LM parity test (``tests/test_icl_leverlm_parity.py``).

    Unlike the demo's tokenizer it adds no BOS token, and a capitalised word is always a token of its
    own (``"redQuestion"`` -> ``red``, ``Question``): Lever-LM counts its loss mask on a prompt string
    re-assembled without the join between the last demonstration and the query, and with these two
    properties that string has exactly the token count of the real prefix (see the test's docstring).
    """
    from lever_plugins.datasets.demo_vqa import build_demo_tokenizer

    return build_demo_tokenizer(add_bos=False, split_capitalised=True)


def parity_lm(seed: int = 2024):
    """A tiny Llama built from a config whose every weight is drawn from ``torch.Generator().manual_seed(seed)``
    (norms ``1 + 0.1 N(0,1)``, everything else ``0.3 N(0,1)``, in ``named_parameters()`` order): the same
    weights on any torch / transformers version, without a weights file. Returns ``(model, tokenizer)``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = parity_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.copy_(1 + 0.1 * noise if "norm" in name else 0.3 * noise)
    return model.eval(), tokenizer
