"""``cbam bench`` and ``cbam.profile.fused_bench``: table rows and columns, strict JSON whose ratios
match its times, one-line errors, the optional peers (timm, C++ engine). No timing thresholds."""

import json
import math
import re
import resource
import subprocess
import sys

import numpy as np
import pytest
import torch

import cbam
from cbam.cli import main
from cbam.ops.engines import cpp, engine_for
from cbam.profile import fused_bench

TINY = ["bench", "--repeats", "1", "--batch", "1", "--shapes", "16x8"]


def run(capsys, *argv):
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def expected_modules() -> list[str]:
    names = ["timm CbamModule"] if fused_bench._timm_cbam() is not None else []
    names += ["cbam reference", "cbam fused, torch ops"]
    return names + (["cbam fused, C++"] if cpp.engine() is not None else []) + ["copy"]


def table_rows(out: str) -> list[list[str]]:
    """The cells of each Markdown table line of ``out``."""
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in out.splitlines()
            if line.startswith("|")]


def strict_json(text: str):
    def refuse(constant):
        raise AssertionError(f"not strict JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def test_bench_prints_one_row_per_module_and_the_copy(capsys):
    status, out, err = run(capsys, *TINY)
    assert status == 0 and err == ""
    header, rule, *rows = table_rows(out)
    label = "timm" if fused_bench._timm_cbam() is not None else "reference"
    assert header == ["shape C×H²", "module", "forward ms", f"× {label}", "× copy", "fwd+bwd ms", f"× {label}",
                      "× copy", "saved / input"]
    assert len(rule) == len(header) and all(len(row) == len(header) for row in rows)
    assert [row[1] for row in rows] == expected_modules()
    assert all(row[0] == "16×8²" for row in rows)
    copy = rows[-1]
    assert copy[4] == "1.0" and copy[5:] == ["", "", "", ""]
    for row in rows[:-1]:
        assert all(cell for cell in row), row  # every module has every number
    means = [line for line in out.split('impl="auto" chose')[0].splitlines() if line.startswith("- ")]
    assert [line.split(":")[0][2:] for line in means] == expected_modules()[:-1]
    assert "ResNet-50" not in out


def test_bench_json_is_strict_with_ratios_of_its_times(capsys):
    status, out, err = run(capsys, "bench", "--repeats", "1", "--batch", "1", "--shapes", "16x8, 8X4", "--json")
    assert status == 0 and err == ""
    data = strict_json(out)
    modules = data["modules"]
    assert data["resnet"] is None and modules["batch"] == 1 and modules["repeats"] == 1
    rows = modules["rows"]
    by_shape = {}
    for row in rows:
        by_shape.setdefault((row["channels"], row["side"]), {})[row["name"]] = row
    assert list(by_shape) == [(16, 8), (8, 4)]
    speedups = {}
    for found in by_shape.values():
        assert list(found) == expected_modules()
        peer, copy = found[modules["peer"]], found["copy"]
        assert copy["forward_ms"] > 0 and copy["train_ms"] is None and copy["forward_vs_copy"] == 1.0
        for name, row in found.items():
            if name == "copy":
                continue
            assert row["forward_ms"] > 0 and row["train_ms"] > 0 and row["saved_per_input"] > 0
            assert row["forward_speedup"] == pytest.approx(peer["forward_ms"] / row["forward_ms"], rel=1e-9)
            assert row["train_speedup"] == pytest.approx(peer["train_ms"] / row["train_ms"], rel=1e-9)
            assert row["forward_vs_copy"] == pytest.approx(row["forward_ms"] / copy["forward_ms"], rel=1e-9)
            assert row["train_vs_copy"] == pytest.approx(row["train_ms"] / copy["forward_ms"], rel=1e-9)
            speedups.setdefault(name, []).append(peer["forward_ms"] / row["forward_ms"])
        assert peer["forward_speedup"] == pytest.approx(1.0) and peer["train_speedup"] == pytest.approx(1.0)
    means = {m["name"]: m["forward"] for m in modules["geometric_means"]}
    assert means == pytest.approx({name: math.sqrt(a * b) for name, (a, b) in speedups.items()}, rel=1e-9)


def test_bench_channels_last_times_channels_last_inputs(capsys, monkeypatch):
    seen = []
    real = fused_bench._forward

    def recording(module, x, amp=False):
        seen.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        return real(module, x, amp)

    monkeypatch.setattr(fused_bench, "_forward", recording)
    status, out, err = run(capsys, *TINY, "--channels-last", "--json")
    assert status == 0 and err == ""
    assert strict_json(out)["modules"]["channels_last"] is True
    assert seen and all(seen)
    seen.clear()
    status, out, err = run(capsys, *TINY)
    assert status == 0 and "fp32 CPU, batch 1;" in out and seen and not any(seen)
    status, out, err = run(capsys, *TINY, "--channels-last")
    assert status == 0 and "fp32 CPU, batch 1, channels-last;" in out


def test_bench_amp_times_bfloat16_inputs_under_cpu_autocast(capsys, monkeypatch):
    """``--amp``: every module's input is bfloat16 and runs under CPU bfloat16 autocast; the fused C++ CBAM reads
    it as stored, so it saves about one input's bytes for backward, the reference about two (its gated copy too)."""
    seen = []
    real = fused_bench._forward

    def recording(module, x, amp=False):
        seen.append((x.dtype, amp))
        return real(module, x, amp)

    monkeypatch.setattr(fused_bench, "_forward", recording)
    status, out, err = run(capsys, "bench", "--repeats", "1", "--batch", "1", "--shapes", "64x16", "--amp", "--json")
    assert status == 0 and err == ""
    modules = strict_json(out)["modules"]  # at 64x16² the saved vectors are a fifth of x's bytes
    assert modules["amp"] is True and seen and set(seen) == {(torch.bfloat16, True)}
    saved = {row["name"]: row["saved_per_input"] for row in modules["rows"]}
    assert saved["cbam reference"] > 1.9
    if cpp.engine() is not None:
        assert 1.0 < saved["cbam fused, C++"] < 1.5
    status, out, err = run(capsys, *TINY, "--amp")
    assert status == 0 and "bf16 input under CPU bf16 autocast, batch 1;" in out


def test_bench_names_the_cpu_and_its_vector_isa(capsys):
    """The first line names the CPU as /proc/cpuinfo does (its first ``model name``) and its AVX2/AVX-512 flags."""
    status, out, err = run(capsys, *TINY)
    first = out.splitlines()[0]
    assert status == 0 and "; torch " in first
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        pytest.skip("no /proc/cpuinfo to compare with")
    model = re.search(r"^model name\s*:\s*(.+)$", info, flags=re.M)
    flags = set(re.search(r"^flags\s*:\s*(.+)$", info, flags=re.M)[1].split()) if "\nflags" in info else set()
    if model:
        assert first.startswith(model[1].strip())
    named = re.search(r"\(([^)]*)\);", first)
    named = set(named[1].split()) if named else set()
    for flag in ("avx2", "avx512f"):
        assert (flag in named) == (flag in flags), flag


def test_bench_amp_on_cuda_is_a_one_line_error(capsys):
    status, out, err = run(capsys, *TINY, "--device", "cuda", "--amp")
    assert status == 2 and out == "" and err.count("\n") == 1 and "--amp is for the CPU tables" in err


def test_bench_channels_last_on_cuda_is_a_one_line_error(capsys):
    status, out, err = run(capsys, *TINY, "--device", "cuda", "--channels-last")
    assert status == 2 and out == "" and err.count("\n") == 1 and "--channels-last is for the CPU tables" in err


@pytest.mark.parametrize("shapes", ["16", "16x", "axb", "16x8,", "0x8", "16x8x2", ""])
def test_bench_bad_shapes_is_a_one_line_error(capsys, shapes):
    status, out, err = run(capsys, "bench", "--repeats", "1", "--shapes", shapes)
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("cbam bench: error: --shapes expects") and "CxH" in err


def test_bench_bad_repeats_is_a_one_line_error(capsys):
    status, out, err = run(capsys, "bench", "--repeats", "0", "--shapes", "16x8")
    assert status == 2 and out == "" and err.count("\n") == 1 and "--repeats" in err


def test_parse_shapes():
    assert fused_bench.parse_shapes("256x56,2048x7") == [(256, 56), (2048, 7)]
    assert fused_bench.parse_shapes(" 16 X 8 , 4×2") == [(16, 8), (4, 2)]


def test_geometric_mean_is_exp_of_mean_log():
    values = np.random.default_rng(0).uniform(0.05, 20.0, size=11)
    expected = float(np.exp(np.log(values).mean()))
    assert fused_bench.geometric_mean(values.tolist()) == pytest.approx(expected, rel=1e-12)
    assert fused_bench.geometric_mean([2.0, 0.5]) == pytest.approx(1.0, rel=1e-12)
    for bad in ([], [1.0, 0.0], [1.0, -2.0], [float("inf")], [float("nan")]):
        with pytest.raises(ValueError, match="positive"):
            fused_bench.geometric_mean(bad)


def test_without_timm_the_ratios_are_over_the_reference(capsys, monkeypatch):
    monkeypatch.setattr(fused_bench, "_timm_cbam", lambda: None)
    status, out, err = run(capsys, *TINY)
    assert status == 0 and err == ""
    assert "Note: timm is not installed" in out and "× reference" in out and "timm CbamModule" not in out
    header, _, *rows = table_rows(out)
    assert rows[0][1] == "cbam reference" and rows[0][3] == "1.00" and rows[0][6] == "1.00"
    assert "Geometric mean speed-up over cbam reference" in out


def test_without_the_cpp_engine_its_row_is_skipped_with_a_note(capsys, monkeypatch):
    monkeypatch.setattr(cpp, "engine", lambda: None)
    status, out, err = run(capsys, *TINY, "--json")
    assert status == 0 and err == ""
    data = strict_json(out)
    names = [row["name"] for row in data["modules"]["rows"]]
    assert "cbam fused, C++" not in names and "cbam fused, torch ops" in names
    assert any("C++ engine is unavailable" in note for note in data["modules"]["notes"])


def test_torch_ops_cbam_restores_the_engine_and_matches_fused():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 5, 5)
    chosen = engine_for(x)
    ours = fused_bench.TorchOpsCBAM(16, preset="timm", impl="fused")
    fused = cbam.CBAM(16, preset="timm", impl="fused")
    fused.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours.eval()(x), fused.eval()(x))
    assert engine_for(x) == chosen
    with pytest.raises(ValueError):
        ours(torch.randn(2, 15, 5, 5))
    assert engine_for(x) == chosen


