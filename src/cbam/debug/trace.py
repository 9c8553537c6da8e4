"""``trace_shapes``: every module call of one forward pass, with its input and output shapes.

The tutorial debugs shapes by sprinkling ``print_shape`` calls through ``forward``. Here forward
hooks on every module record each call (path, type, input and output shapes, dtype, parameters)
and are removed when the pass ends, also when it raises: the trace then ends at the module that
failed, with the shapes that reached it.

Inside CBAM the intermediate steps appear as rows named ``<module path>:<step>``: the pooled
descriptors ``(B, C)``, the shared MLP's summed output ``(B, C, 1, ...)``, the channel gate, the
``[mean, max]`` statistics ``(B, 2, *spatial)``, the spatial conv's output and the spatial gate
``(B, 1, *spatial)``. They are computed from the module's own public methods
(``channel_att.logits``, ``spatial_att.attention``, ``cbam.functional.pool``, ...) on the input
the hook saw, not by recording calls inside the forward: an attention module's forward may not call
``cbam.functional`` at all (a traced CBAM runs its reference path, which calls its children, since
hooks watch them: ``cbam.hooks.parts_watched``; its fused path runs one autograd.Function), and
patching shared functions for a trace would leak into other threads. The price is a second, gradient-free
computation of each attention module, with its buffers (BatchNorm statistics) restored after it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from .. import functional
from ..nn import CBAM, ChannelAttention, DynamicCBAM, ParallelCBAM, SpatialAttention
from ..tables import format_shape, format_table
from .buffers import restored_buffers


@dataclass
class TraceRow:
    """One module call (``step=False``) or one intermediate step inside an attention module.

    ``inputs``/``outputs`` list the arguments / returned values as ``describe`` gives them (a
    tensor's shape as a tuple; ``outputs`` is ``None`` while the call has not returned);
    ``params`` counts the module's parameters, its children's included (``None`` for steps);
    ``status`` is ``"ok"``, ``"failed"`` (raised, and the forward failed) or ``"raised"`` (raised,
    and a caller caught it).
    """

    path: str
    type: str
    inputs: list
    outputs: list | None
    dtype: str
    params: int | None
    step: bool = False
    status: str = "ok"

    def as_dict(self) -> dict:
        return asdict(self)


def describe(value):
    """Shapes of the tensors in ``value``: a tensor -> its shape as a tuple; lists, tuples and dicts
    element-wise; ``None`` stays ``None``; anything else -> its type name."""
    if isinstance(value, Tensor):
        return tuple(value.shape)
    if isinstance(value, (list, tuple)):
        return [describe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): describe(v) for k, v in value.items()}
    return None if value is None else type(value).__name__


def _first_dtype(*values) -> str:
    for value in values:
        if isinstance(value, Tensor):
            return str(value.dtype).removeprefix("torch.")
        if isinstance(value, (list, tuple, dict)):
            found = _first_dtype(*(value.values() if isinstance(value, dict) else value))
            if found:
                return found
    return ""


def _channel_steps(module: ChannelAttention, x: Tensor) -> list[tuple[str, Tensor]]:
    steps = [(f"pool[{kind}]", functional.pool(x, kind)) for kind in module.pool_types]
    logits = module.logits(x)
    return [*steps, ("mlp", logits), ("gate", functional.gate(logits, module.gate))]


def _spatial_steps(module: SpatialAttention, x: Tensor) -> list[tuple[str, Tensor]]:
    logits = module.logits(x)
    stats = functional.spatial_pool(x, module.pool)
    return [("pool[mean,max]" if module.pool == "concat" else "pool[mix]", stats), ("conv", logits),
            ("gate", functional.gate(logits, module.gate))]


def _cbam_steps(module: nn.Module, x: Tensor) -> list[tuple[str, Tensor]]:
    """Steps of a CBAM whose forward did not call its children: both children's steps, each on the
    input it would have seen (``x``, or ``x`` times the other gate)."""
    ca, sa = module.channel_att, module.spatial_att
    if isinstance(module, ParallelCBAM):
        channel_input = spatial_input = x
    elif module.order == "channel-spatial":
        channel_input, spatial_input = x, x * ca.attention(x)
    else:
        channel_input, spatial_input = x * sa.attention(x), x
    channel = [(f"channel_att:{name}", t) for name, t in _channel_steps(ca, channel_input)]
    spatial = [(f"spatial_att:{name}", t) for name, t in _spatial_steps(sa, spatial_input)]
    return spatial + channel if getattr(module, "order", "") == "spatial-channel" else channel + spatial


_TRACED = (ChannelAttention, SpatialAttention, CBAM, ParallelCBAM, DynamicCBAM)  # modules with step rows


def _attention_steps(module: nn.Module, x: Tensor, children_ran: bool) -> list[tuple[str, Tensor]]:
    """The intermediate steps of an attention module on its input ``x``, named relative to its path."""
    if isinstance(module, ChannelAttention):
        return [(f":{name}", t) for name, t in _channel_steps(module, x)]
    if isinstance(module, SpatialAttention):
        return [(f":{name}", t) for name, t in _spatial_steps(module, x)]
    if isinstance(module, DynamicCBAM):
        channel, spatial = module.attention(x)
        return [(":channel_gate", channel), (":spatial_gate", spatial)]
    return [] if children_ran else [(f".{name}", t) for name, t in _cbam_steps(module, x)]


class _Recorder:
    """The hooks of one trace: rows in call order, and the calls still running."""

    def __init__(self, model: nn.Module) -> None:
        self.paths = {module: name for name, module in model.named_modules()}
        self.rows: list[TraceRow] = []
        self.callers: list[nn.Module | None] = []  # the module behind each row; None for steps
        self.stack: list[tuple[nn.Module, TraceRow, int]] = []  # running calls: module, row, row index
        self.paused = False

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.paused:
            return
        inputs = [describe(value) for value in (*args, *kwargs.values())]
        row = TraceRow(self.paths[module], type(module).__name__, inputs, None, _first_dtype(args, kwargs),
                       sum(p.numel() for p in module.parameters()), status="running")
        self.stack.append((module, row, len(self.rows)))
        self.rows.append(row)
        self.callers.append(module)

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        if self.paused:
            return
        while self.stack[-1][0] is not module:
            self.stack.pop()[1].status = "raised"  # a callee raised and this module caught it
        _, row, index = self.stack.pop()
        row.outputs = [describe(value) for value in (output if isinstance(output, tuple) else [output])]
        row.status = "ok"
        row.dtype = _first_dtype(output) or row.dtype
        if isinstance(module, _TRACED) and args and isinstance(args[0], Tensor):
            children = set(module.children())
            children_ran = any(caller in children for caller in self.callers[index + 1:])
            self._add_steps(module, args[0], row.path, children_ran)

    def _add_steps(self, module: nn.Module, x: Tensor, path: str, children_ran: bool) -> None:
        self.paused = True
        try:
            with torch.no_grad(), restored_buffers(module):
                steps = _attention_steps(module, x, children_ran)
        finally:
            self.paused = False
        for name, tensor in steps:
            step_path = path + name if path else name.lstrip(".")
            self.rows.append(TraceRow(step_path, "step", [], [describe(tensor)], _first_dtype(tensor), None, True))
            self.callers.append(None)


class ShapeTrace:
    """The result of ``trace_shapes``: iterate it for ``TraceRow``s, print it for a table.

    ``ok`` is ``False`` when the forward raised; ``error`` is then the exception and ``failed`` the
    innermost module call that did not return (its ``inputs`` are the shapes that reached it).
    """

    def __init__(self, rows: list[TraceRow], error: Exception | None) -> None:
        self.rows = rows
        self.error = error
        failed = [row for row in rows if row.status == "failed"]
        self.failed = failed[-1] if failed else None

    @property
    def ok(self) -> bool:
        return self.error is None

    def __iter__(self) -> Iterator[TraceRow]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def as_dict(self) -> dict:
        """JSON-ready: ``{"ok", "error", "failed", "rows"}`` (shapes as lists)."""
        return {"ok": self.ok, "error": None if self.error is None else f"{type(self.error).__name__}: {self.error}",
                "failed": None if self.failed is None else self.failed.path,
                "rows": [row.as_dict() for row in self.rows]}

    def __str__(self) -> str:
        def output(row: TraceRow) -> str:
            if row.status != "ok":
                return row.status.upper()
            return ", ".join(map(format_shape, row.outputs))

        table = format_table(
            ["module", "type", "input", "output", "dtype", "params"],
            [[row.path or "(model)", row.type, ", ".join(map(format_shape, row.inputs)), output(row), row.dtype,
              "" if row.params is None else f"{row.params:,}"] for row in self.rows],
            align="lllllr",
        )
        if self.ok:
            return table
        where = "" if self.failed is None else f" in {self.failed.path or '(model)'} ({self.failed.type})"
        message = str(self.error).strip().splitlines()[0] if str(self.error).strip() else ""
        return f"{table}\n\nfailed{where}: {type(self.error).__name__}: {message}"


def trace_shapes(model: nn.Module, *inputs, **kwargs) -> ShapeTrace:
    """Run ``model(*inputs, **kwargs)`` once without gradients and trace every module call.

    Returns a ``ShapeTrace`` (rows in call order, a table when printed). A forward that raises does
    not raise here: the trace keeps the rows up to the failure and names the module it happened in.
    The model runs in its current mode (``train()`` updates BatchNorm statistics as any forward does).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"trace_shapes expects an nn.Module, got {type(model).__name__}")
    recorder = _Recorder(model)
    handles = []
    error = None
    try:
        for module in recorder.paths:
            handles.append(module.register_forward_pre_hook(recorder.before, with_kwargs=True))
            handles.append(module.register_forward_hook(recorder.after, with_kwargs=True))
        with torch.no_grad():
            model(*inputs, **kwargs)
    except Exception as raised:  # noqa: BLE001 - reported in the trace, not re-raised
        error = raised
        for _, row, _ in recorder.stack:
            row.status = "failed"
    finally:
        for handle in handles:
            handle.remove()
    return ShapeTrace(recorder.rows, error)
