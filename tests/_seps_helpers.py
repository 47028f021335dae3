"""Shapes and builders shared by the SEPS head tests (tests/test_seps*.py)."""
from __future__ import annotations

import itertools

import torch

from lever_plugins import CrossSparseAggrNet

CONFIGS = list(itertools.product([True, False], [True, False]))  # (use_paper_version, use_dual_aggr)
CONFIG_IDS = [f"{'paper' if p else 'code'}-{'dual' if d else 'single'}" for p, d in CONFIGS]

C, N, L_S, L_D = 32, 16, 6, 9


def make_head(paper: bool = True, dual: bool = True, **kwargs) -> CrossSparseAggrNet:
    options = dict(
        embed_size=C, num_patches=N, sparse_ratio=0.5, aggr_ratio=0.5, use_paper_version=paper, use_dual_aggr=dual
    )
    options.update(kwargs)
    return CrossSparseAggrNet(**options)


def make_batch(num_images: int = 5, num_captions: int = 7, has_cls: bool = True, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(num_images, N + int(has_cls), C, generator=g)
    cap = torch.randn(num_captions, L_S, C, generator=g)
    cap_lens = torch.randint(1, L_S + 1, (num_captions,), generator=g)
    cap_lens[0] = L_S
    long_cap = torch.randn(num_images, L_D, C, generator=g)
    long_lens = torch.randint(1, L_D + 1, (num_images,), generator=g)
    return img, cap, cap_lens, long_cap, long_lens
