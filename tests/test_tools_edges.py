"""The tools over any nn.Module (debug, profile, tables, atomic) at their edges: cases an audit found failing, each
checked against an expectation worked out independently of the tool."""

import copy
import errno
import os
import re
import stat
from pathlib import Path

import pytest
import torch
from torch import nn

from cbam.atomic import write_atomic
from cbam.debug import check_amp, check_gradients, trace_shapes
from cbam.debug.poison import POISON, poisoned
from cbam.profile import benchmark, saved_bytes
from cbam.tables import format_count, format_table


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


# --- tables -------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [999_499, 999_500, 999_999, 999_999_999, 999_600_000_000])
def test_format_count_rounds_before_choosing_the_suffix(value):
    """Just below a suffix's scale the three digits round up to 1000: that is the next suffix, not ``1e+03k``."""
    text = format_count(value)
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kMGT]?)", text)
    assert match, text
    number, suffix = float(match[1]), match[2]
    assert number < 1000
    scale = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[suffix]
    assert abs(number * scale - value) <= 5e-3 * value  # three significant digits


def test_format_table_without_rows_is_its_header():
    assert format_table(["a", "bb"], []) == "a  bb\n-  --"


def test_trace_whose_root_never_ran_still_prints():
    """A hook of the model's own raises before the trace's first hook: no rows, and the error."""
    model = nn.Linear(2, 2)
    model.register_forward_pre_hook(lambda module, args: (_ for _ in ()).throw(ValueError("refused")))
    trace = trace_shapes(model, torch.randn(1, 2))
    assert not trace.ok and len(trace) == 0
    assert str(trace).endswith("failed: ValueError: refused")


# --- benchmark ----------------------------------------------------------------------------------

def test_benchmark_leaves_batchnorm_statistics_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    before = copy.deepcopy(model.state_dict())
    benchmark(model, torch.randn(2, 3, 8, 8), warmup=1, repeats=2)
    assert model.training
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


def test_benchmark_and_saved_bytes_under_no_grad():
    """The training step needs autograd whatever the caller's grad mode; Linear saves its input (15 floats)."""
    x = torch.randn(3, 5)
    with torch.no_grad():
        assert saved_bytes(nn.Linear(5, 7), x) == 15 * 4
        report = benchmark(nn.Linear(5, 7), x, warmup=0, repeats=1)
        assert not torch.is_grad_enabled()
    row = report.rows[0]
    assert row.train_ms > 0 and row.saved_bytes == 15 * 4


class Product(nn.Module):
    def forward(self, pair):
        return pair[0] * pair[1]  # saves both factors


def test_tensors_nested_in_inputs_are_leaves_too():
    """As with two positional inputs: each factor saved for the other's gradient, 2 x 4 floats."""
    pair = [torch.randn(4), torch.randn(4)]
    assert saved_bytes(Product(), pair) == 2 * 4 * 4
    report = benchmark(Product(), pair, warmup=0, repeats=1)
    assert report.rows[0].train_ms > 0 and report.rows[0].saved_bytes == 2 * 4 * 4


# --- check_amp ----------------------------------------------------------------------------------

def _relative_error(model, inputs, dtype=torch.bfloat16):
    """float32 vs CPU autocast, both from the current RNG state (same dropout masks); the state restored."""
    state = torch.get_rng_state()
    with torch.no_grad():
        reference = model(*inputs)
        torch.set_rng_state(state)
        with torch.autocast("cpu", dtype=dtype):
            amp = model(*inputs).float()
    torch.set_rng_state(state)
    return float((amp - reference).norm() / reference.norm())


def test_check_amp_compares_dropout_masks_that_are_the_same():
    model = nn.Sequential(nn.Linear(64, 64), nn.Dropout(0.5), nn.Linear(64, 8)).train()
    x = torch.randn(16, 64)
    expected = _relative_error(model, (x,))
    state = torch.get_rng_state()
    report = check_amp(model, x)
    assert torch.equal(torch.get_rng_state(), state)
    assert report.ok and report.rel_error == pytest.approx(expected, rel=1e-6)


