"""``cbam bench --device cuda`` and ``cbam.profile.cuda_bench``: its tables' rows, columns and ratios,
strict JSON, the one-line error without CUDA. Run here on the CPU with the host clock (the CUDA timer,
``triton.testing.do_bench``, and peak memory need a GPU). No timing thresholds."""

import json

import pytest
import torch

import cbam
from cbam.cli import main
from cbam.profile import cuda_bench, fused_bench

HAS_TIMM = fused_bench._timm_cbam() is not None


def run(capsys, *argv):
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def table_rows(text: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("|")]


def strict(data) -> dict:
    def refuse(constant):
        raise AssertionError(f"not strict JSON: {constant}")
    return json.loads(json.dumps(data, allow_nan=False), parse_constant=refuse)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
@pytest.mark.parametrize("extra", [[], ["--resnet"], ["--resnet-only", "--compile"]])
def test_device_cuda_without_cuda_is_a_one_line_error(capsys, extra):
    status, out, err = run(capsys, "bench", "--device", "cuda", *extra)
    assert status == 2 and out == ""
    assert err == "cbam bench: error: --device cuda needs a CUDA GPU, and torch.cuda.is_available() is False here\n"


@pytest.mark.parametrize("modes", ["fp16", "fp32,", "", "bf16;fp32"])
def test_bad_modes_is_a_one_line_error(capsys, modes):
    status, out, err = run(capsys, "bench", "--device", "cuda", "--modes", modes)
    assert status == 2 and out == "" and err.count("\n") == 1 and "--modes expects" in err


def test_device_cuda_passes_its_options_to_cuda_bench(capsys, monkeypatch):
    seen = {}
    monkeypatch.setattr(cuda_bench, "require_cuda", lambda: None)

    def fake_run(batch, shapes, modes, **options):
        seen.update(batch=batch, shapes=shapes, modes=modes, **options)
        return cuda_bench.CudaBenchReport(cuda_bench.environment("cpu"), None, None)

    monkeypatch.setattr(cuda_bench, "run", fake_run)
    status, out, err = run(capsys, "bench", "--device", "cuda", "--resnet", "--modes", "bf16-autocast, fp32",
                           "--steps", "7", "--compile", "--graphs")
    assert status == 0 and out.startswith("cpu: torch")
    assert seen["batch"] == 64 and seen["shapes"] == fused_bench.SHAPES and seen["modes"] == ["bf16-autocast", "fp32"]
    assert seen["modules"] and seen["resnet"] and seen["compile"] and seen["steps"] == 7 and seen["resnet_batch"] == 128
    assert seen["device"] == "cuda" and seen["graphs"]
    run(capsys, "bench", "--device", "cuda", "--resnet-only", "--batch", "4", "--shapes", "16x8")
    assert seen["batch"] == 4 and seen["shapes"] == [(16, 8)] and not seen["modules"] and seen["resnet"]
    assert not seen["graphs"] and not seen["compile"] and seen["compile_mode"] == "default"
    run(capsys, "bench", "--device", "cuda", "--resnet-only", "--compile-mode", "reduce-overhead")
    assert seen["compile"] and seen["compile_mode"] == "reduce-overhead"  # a mode implies --compile


def test_compile_modes_agree_and_reach_torch_compile(monkeypatch):
    from cbam.cli import bench

    assert bench.COMPILE_MODES == cuda_bench.COMPILE_MODES
    modes = []
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: modes.append(mode) or model)
    def tiny():
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 1000))

    for mode in ("default", "reduce-overhead"):
        cuda_bench.measure_resnet(tiny, "fp32", batch=2, image_size=8, steps=1, warmup=0, device="cpu", compile=True,
                                  compile_mode=mode)
    assert modes == [None, "reduce-overhead"]
    with pytest.raises(ValueError, match="compile_mode among"):
        cuda_bench.resnet_table(2, compile=True, compile_mode="fast", device="cpu")


def test_save_writes_the_json_next_to_the_tables(capsys, tmp_path):
    path = tmp_path / "bench.json"
    status, out, err = run(capsys, "bench", "--repeats", "1", "--batch", "1", "--shapes", "8x4", "--save", str(path))
    assert status == 0 and "; torch " in out.splitlines()[0] and "| shape C×H² |" in out
    data = json.loads(path.read_text())
    assert data["modules"]["batch"] == 1 and data["resnet"] is None


