"""Two CPU processes: ``torchrun -m cbam train`` (DDP over gloo on 127.0.0.1), and a rank that dies."""

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from cbam.cli import main
from cbam.train import read_checkpoint

torch.set_num_threads(2)

ARGS = ["--data", "synthetic:40,20", "--batch-size", "8", "--epochs", "1", "--seed", "1", "--no-progress"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_torchrun_two_processes(tmp_path, capsys):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "cbam", "train", *ARGS,
               "--out", str(out), "--dist-timeout", "60"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("epoch 1/1") == 1  # rank 0 logs, rank 1 does not
    metrics = json.loads((out / "metrics.json").read_text())["epochs"]
    assert len(metrics) == 1
    seen = metrics[0]["images_per_second"] * metrics[0]["train_seconds"]
    assert seen == pytest.approx(40)  # 5 batches of 4 on each of the 2 ranks

    # the test accuracy the two ranks summed equals a single-process evaluation of the checkpoint
    assert main(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 20 and report["accuracy"] == metrics[0]["test_accuracy"]
    assert not any(key.startswith("module.") for key in read_checkpoint(out / "checkpoint.pt")["model"])


def _worker(rank: int, port: int, out: str, report: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    if rank == 1:  # dies abruptly in its first training step, as a killed or crashed process would
        torch.nn.functional.cross_entropy = lambda *args, **kwargs: os._exit(3)
    from cbam.train import TrainConfig, train

    try:
        train(TrainConfig(out=out, data="synthetic:40,20", batch_size=8, epochs=1, progress=False, dist_timeout=30))
    except RuntimeError as error:
        with open(report, "w") as file:
            file.write(str(error))
        os._exit(2)


def test_a_dead_rank_stops_the_others_with_an_error(tmp_path):
    context, port = multiprocessing.get_context("spawn"), free_port()
    report = tmp_path / "rank0.txt"
    processes = [context.Process(target=_worker, args=(rank, port, str(tmp_path / "out"), str(report)))
                 for rank in range(2)]
    start = time.monotonic()
    for process in processes:
        process.start()
    for process in processes:
        process.join(90)
    assert [process.exitcode for process in processes] == [2, 3]
    assert time.monotonic() - start < 60  # an error, not a hang until the 30 s timeout and beyond
    message = report.read_text()
    assert message.startswith("rank 0 of 2: distributed training stopped, another rank died or did not answer "
                              "within 30 s (")
    assert "\n" not in message