def test_check_amp_of_a_model_fed_token_ids():
    model = nn.Sequential(nn.Embedding(10, 16), nn.Linear(16, 4))
    ids = torch.tensor([[1, 2, 3], [4, 5, 9]])
    report = check_amp(model, ids)
    assert report.ok and report.device == "cpu" and report.dtype == "bfloat16"
    assert report.rel_error == pytest.approx(_relative_error(model, (ids,)), rel=1e-6)


# --- check_gradients ----------------------------------------------------------------------------

def test_check_gradients_of_a_model_that_changes_its_input_in_place():
    """Inside a network an in-place first layer gets an activation; the checked tensors must not be hit."""
    x = torch.randn(2, 3)
    inplace = check_gradients(nn.Sequential(nn.ReLU(inplace=True), nn.Linear(3, 2)), x)
    plain = check_gradients(nn.Sequential(nn.ReLU(), nn.Linear(3, 2)), x)
    assert inplace.ok and plain.ok
    assert [t.name for t in inplace.tensors] == [t.name for t in plain.tensors]


# --- poisoned -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int64])
def test_poisoned_integers_that_cannot_hold_poison(dtype):
    """POISON where the dtype holds it, else the dtype's largest value: never an overflow error."""
    info = torch.iinfo(dtype)
    expected = POISON if info.min <= POISON else info.max
    with poisoned():
        t = torch.empty(3, dtype=dtype)
        like = torch.empty_like(torch.zeros(2, dtype=dtype))
    assert t.tolist() == [expected] * 3 and like.tolist() == [expected] * 2


# --- write_atomic -------------------------------------------------------------------------------

def test_write_atomic_keeps_the_file_mode(tmp_path):
    """Rewriting a file keeps its permissions, as writing it in place does; a new file gets open()'s."""
    path = tmp_path / "secret.pt"
    path.write_bytes(b"old")
    path.chmod(0o600)
    write_atomic(path, lambda file: file.write(b"new"))
    assert path.read_bytes() == b"new" and stat.S_IMODE(path.stat().st_mode) == 0o600
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    write_atomic(tmp_path / "fresh", lambda file: file.write(b"x"))
    assert stat.S_IMODE(os.stat(tmp_path / "fresh").st_mode) == stat.S_IMODE(plain.stat().st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "plain", "secret.pt"]


def test_write_atomic_writes_through_a_symlink(tmp_path):
    """A link (``latest.pt`` -> a run's file) stays a link; its target gets the new content, atomically."""
    runs = tmp_path / "runs"
    runs.mkdir()
    target = runs / "epoch3.pt"
    target.write_bytes(b"old")
    link = tmp_path / "latest.pt"
    link.symlink_to(target)
    assert write_atomic(link, lambda file: file.write(b"new")) == link
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert target.read_bytes() == b"new" and sorted(p.name for p in runs.iterdir()) == ["epoch3.pt"]
    dangling = tmp_path / "dangling.pt"
    dangling.symlink_to(tmp_path / "missing" / "file.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_atomic(dangling, lambda file: file.write(b"x"))


def test_write_atomic_on_a_read_only_file_system_names_the_destination(tmp_path, monkeypatch):
    """On a read-only file system both the temporary file's creation and its clean-up fail (EROFS even for an
    absent file): the error reported is the first, naming the destination, not the temporary file."""
    def refuse(path, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr("cbam.atomic.open", refuse, raising=False)
    monkeypatch.setattr(Path, "unlink", refuse)
    with pytest.raises(OSError) as raised:
        write_atomic(tmp_path / "model.pt", lambda file: file.write(b"x"))
    assert raised.value.errno is None and str(raised.value) == (
        f"cannot write {str(tmp_path / 'model.pt')!r}: {os.strerror(errno.EROFS)}")