def test_module_table_rows_ratios_and_markdown():
    table = cuda_bench.module_table(batch=1, shapes=[(16, 8), (8, 4)], device="cpu",
                                    timer=cuda_bench.host_timer(1, warmup=0))
    names = ([cuda_bench.TIMM] if HAS_TIMM else []) + [cuda_bench.REFERENCE, cuda_bench.FUSED, cuda_bench.COPY]
    assert table.modes == list(cuda_bench.MODES) and table.layout == "channels_last"
    groups = {}
    for row in table.rows:
        groups.setdefault((row.mode, row.channels), []).append(row)
    assert list(groups) == [(m, c) for m in cuda_bench.MODES for c in (16, 8)]
    for rows in groups.values():
        assert [r.name for r in rows] == names
        copy, found = rows[-1], {r.name: r for r in rows}
        assert copy.train_ms is None and copy.forward_vs_copy == 1.0
        for r in rows[:-1]:
            assert r.forward_ms > 0 and r.train_ms > 0
            assert r.forward_vs_copy == pytest.approx(r.forward_ms / copy.forward_ms)
            assert r.train_vs_copy == pytest.approx(r.train_ms / copy.forward_ms)
            assert r.forward_vs_compiled is None and r.train_vs_compiled is None  # not compiled off CUDA
            if HAS_TIMM:
                timm = found[cuda_bench.TIMM]
                assert r.train_vs_timm == pytest.approx(timm.train_ms / r.train_ms)
        ours = found[cuda_bench.FUSED]
        assert ours.engine in ("torch", "cpp") and isinstance(ours.fused, bool)
    strict(table.as_dict())
    text = cuda_bench.format_module_table(table)
    lines = table_rows(text)
    header = ["shape C×H²", "module", "engine", "forward ms", "× copy", "× timm", "× compiled", "fwd+bwd ms",
              "× copy", "× timm", "× compiled"]
    assert lines[0] == header and lines.count(header) == len(cuda_bench.MODES)
    assert all(len(line) == len(header) for line in lines)
    assert text.count("bf16-autocast, batch 1, channels_last (given timer, ms)") == 1


def test_graphs_time_timm_and_ours_again_by_the_replay_timer():
    """``graphs``: timm's module and ours once more, by the replay timer (on CUDA, CUDA graph replays), with
    their own rows and ratios; the eager rows stay as they were."""
    replayed = []

    def replay(fn):
        fn()
        replayed.append(fn)
        return 0.5 * (1 + len(replayed))  # 1.0, 1.5, ...: each row's times told apart

    table = cuda_bench.module_table(batch=1, shapes=[(8, 4)], modes=["bf16-autocast"], device="cpu",
                                    timer=cuda_bench.host_timer(1, warmup=0), graphs=True, replay_timer=replay)
    found = {r.name: r for r in table.rows}
    graphed = [cuda_bench.GRAPHED[name] for name in ([cuda_bench.TIMM] if HAS_TIMM else []) + [cuda_bench.FUSED]]
    assert [r.name for r in table.rows][-len(graphed) - 1:] == [*graphed, cuda_bench.COPY]
    assert [(found[n].forward_ms, found[n].train_ms) for n in graphed] == [(1.0 + i, 1.5 + i) for i in
                                                                           range(len(graphed))]
    ours, copy = found[cuda_bench.GRAPHED[cuda_bench.FUSED]], found[cuda_bench.COPY]
    assert ours.forward_vs_copy == pytest.approx(ours.forward_ms / copy.forward_ms)
    assert ours.engine == found[cuda_bench.FUSED].engine and ours.fused == found[cuda_bench.FUSED].fused
    if HAS_TIMM:
        replayed_timm = found[cuda_bench.GRAPHED[cuda_bench.TIMM]]
        assert ours.train_vs_timm == pytest.approx(replayed_timm.train_ms / ours.train_ms)  # like with like
    assert len(replayed) == 2 * len(graphed)


def test_module_table_rejects_unknown_modes():
    with pytest.raises(ValueError, match="modes among fp32, bf16, bf16-autocast"):
        cuda_bench.module_table(batch=1, shapes=[(8, 4)], modes=["fp16"], device="cpu")


def test_resnet_table_rows_are_ratios_to_their_plain_twin(monkeypatch):
    monkeypatch.setattr(cuda_bench, "resnet50", cbam.models.resnet18)  # the same protocol, a smaller net
    monkeypatch.setattr(cuda_bench, "_timm_resnet50", lambda: lambda: cbam.models.resnet18(preset="official"))
    table = cuda_bench.resnet_table(batch=2, image_size=32, steps=1, warmup=0, precisions=["fp32"], device="cpu")
    names = [cuda_bench.PLAIN, cuda_bench.OURS, cuda_bench.TIMM_NET]
    assert [(r.precision, r.name) for r in table.rows] == [("fp32", n) for n in names]  # bf16 autocast: slow here
    for precision in ["fp32"]:
        plain, *others = [r for r in table.rows if r.precision == precision]
        assert plain.train_vs_plain == plain.inference_vs_plain == 1.0
        for r in others:
            assert r.train_vs_plain == pytest.approx(r.train_ms / plain.train_ms)
            assert r.inference_vs_plain == pytest.approx(r.inference_ms / plain.inference_ms)
            assert r.peak_gb is None and r.peak_vs_plain is None and r.graph_breaks is None and not r.compiled
    strict(table.as_dict())
    lines = table_rows(cuda_bench.format_resnet_table(table))
    assert lines[0] == ["model", "precision", "compiled", "train step ms", "vs plain", "peak GB", "vs plain",
                        "inference ms", "vs plain", "graph breaks"]
    assert [line[0] for line in lines[2:]] == names and lines[2][4] == "+0%"


