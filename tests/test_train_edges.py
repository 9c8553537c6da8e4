"""``cbam.train`` at its edges: DDP evaluation of the saved model, outputs after a crash at the last save,
``predict``'s modes, and the CIFAR reader on batches in the original (Python 2 ``cPickle``) format."""

import io
import json
import multiprocessing
import os
import pickle
import socket
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from cbam.ops import calibration, engines
from cbam.train import Split, TrainConfig, demo, load_split, loop, predict, read_checkpoint, train
from cbam.train import distributed as dist_context
from cbam.train.loop import model_for, restore_scaler
from cbam.train.metrics import write_metrics
from cbam.train.synthetic import SHAPES

torch.set_num_threads(2)


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _evaluate_rank(rank, port, x, y, folder):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    torch.set_num_threads(1)
    context = dist_context.setup("cpu", 30)
    try:
        network = nn.parallel.DistributedDataParallel(_tiny_model())
        network.train()
        network(x[rank::2] * (1 + rank))  # a training step: each rank's BatchNorm sees its own batch
        config = TrainConfig(out=folder, batch_size=4, progress=False)
        result = loop.evaluate(network.module, TensorDataset(x, y), config, context)
        torch.save({"model": network.module.state_dict(), "result": result}, f"{folder}/rank{rank}.pt")
    finally:
        dist_context.teardown(context)


def test_ddp_evaluation_scores_the_model_rank_0_saves(tmp_path):
    """DDP syncs BatchNorm statistics only before a training forward, so after an epoch each rank holds its
    own; the test metrics must be those of rank 0's model, the one the checkpoint keeps."""
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(11, 3, 6, 6, generator=generator), torch.randint(0, 3, (11,), generator=generator)
    context, port = multiprocessing.get_context("fork"), _free_port()
    processes = [context.Process(target=_evaluate_rank, args=(rank, port, x, y, str(tmp_path))) for rank in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
    assert [process.exitcode for process in processes] == [0, 0]
    saved = torch.load(tmp_path / "rank0.pt")
    model = _tiny_model()
    model.load_state_dict(saved["model"])
    with torch.no_grad():
        logits = model.eval()(x)
    expected = F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).double().mean().item()
    for rank in range(2):
        loss, accuracy = torch.load(tmp_path / f"rank{rank}.pt")["result"]
        assert loss == pytest.approx(expected[0], rel=1e-6) and accuracy == pytest.approx(expected[1])


def test_resume_after_a_crash_at_the_last_save_writes_the_metrics(tmp_path, monkeypatch):
    """Killed after the final checkpoint but before its metrics: ``--resume`` has no epoch left to run and
    must still leave metrics.json and metrics.csv as the checkpoint's history says."""
    config = TrainConfig(out=str(tmp_path), data="synthetic:8,2", batch_size=8, epochs=1, progress=False)

    def crash(*args):
        raise KeyboardInterrupt  # stands in for a kill between the checkpoint and the metrics

    def no_matplotlib(*args):
        raise ImportError  # the figure is not what this test is about; it takes seconds

    monkeypatch.setattr(loop, "curves_figure", no_matplotlib)
    with monkeypatch.context() as patch:
        patch.setattr(loop, "write_metrics", crash)
        with pytest.raises(KeyboardInterrupt):
            train(config, log=lambda message: None)
    history = read_checkpoint(tmp_path / "checkpoint.pt")["history"]
    assert not (tmp_path / "metrics.json").exists()
    train(TrainConfig(**{**config.__dict__, "resume": True}), log=lambda message: None)
    assert json.loads((tmp_path / "metrics.json").read_text())["epochs"] == history
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 1 + len(history)


def test_predict_restores_every_module_s_mode():
    model = _tiny_model()
    model.train()
    model[1].eval()  # a frozen BatchNorm inside a training model
    modes = [module.training for module in model.modules()]
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 3, 6, 6, generator=generator), torch.randint(0, 3, (5,), generator=generator)
    statistics = model[1].running_mean.clone()
    result = predict(model, Split(TensorDataset(x, y), ("a", "b", "c"), None, 6), batch_size=2)
    assert [module.training for module in model.modules()] == modes
    assert torch.equal(model[1].running_mean, statistics)
    with torch.no_grad():
        model.eval()
        assert torch.equal(result.predictions, model(x).argmax(1))


