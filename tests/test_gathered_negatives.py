"""Scale-out does not change the science: 2 processes x B give the loss and the update of 1 process x 2B.

Each worker is a real gloo process group on this machine (torch.multiprocessing.spawn, file store);
the model is wrapped in DDP exactly as the runner does on CPU, takes one SGD step on its half of a
fixed batch, and the mean loss over ranks and the updated weights are compared with one process
stepping on the whole batch.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lever_plugins.compat import import_lavis

import_lavis()
pytestmark = pytest.mark.lavis

WORLD = 2
LR = 0.5


def cir_model(gather: bool = True):
    from lever_plugins.models.blip2_cir import Blip2CirModel

    torch.manual_seed(0)
    model = Blip2CirModel.from_config({"arch": "lever_blip2_cir", "model_type": "tiny", "use_gated_fusion": True,
                                       "gated_fusion": {"num_heads": 4, "alpha_init": 0.5}})
    model.gather_negatives = gather
    return model


def cir_batch(size: int = 8) -> dict:
    generator = torch.Generator().manual_seed(3)
    words = ["make it blue", "move it to the left", "change it to a square", "paint it red and put it on top"]
    return {
        "reference_image": torch.randn(size, 3, 64, 64, generator=generator),
        "target_image": torch.randn(size, 3, 64, 64, generator=generator),
        "text_input": [words[i % len(words)] + " " * i for i in range(size)],
    }


SEPS_CAPTIONS = ["a red circle and a blue square", "a green cross on the left", "a yellow triangle",
                 "a purple diamond at the top", "a blue circle", "an orange square on the right and a red cross",
                 "a green triangle at the bottom", "a red diamond"]
SEPS_DENSE = ["a red circle on the left and a blue square at the top", "a green cross on the left and a red square",
              "a yellow triangle on the right", "a purple diamond at the top and a green circle on the right",
              "a blue circle at the bottom", "an orange square and a red cross on the right"]
# captions 0/4 and 1/5 share an image across the two ranks' halves: positives by id across ranks
SEPS_IMAGE_IDS = [0, 1, 2, 3, 0, 1, 4, 5]


def seps_model(gather: bool = True):
    from lever_plugins.models.blip2_seps import Blip2SepsModel

    torch.manual_seed(0)
    model = Blip2SepsModel.from_config({"arch": "lever_blip2_seps", "model_type": "tiny", "loss_itc_weight": 0.5})
    model.gather_negatives = gather
    return model


def seps_batch() -> dict:
    generator = torch.Generator().manual_seed(5)
    images = torch.randn(6, 3, 64, 64, generator=generator)
    return {
        "image": images[SEPS_IMAGE_IDS],
        "text_input": SEPS_CAPTIONS,
        "dense_text": [SEPS_DENSE[i] for i in SEPS_IMAGE_IDS],
        "image_id": torch.tensor(SEPS_IMAGE_IDS),
    }


MODELS = {"cir": (cir_model, cir_batch), "seps": (seps_model, seps_batch)}


def local_part(batch: dict, rank: int, world: int) -> dict:
    size = len(batch["text_input"]) // world
    part = slice(rank * size, (rank + 1) * size)
    return {key: value[part] for key, value in batch.items()}


def sgd_step(model, batch) -> float:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    out = model(batch)
    out["loss"].backward()
    optimizer.step()
    return float(out["loss"].detach())


def _worker(rank: int, world: int, init_file: str, out_dir: str, gather: bool, kind: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        build_model, build_batch = MODELS[kind]
        model = build_model(gather)
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=None)
        loss = sgd_step(ddp, local_part(build_batch(), rank, world))
        losses = [None] * world
        dist.all_gather_object(losses, loss)
        if rank == 0:
            torch.save({"losses": losses, "state": model.state_dict()}, os.path.join(out_dir, "result.pt"))
    finally:
        dist.destroy_process_group()


def run_two_processes(tmp_path, gather: bool, kind: str = "cir") -> dict:
    mp.spawn(_worker, args=(WORLD, str(tmp_path / "store"), str(tmp_path), gather, kind), nprocs=WORLD, join=True)
    return torch.load(tmp_path / "result.pt", weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_two_processes_equal_one_process_on_the_whole_batch(tmp_path, kind):
    build_model, build_batch = MODELS[kind]
    result = run_two_processes(tmp_path, gather=True, kind=kind)
    single = build_model()
    single_loss = sgd_step(single, build_batch())
    assert sum(result["losses"]) / WORLD == pytest.approx(single_loss, abs=1e-5)
    single_state, initial = single.state_dict(), build_model().state_dict()
    changed = 0
    for key, value in result["state"].items():
        torch.testing.assert_close(value, single_state[key], atol=2e-6, rtol=1e-5, msg=key)
        changed += int(not torch.equal(value, initial[key]))
    assert changed > 50  # the step really moved the weights (the comparison is not of untouched tensors)


@pytest.mark.slow
def test_cir_without_gathering_each_rank_sees_only_its_own_negatives(tmp_path):
    result = run_two_processes(tmp_path, gather=False)
    batch = cir_batch()
    local = []
    for rank in range(WORLD):
        model = cir_model(gather=False)
        with torch.no_grad():
            local.append(float(model(local_part(batch, rank, WORLD))["loss"]))
    assert result["losses"] == pytest.approx(local, abs=1e-5)
    with torch.no_grad():
        whole = float(cir_model()(batch)["loss"])
    assert abs(sum(local) / WORLD - whole) > 1e-3  # and that is a different loss: the reason to gather
