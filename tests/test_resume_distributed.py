"""Issue-5 guarantees on the CIR demo: kill -9 + --resume equals an uninterrupted run; 2 processes
evaluate to the same metrics as 1."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.lavis]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "recipes", "demo", "cirr_gated.yaml")
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # bitwise-deterministic CPU runs


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from lever_plugins.datasets.demo_cirr import generate_demo_cirr

    root = tmp_path_factory.mktemp("demo_cirr")
    generate_demo_cirr(root, image_size=64)
    return str(root)


def _args(demo_data, output_dir, epochs=3):
    sets = [
        f"run.max_epoch={epochs}", "run.batch_size_train=16", "run.batch_size_eval=32", "run.progress_bar=false",
        "datasets.lever_cirr.max_train_samples=64", "datasets.lever_cirr.max_eval_samples=24",
        "datasets.lever_cirr.splits=[train,val]", "run.test_splits=[]", "run.save_gate_maps=0",
        f"datasets.lever_cirr.root={demo_data}", f"run.output_dir={output_dir}",
    ]
    return [a for s in sets for a in ("--set", s)]


def _run(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "lever_plugins.cli", "run", DEMO, *args],
                            cwd=REPO, env=ENV, capture_output=True, text=True)
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def _records(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, demo_data):
    straight = tmp_path / "straight"
    _run(*_args(demo_data, straight))

    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "lever_plugins.cli", "run", DEMO, *_args(demo_data, killed)],
                               cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (killed / "checkpoint_last.pth").exists():
        assert process.poll() is None, "run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    first_epoch = torch.load(killed / "checkpoint_last.pth", weights_only=True)["epoch"]
    assert first_epoch < 2, "the kill came too late to interrupt training"

    refused = _run(*_args(demo_data, killed), check=False)
    assert refused.returncode == 2 and "already holds a run" in refused.stderr
    _run(*_args(demo_data, killed), "--resume")

    expected = torch.load(straight / "checkpoint_last.pth", weights_only=True)
    resumed = torch.load(killed / "checkpoint_last.pth", weights_only=True)
    assert resumed["epoch"] == expected["epoch"] == 2
    assert expected["model"].keys() == resumed["model"].keys()
    for key, value in expected["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    epochs = [(r["epoch"], r["split"]) for r in _records(killed)]
    assert epochs == [(e, s) for e in range(3) for s in ("train", "val")]
    assert _records(killed) == _records(straight)


def test_two_processes_evaluate_like_one(tmp_path, demo_data):
    trained = tmp_path / "trained"
    _run(*_args(demo_data, trained, epochs=1))
    checkpoint = trained / "checkpoint_best.pth"
    evaluate = ["--set", "run.evaluate=true", "--set", f"run.resume_ckpt_path={checkpoint}"]
    _run(*_args(demo_data, tmp_path / "one"), *evaluate)
    _run(*_args(demo_data, tmp_path / "two"), *evaluate, "--nproc", "2")
    one, two = _records(tmp_path / "one"), _records(tmp_path / "two")
    assert [r["split"] for r in one] == ["val"] and one == two
    assert one[0]["recall_at50"] > 0


def test_failed_resume_with_an_incompatible_recipe_loses_nothing(tmp_path, demo_data):
    out = tmp_path / "run"
    first = _run(*_args(demo_data, out, epochs=1))
    assert "== run summary" in first.stdout and f"output folder: {out}" in first.stdout
    assert "best epoch 0 on val (checkpoint_best.pth):" in first.stdout
    before = {name: (out / name).read_bytes() for name in
              ("recipe.yaml", "metrics.jsonl", "metrics.csv", "checkpoint_last.pth", "checkpoint_best.pth")}
    failed = _run(*_args(demo_data, out, epochs=2), "--resume", "--set", "model.use_gated_fusion=false", check=False)
    assert failed.returncode != 0 and "gated_fusion" in failed.stdout + failed.stderr
    for name, content in before.items():
        assert (out / name).read_bytes() == content, f"{name} was modified by a start that failed"
    assert not list(out.glob("recipe.before-resume-*.yaml"))
    # the run is still what it was: a compatible resume continues it and only then updates its recipe
    _run(*_args(demo_data, out, epochs=2), "--resume")
    assert [r["epoch"] for r in _records(out) if r["split"] == "train"] == [0, 1]
    kept = list(out.glob("recipe.before-resume-*.yaml"))
    assert len(kept) == 1 and "max_epoch: 1" in kept[0].read_text() and "max_epoch: 2" in (out / "recipe.yaml").read_text()
    assert not (out / "recipe.pending.yaml").exists()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _two_nodes(*args, port: int):
    """Two 'nodes' on this machine: two launches of the CLI, one process each, joined by torchrun."""
    nodes = [subprocess.Popen([sys.executable, "-m", "lever_plugins.cli", "run", DEMO, *args, "--nnodes", "2",
                               "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port)],
                              cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
             for rank in range(2)]
    return nodes


def test_two_nodes_evaluate_like_one(tmp_path, demo_data):
    trained = tmp_path / "trained"
    _run(*_args(demo_data, trained, epochs=1))
    evaluate = ["--set", "run.evaluate=true", "--set", f"run.resume_ckpt_path={trained / 'checkpoint_best.pth'}"]
    _run(*_args(demo_data, tmp_path / "one"), *evaluate)
    nodes = _two_nodes(*_args(demo_data, tmp_path / "two"), *evaluate, port=_free_port())
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "torch.distributed: 2 processes, backend gloo" in outputs[0]  # one group across the two 'nodes'
    one, two = _records(tmp_path / "one"), _records(tmp_path / "two")
    assert [r["split"] for r in one] == ["val"] and one == two


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    parent = int(handle.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(parent, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def test_a_node_that_dies_stops_the_other_with_a_clear_error(tmp_path, demo_data):
    out = tmp_path / "run"
    nodes = _two_nodes(*_args(demo_data, out, epochs=50), "--set", "run.dist_timeout_s=60", port=_free_port())
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").is_file() and time.time() < deadline:  # training is under way
        assert nodes[0].poll() is None and nodes[1].poll() is None
        time.sleep(0.5)
    for pid in _descendants(nodes[1].pid) + [nodes[1].pid]:  # node 1 disappears: CLI, torchrun agent, worker
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    killed_at = time.time()
    output = nodes[0].communicate(timeout=60 + 90)[0]
    assert nodes[0].returncode != 0 and time.time() - killed_at < 60 + 90
    assert "node 0 of 2: its 1 training process(es) failed" in output and "did another node stop?" in output
