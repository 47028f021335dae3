"""Start-up time of the CLI's fast paths versus a bare interpreter and versus `import lavis`.

`lever-plugins --help`, `validate` and `list` must not import torch or LAVIS (SPEC §9: well under a
second). Prints the median wall time of each command over several runs and its ratio to `import lavis`.

    python benchmarks/cli_startup.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "recipes", "demo", "cirr_gated.yaml")


def _time(command: list[str], repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, cwd=REPO)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    python = sys.executable
    cli = [python, "-m", "lever_plugins.cli"]
    rows = [
        ("python -c pass", [python, "-c", "pass"]),
        ("lever-plugins --help", [*cli, "--help"]),
        ("lever-plugins validate demo", [*cli, "validate", DEMO]),
        ("lever-plugins list", [*cli, "list"]),
        ("import torch", [python, "-c", "import torch"]),
        ("import lavis (with shim)", [python, "-c", "from lever_plugins.compat import import_lavis; import_lavis()"]),
    ]
    times = {name: _time(command, args.repeats) for name, command in rows}
    lavis = times["import lavis (with shim)"]
    print(f"{'command':<30} {'median s':>9} {'x import lavis':>15}")
    for name, seconds in times.items():
        print(f"{name:<30} {seconds:>9.3f} {seconds / lavis:>15.3f}")


if __name__ == "__main__":
    main()