@pytest.mark.parametrize(("channels_last", "amp"), [(False, False), (True, False), (False, True)])
def test_resnet_overhead_rows_and_table(channels_last, amp):
    table = fused_bench.resnet_overhead(batch=1, repeats=1, image_size=64, channels_last=channels_last, amp=amp)
    assert table.channels_last is channels_last and table.amp is amp
    assert ("CPU bf16 autocast" in fused_bench.format_resnet_table(table)) is amp
    names = ["none", "cbam auto", "cbam fused, block ops separate", "cbam reference"]
    assert [r.name for r in table.rows] == names
    for r in table.rows:
        assert r.train_s > 0 and r.inference_s > 0
        assert r.train_overhead == pytest.approx(r.train_s / table.rows[0].train_s - 1, rel=1e-9, abs=1e-12)
    text = fused_bench.format_resnet_table(table)
    header, rule, *rows = table_rows(text)
    assert header == ["attention", "train s", "overhead", "inference s", "overhead"]
    assert [row[0] for row in rows] == names
    assert rows[0][2] == rows[0][4] == "+0.0% (+0.0% .. +0.0%)"
    assert json.dumps(table.as_dict(), allow_nan=False)


def test_resnet_overheads_are_paired_within_rounds():
    """The overhead is the median of round-by-round ratios (computed here by hand)."""
    samples = {"none": [1.0, 2.0, 4.0, 2.0, 1.0], "cbam": [1.1, 2.4, 4.0, 2.2, 1.1]}  # ratios .1 .2 0 .1 .1
    median, (low, high) = fused_bench._paired_overheads(samples, "cbam")
    assert median == pytest.approx(0.1)
    assert 0.0 <= low <= median <= high <= 0.2


