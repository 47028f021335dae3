"""A demo training step on a quiet machine and beside one competing CPU-bound process, by thread count.

Times tiny-CIR training steps (the demo model and batch) with torch using 1 thread, 2 threads, and what
``run.num_threads: auto`` picks, first on a quiet machine, then while another process spins on one core.
The demos ship ``num_threads: 1``; the target is a step within 1.5x of its quiet time under that load.

    python benchmarks/threads_under_load.py
"""
from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _spin(stop) -> None:
    while not stop.is_set():
        sum(i * i for i in range(10_000))


def _step_times(threads: int, steps: int = 12) -> float:
    import torch

    from lever_plugins.compat import import_lavis

    import_lavis()
    from lever_plugins.models.blip2_cir import Blip2CirModel

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = Blip2CirModel.from_config({"arch": "lever_blip2_cir", "model_type": "tiny", "use_gated_fusion": True,
                                       "gated_fusion": {"num_heads": 4}})
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(1)
    batch = {"reference_image": torch.randn(32, 3, 64, 64, generator=generator),
             "target_image": torch.randn(32, 3, 64, 64, generator=generator), "text_input": ["make it blue"] * 32}
    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        model(batch)["loss"].backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def main() -> None:
    from lever_plugins.runners.threads import choose_num_threads

    auto, why = choose_num_threads("auto")
    settings = sorted({1, 2, auto})
    quiet = {n: _step_times(n) for n in settings}
    stop = mp.Event()
    spinner = mp.Process(target=_spin, args=(stop,))
    spinner.start()
    try:
        time.sleep(1.0)
        loaded = {n: _step_times(n) for n in settings}
        auto_loaded, why_loaded = choose_num_threads("auto")
    finally:
        stop.set()
        spinner.join()
    print(f"machine: {os.cpu_count()} cores; auto picks {auto} quiet ({why}), {auto_loaded} under load ({why_loaded})")
    print("| threads | quiet step (ms) | beside one busy process (ms) | slow-down |")
    print("| ---: | ---: | ---: | ---: |")
    for n in settings:
        print(f"| {n} | {1000 * quiet[n]:.0f} | {1000 * loaded[n]:.0f} | {loaded[n] / quiet[n]:.2f}x |")


if __name__ == "__main__":
    main()
