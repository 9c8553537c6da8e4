"""``cbam check``: gradients of every attention module in float64, and the model under autocast."""

from __future__ import annotations

import argparse

import torch
from torch import Tensor, nn

from ..tables import format_shape, format_table
from .model_spec import add_input_arguments, add_model_arguments, build_model_and_input, print_report

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
CROP = 5  # spatial size of the activations the gradient checks run on


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "check", help="gradient and mixed-precision checks",
        description="Check the backward of every attention module on its own input in the model (cropped to "
                    f"batch 1 and at most {CROP} per spatial dim), in a float64 copy; then compare the model "
                    "(eval mode) under autocast with float32 and name the first module that goes inf/NaN. "
                    "Exit status 1 if a check fails.",
    )
    add_model_arguments(parser)
    add_input_arguments(parser)
    parser.add_argument("--amp-dtype", choices=tuple(AMP_DTYPES), default=None,
                        help="autocast dtype (default bf16 on the CPU, fp16 on CUDA)")
    parser.add_argument("--full", action="store_true",
                        help="compare full Jacobians element by element (slow for wide modules) instead of "
                             "one random projection per tensor")
    parser.add_argument("--gradgrad", action="store_true", help="also run gradgradcheck")
    parser.add_argument("--whole-model", action="store_true",
                        help="check the whole model's gradients (random projections) instead of its attention modules")
    parser.set_defaults(run=run)


def _crop(value):
    """Batch 1 and at most ``CROP`` positions per spatial dim, for the tensors in ``value``."""
    if isinstance(value, Tensor):
        return value[(slice(0, 1), slice(None), *[slice(0, CROP)] * (value.dim() - 2))].clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_crop(v) for v in value)
    if isinstance(value, dict):
        return {k: _crop(v) for k, v in value.items()}
    return value


def _attention_inputs(model: nn.Module, x: Tensor) -> dict[str, tuple]:
    """The cropped first inputs of each outermost attention module, by path, from one forward pass."""
    from ..profile import is_attention

    attention = {m: name for name, m in model.named_modules() if is_attention(m)}
    outermost = {m: name for m, name in attention.items()
                 if not any(m is not other and m in set(other.modules()) for other in attention)}
    seen: dict[str, tuple] = {}

    def record(module: nn.Module, args: tuple) -> None:
        seen.setdefault(outermost[module], _crop(args))

    handles = [m.register_forward_pre_hook(record) for m in outermost]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return {name: seen[name] for name in outermost.values() if name in seen}


def run(args: argparse.Namespace) -> int:
    from ..debug import check_amp, check_gradients
    from ..debug.trace import describe

    model, x = build_model_and_input(args)
    options = {"fast": not args.full, "gradgrad": args.gradgrad}
    if args.whole_model:
        targets = {"(model)": (model, (x,))}
    else:
        targets = {name: (model.get_submodule(name), inputs) for name, inputs in _attention_inputs(model, x).items()}
    gradients = {name: check_gradients(module, *inputs, **options) for name, (module, inputs) in targets.items()}
    amp = check_amp(model, x, dtype=None if args.amp_dtype is None else AMP_DTYPES[args.amp_dtype])
    ok = amp.ok and all(report.ok for report in gradients.values())

    if gradients:
        rows = [[name, ", ".join(map(format_shape, describe(list(targets[name][1])))),
                 f"{max(t.max_abs for t in r.tensors):.2e}", f"{max(t.max_rel for t in r.tensors):.2e}",
                 "ok" if r.ok else "FAILED"] for name, r in gradients.items()]
        mode = "full Jacobians" if args.full else "one random projection per tensor"
        text = (f"gradients (float64, {mode}):\n"
                + format_table(["module", "input", "max abs err", "max rel err", "result"], rows, align="llrrl"))
        failures = [f"\n{name}:\n{r}" for name, r in gradients.items() if not r.ok]
        text += "".join(failures)
    else:
        text = "gradients: no attention modules in this model (--whole-model checks the whole model)"
    text += f"\n\n{amp}\n\n{'all checks passed' if ok else 'some checks FAILED'}"
    data = {"ok": ok, "gradients": {name: r.as_dict() for name, r in gradients.items()}, "amp": amp.as_dict()}
    print_report(args, text, data)
    return 0 if ok else 1