def test_bench_says_which_path_auto_took_per_shape(capsys):
    status, out, err = run(capsys, *TINY)
    path = "fused" if cpp.engine() is not None else "reference"  # the suite runs with CBAM_CALIBRATE=0
    assert status == 0 and 'impl="auto" chose (CBAM_CALIBRATE=0: fused wherever' in out
    assert f"- 16×8²: inference {path}, training {path}" in out


@pytest.mark.skipif(cpp.engine() is None, reason="the calibration times the C++ engine's path")
def test_auto_choice_reports_the_calibration(monkeypatch):
    from cbam.ops import calibration

    monkeypatch.setenv("CBAM_CALIBRATE", "1")
    monkeypatch.setattr(calibration, "timer", lambda path, go: (go(), 1.0 if path == "reference" else 2.0)[1])
    calibration.clear()
    x = torch.randn(1, 16, 8, 8)
    choice = fused_bench.auto_choice(16, 8, x, x.clone().requires_grad_())
    calibration.clear()
    assert (choice.inference, choice.training) == ("reference", "reference")
    assert choice.inference_ms == choice.training_ms == (2000.0, 1000.0)
    text = fused_bench.format_auto_choices([choice])
    assert text.startswith('impl="auto" chose (one-time calibration')
    assert "- 16×8²: inference reference (fused 2000.00 ms, reference 1000.00 ms), training reference" in text


def test_a_failed_save_keeps_the_old_file_and_the_printed_results(tmp_path):
    """Writing --save fails half-way (a 2 KiB file-size limit): the old file stays whole, the tables are out."""
    saved = tmp_path / "saved.json"
    saved.write_text(json.dumps({"precious": "x" * 5000}))
    before = saved.read_bytes()
    result = subprocess.run(
        [sys.executable, "-m", "cbam", *TINY, "--save", str(saved)], capture_output=True, text=True, timeout=300,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048)),
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr == f"cbam bench: error: cannot write {str(saved)!r}: File too large\n"
    assert saved.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["saved.json"]
    assert [row[1] for row in table_rows(result.stdout)[2:]] == expected_modules()


@pytest.mark.parametrize("save, message", [
    ("missing/x.json", "cannot write '{d}/missing/x.json': directory '{d}/missing' does not exist"),
    ("folder", "cannot write '{d}/folder': it is a directory"),
])
def test_a_bad_save_path_fails_before_any_timing(capsys, monkeypatch, tmp_path, save, message):
    (tmp_path / "folder").mkdir()
    timed = []
    monkeypatch.setattr(fused_bench, "run", lambda *args, **kwargs: timed.append(args))
    status, out, err = run(capsys, *TINY, "--save", str(tmp_path / save))
    assert status == 2 and out == "" and timed == []
    assert err == f"cbam bench: error: {message.format(d=tmp_path)}\n"