def test_resnet_table_without_the_peer_or_with_a_bad_precision(monkeypatch):
    monkeypatch.setattr(cuda_bench, "resnet50", cbam.models.resnet18)
    monkeypatch.setattr(cuda_bench, "_timm_resnet50", lambda: None)
    table = cuda_bench.resnet_table(batch=2, image_size=32, steps=1, warmup=0, precisions=["bf16-autocast"],
                                    device="cpu")
    assert [(r.precision, r.name) for r in table.rows] == [("bf16-autocast", cuda_bench.PLAIN),
                                                           ("bf16-autocast", cuda_bench.OURS)]
    assert table.notes == ["timm is not installed: no timm peer"]
    with pytest.raises(ValueError, match="precisions among bf16-autocast, fp32"):
        cuda_bench.resnet_table(precisions=["bf16"], device="cpu")


def test_goals_read_our_rows_against_the_issue_limits():
    row = cuda_bench.CudaModuleRow
    modules = cuda_bench.CudaModuleTable(
        [row("bf16", 256, 56, cuda_bench.FUSED, 0.2, 0.9, 2.0, 9.0, 4.0, 6.0, 3.0, 2.0, "triton", True),
         row("bf16", 2048, 7, cuda_bench.FUSED, 0.2, 0.9, 9.0, 20.0, None, 6.0, None, None, "triton", True),
         row("bf16-autocast", 256, 56, cuda_bench.FUSED, 0.2, 0.9, 9.0, 20.0, 1.0, 1.0, 1.0, 1.0, "triton", True),
         row("bf16", 256, 56, cuda_bench.TIMM, 0.2, 0.9, 9.0, 20.0, 1.0, 1.0, 1.0, 1.0)],
        64, "channels_last", ["bf16"], "cuda", "do_bench")
    net = cuda_bench.CudaResNetRow
    resnet = cuda_bench.CudaResNetTable(
        [net("fp32", cuda_bench.PLAIN, False, 50.0, 17.0, 10.0, 1.0, 1.0, 1.0),
         net("fp32", cuda_bench.OURS, False, 54.0, 18.0, 10.2, 1.08, 18 / 17, 1.02),
         net("fp32", cuda_bench.OURS, True, 60.0, 17.0, 10.0, 1.2, 1.0, 1.0, graph_breaks=0)],
        128, 224, 20, 5, "cuda")
    found = {g.goal: (round(g.value, 3), g.met) for g in cuda_bench.goals(modules, resnet)}
    assert found == {
        "bf16 256×56² forward × copy": (2.0, True), "bf16 256×56² fwd+bwd × copy": (9.0, False),
        "bf16 256×56² fwd+bwd × timm": (6.0, True), "bf16 256×56² fwd+bwd × compiled timm": (2.0, False),
        "bf16 2048×7² fwd+bwd × timm": (6.0, True),
        "ResNet-50 fp32 train step vs plain": (1.08, True), "ResNet-50 fp32 inference vs plain": (1.059, False),
        "ResNet-50 fp32 peak memory vs plain": (1.02, True),
        "ResNet-50 fp32 compiled train step vs plain": (1.2, False),
    }
    report = cuda_bench.CudaBenchReport(cuda_bench.environment("cpu"), modules, resnet)
    text = str(report)
    assert "| goal (issue 15) | measured | limit | met |" in text
    assert "| bf16 256×56² forward × copy | 2.00 | ≤ 3.00 | yes |" in text
    assert len(strict(report.as_dict())["goals"]) == len(found)


class Broken(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))

    def forward(self, x):
        raise RuntimeError("kernel launch failed\nmore detail")


def test_a_failing_module_or_model_is_a_note_not_the_end(monkeypatch):
    real = cuda_bench._module_set
    monkeypatch.setattr(cuda_bench, "_module_set", lambda *args: {**real(*args), cuda_bench.FUSED: Broken()})
    table = cuda_bench.module_table(batch=1, shapes=[(8, 4)], modes=["fp32"], device="cpu",
                                    timer=cuda_bench.host_timer(1, warmup=0))
    assert cuda_bench.FUSED not in [r.name for r in table.rows] and cuda_bench.REFERENCE in [r.name for r in table.rows]
    assert table.notes[-1] == "fp32 8x4² cbam auto failed, row left out: RuntimeError: kernel launch failed"

    def build(attention="cbam", **options):
        return Broken() if attention == "cbam" else cbam.models.resnet18(attention=None)

    monkeypatch.setattr(cuda_bench, "resnet50", build)
    table = cuda_bench.resnet_table(batch=2, image_size=32, steps=1, warmup=0, precisions=["fp32"], device="cpu",
                                    peer=False)
    assert [r.name for r in table.rows] == [cuda_bench.PLAIN]
    assert table.notes == [f"fp32 {cuda_bench.OURS} failed, row left out: RuntimeError: kernel launch failed"]