class _Py2Pickler(pickle._Pickler):
    """Writes ``str`` and ``bytes`` as Python 2's ``str`` (``BINSTRING``), as ``cPickle`` wrote the CIFAR batches."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj):
        data = obj.encode("latin-1") if isinstance(obj, str) else obj
        short = len(data) < 256
        self.write((pickle.SHORT_BINSTRING + bytes([len(data)]) if short
                    else pickle.BINSTRING + struct.pack("<i", len(data))) + data)
        self.memoize(obj)

    dispatch[str] = dispatch[bytes] = _save_py2_str


def test_cifar10_reads_batches_in_the_original_python_2_format(tmp_path):
    rows = np.random.default_rng(0).integers(0, 256, (3, 3072), dtype=np.uint8)
    file = io.BytesIO()
    _Py2Pickler(file, protocol=2).dump({"batch_label": "testing batch 1 of 1", "labels": [9, 0, 4], "data": rows,
                                        "filenames": ["a.png", "b.png", "c.png"]})
    blob = file.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")  # numpy 1's name
    assert b"cnumpy.core.multiarray\n_reconstruct" in blob and b"X" not in blob[:20]  # no unicode keys
    (tmp_path / "test_batch").write_bytes(blob)
    split = load_split(f"cifar10:{tmp_path}", False)
    image, label = split.dataset[2]
    assert label == 4
    mean = torch.tensor((0.4914, 0.4822, 0.4465), dtype=torch.float64)[:, None, None]
    std = torch.tensor((0.2470, 0.2435, 0.2616), dtype=torch.float64)[:, None, None]
    expected = (torch.from_numpy(rows[2].reshape(3, 32, 32)).double() / 255 - mean) / std
    assert torch.allclose(image.double(), expected, atol=1e-5)


def test_an_enabled_scaler_resumes_a_disabled_one_afresh():
    """A CPU (or float32) run saves a disabled scaler's empty state; resumed where the scaler is enabled (CUDA
    with --amp), it starts afresh instead of failing. A real state still loads."""
    enabled = torch.amp.GradScaler("cpu", enabled=True, init_scale=2.0**10)
    restore_scaler(enabled, torch.amp.GradScaler("cpu", enabled=False).state_dict())
    assert enabled.get_scale() == 2.0**10
    saved = torch.amp.GradScaler("cpu", enabled=True, init_scale=8.0)
    saved.scale(torch.ones(()))  # the scale tensor exists once used
    restore_scaler(enabled, saved.state_dict())
    assert enabled.get_scale() == 8.0


def test_metrics_of_a_diverged_run_are_strict_json(tmp_path):
    """A NaN or infinite loss is written as null (``NaN`` is not JSON: strict parsers refuse the file); the CSV
    keeps the value as Python writes it."""
    row = {"epoch": 1, "lr": 0.1, "train_loss": float("nan"), "train_accuracy": 0.1, "test_loss": float("inf"),
           "test_accuracy": 0.1, "train_seconds": 1.0, "images_per_second": 10.0}
    write_metrics(tmp_path, [row], {"classes": ["a"]})

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    written = json.loads((tmp_path / "metrics.json").read_text(), parse_constant=refuse)
    assert written["epochs"] == [{**row, "train_loss": None, "test_loss": None}]
    assert (tmp_path / "metrics.csv").read_text().splitlines()[1].split(",")[2:5] == ["nan", "0.1", "inf"]


def test_a_numbered_gpu_under_torchrun_is_refused(monkeypatch):
    """``--device cuda:1`` under torchrun would put every rank on GPU 1 (NCCL then fails or deadlocks): refused
    in one line before any process group is joined. (No GPU here: CUDA is reported present.)"""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ValueError, match=r"--device cuda:1: under torchrun each of the 2 processes takes the GPU of "
                                         r"its LOCAL_RANK; pass --device cuda"):
        dist_context.setup("cuda:1")


def test_the_demo_calibrates_before_its_timed_runs(monkeypatch):
    """``impl="auto"`` times its paths once per call shape: the demo does it on a throwaway model before each
    timed run, so that a run built as the demo builds it finds every decision made (else ``--quick``'s 3 steps
    counted the timing as CBAM's overhead: +300% where it is a few percent)."""
    if engines.ENGINES["cpp"].load() is None:
        pytest.skip("calibration applies to the C++ engine only")
    monkeypatch.setenv(calibration.ENV, "1")
    monkeypatch.setattr(calibration, "timer", lambda path, run: 1.0 if path == "fused" else 2.0)
    calibration.clear()
    try:
        config = TrainConfig(out="unused", attention="cbam", **demo.QUICK)
        demo._calibrate(config, len(SHAPES), 64)
        made = len(calibration.decisions())
        assert made > 0
        torch.manual_seed(0)
        model = model_for(config.run_settings(), len(SHAPES))
        model(torch.randn(config.batch_size, 3, 64, 64)).sum().backward()
        assert len(calibration.decisions()) == made
    finally:
        calibration.clear()


@pytest.mark.parametrize("name", loop.OUTPUTS)
def test_a_fresh_run_leaves_a_user_s_file_of_an_output_s_name_alone(tmp_path, name):
    """A folder with ``metrics.json`` (or the csv, the figure) but no checkpoint holds someone else's file:
    refused before any work, the file unchanged."""
    mine = tmp_path / name
    mine.write_bytes(b"my own results\n")
    config = TrainConfig(out=str(tmp_path), data="synthetic:8,2", batch_size=8, epochs=1, progress=False)
    with pytest.raises(FileExistsError, match=f"{name}' exists but no checkpoint.pt"):
        train(config, log=lambda message: None)
    assert mine.read_bytes() == b"my own results\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == [name]
