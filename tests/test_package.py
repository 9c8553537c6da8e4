"""The package itself: a light import and the public names other code relies on."""

import subprocess
import sys


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
