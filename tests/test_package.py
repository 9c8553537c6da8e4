"""The package itself: a light import and the public names other code relies on."""

import os
import subprocess
import sys

import pytest
import torch

import cbam
from cbam.cli import main


def test_import_is_light():
    """``import cbam`` pulls in torch only: no torchvision, matplotlib or timm."""
    heavy = "{'torchvision', 'matplotlib', 'timm'}"
    code = f"import sys, cbam; print(sorted({{m.split('.')[0] for m in sys.modules}} & {heavy}))"
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert found.strip() == "[]"


def test_public_names():
    import cbam

    for name in ("CBAM", "ChannelAttention", "SpatialAttention", "AttentionMaps", "ParallelCBAM", "LightCBAM",
                 "CrossLayerCBAM", "DynamicCBAM", "add_cbam", "models", "functional", "convert", "presets"):
        assert hasattr(cbam, name), name
    assert callable(cbam.convert.from_timm) and callable(cbam.convert.from_official)


def test_tools_load_on_first_use():
    code = ("import sys, cbam; assert 'cbam.viz' not in sys.modules; "
            "assert callable(cbam.viz.capture_attention) and callable(cbam.debug.trace_shapes) "
            "and callable(cbam.profile.cost)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_ctrl_c_while_the_command_imports_torch_is_one_line(tmp_path):
    """Most of the ``cbam`` command's start-up is ``import torch``; a Ctrl-C there ends as an interrupted command.

    A Ctrl-C is Python's SIGINT handler raising ``KeyboardInterrupt`` in whatever runs, so a ``torch`` package
    first on ``PYTHONPATH`` whose import raises it is the keypress at a fixed point, with no timing (a real
    SIGINT sent to the process could land before or after the import). The script runs as pip generates it
    for the entry point pyproject.toml declares, ``_cbam_cli:main``.
    """
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise KeyboardInterrupt\n")
    path = [str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    script = "import sys; from _cbam_cli import main; sys.exit(main())"
    result = subprocess.run([sys.executable, "-c", script, "trace"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert (result.returncode, result.stderr) == (130, "cbam: interrupted\n")


def test_version_prints_cbam_and_torch(capsys):
    with pytest.raises(SystemExit) as ended:
        main(["--version"])
    assert ended.value.code == 0
    assert capsys.readouterr().out == f"cbam {cbam.__version__} (torch {torch.__version__})\n"
