"""Checkpoints: atomic writes survive an interrupted save; weights-only reads refuse crafted files unrun."""

import errno
import os
import pathlib

import pytest
import torch

from cbam.atomic import write_atomic, write_text_atomic
from cbam.train import checkpoint as checkpoints
from cbam.train.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint

torch.set_num_threads(2)


class Payload:
    """Unpickling this would create ``marker``: a stand-in for code a crafted checkpoint runs."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_round_trip_of_plain_data(tmp_path):
    state = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "epoch": 3, "history": [{"loss": 0.5}],
             "rng": torch.get_rng_state(), "name": None, "pair": (1, 2.5)}
    loaded = read_checkpoint(save_checkpoint(tmp_path / "c.pt", state))
    assert loaded["epoch"] == 3 and loaded["history"] == [{"loss": 0.5}] and loaded["pair"] == (1, 2.5)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"]) and torch.equal(loaded["rng"], state["rng"])


def test_an_interrupted_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"epoch": 1, "w": torch.ones(1000)})
    before = path.read_bytes()

    def half_save(obj, file):  # writes a part of a real checkpoint, then the process "dies"
        file.write(before[: len(before) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints.torch, "save", half_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"epoch": 2, "w": torch.zeros(1000)})
    assert path.read_bytes() == before and read_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temporary file left


def test_atomic_text_needs_an_existing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="directory .*missing.* does not exist"):
        write_text_atomic(tmp_path / "missing" / "a.json", "{}")


def test_atomic_errors_name_the_destination_not_the_temporary_file(tmp_path):
    (tmp_path / "folder").mkdir()
    with pytest.raises(IsADirectoryError, match=r"^cannot write '.*folder': it is a directory$"):
        write_text_atomic(tmp_path / "folder", "{}")
    path = tmp_path / "a.json"
    path.write_text("old")

    def disk_full(file):
        file.write(b"new, in part")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError, match=r"^cannot write '.*a.json': No space left on device$"):
        write_atomic(path, disk_full)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "folder"]


def test_a_crafted_checkpoint_is_refused_and_its_payload_never_runs(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "extra": Payload(marker)}, path)
    with pytest.raises(ValueError, match=r"cannot read checkpoint .*evil.pt.*weights-only loading .* refused it: "
                                         r"Unsupported global"):
        read_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("content, message", [
    (b"not a zip", "cannot read checkpoint"),
    ([1, 2], "holds no state dict: expected a dict of tensors, or a dict with one under 'model'; got list"),
    ({"model": {"weight": torch.zeros(3, 2)}}, r"does not fit the model: size mismatch for weight"),
    ({"model": {"weight": torch.zeros(2, 2)}}, r"1 missing and 0 unexpected keys \(first: missing 'bias'\)"),
])
def test_load_checkpoint_errors(tmp_path, content, message):
    path = tmp_path / "c.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(ValueError, match=message):
        load_checkpoint(torch.nn.Linear(2, 2), path)


def test_load_checkpoint_loads_strictly(tmp_path):
    source, target = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    save_checkpoint(tmp_path / "c.pt", {"model": source.state_dict(), "epoch": 1})
    load_checkpoint(target, tmp_path / "c.pt")
    assert torch.equal(target.weight, source.weight) and torch.equal(target.bias, source.bias)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(target, tmp_path / "none.pt")
