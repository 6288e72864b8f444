"""One plain line for any exception: what the CLI prints for an internal error (the traceback only
with --debug). Errors raised inside Ray actors arrive as RayTaskError, whose text is the remote
traceback with terminal colour codes; the line names the original exception instead."""

from __future__ import annotations

import re
import traceback

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


def plain(text: str) -> str:
    return _ANSI.sub("", text)


def root_cause(exc: BaseException) -> tuple[BaseException, str | None]:
    """(the exception that was raised, where it was raised when that was in a Ray actor: the
    remote traceback's text). RayTaskError (and its as_instanceof_cause subclasses,
    "RayTaskError(ValueError)") carry the original as `.cause`; the remote traceback is
    `traceback_str` where Ray keeps it, else the error's own text (Ray 2.60)."""
    remote = None
    seen = 0
    while hasattr(exc, "cause") and any(c.__name__ == "RayTaskError" for c in type(exc).__mro__) \
            and seen < 8:
        remote = getattr(exc, "traceback_str", None) or str(exc) or remote
        cause = getattr(exc, "cause", None)
        if not isinstance(cause, BaseException):
            break
        exc, seen = cause, seen + 1
    return exc, remote


def _where(exc: BaseException, remote: str | None) -> str:
    frames = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ else []
    if frames:
        return f"{frames[-1].filename}:{frames[-1].lineno}"
    found = _FRAME.findall(plain(remote or ""))
    return f"{found[-1][0]}:{found[-1][1]}" if found else "an unknown place"


def one_line(exc: BaseException) -> str:
    """'Type: first line of the message', colour codes removed; an exception with an empty message
    is named with where it was raised ('AssertionError at simdist/x.py:12')."""
    cause, remote = root_cause(exc)
    text = plain(str(cause)).strip()
    name = type(cause).__name__
    if remote is not None and name.startswith("RayTaskError(") and name.endswith(")"):
        name = name[len("RayTaskError("):-1]
    if not text:
        return f"{name} at {_where(cause, remote)}"
    first = text.splitlines()[0].strip()
    return f"{name}: {first[:300]}"


class CannotSimulate(RuntimeError):
    """An op of the model that fake execution cannot run (it needs tensor values, or it has no
    fake kernel): named with the module that ran it and what to do. Picklable (it crosses Ray
    actor boundaries) and one line."""

    def __init__(self, op: str, module: str, why: str, hint: str) -> None:
        super().__init__(op, module, why, hint)
        self.op, self.module, self.why, self.hint = op, module, why, hint

    def __str__(self) -> str:
        where = f"module {self.module}" if self.module else "the model (outside any submodule)"
        return f"op {self.op} in {where} cannot run on fake tensors: {self.why}; {self.hint}"


_STATIC = ("make it static for the simulation (fixed shapes and no branching on values, e.g. "
           "token counts per expert as an input like simdist's MoE routing), or give the op a "
           "fake kernel with torch.library.register_fake")


def cannot_simulate(exc: BaseException, op: str, module: str) -> CannotSimulate | None:
    """The CannotSimulate for an exception fake execution raised while running `op`, or None
    when it is another kind of error."""
    from torch._subclasses.fake_tensor import (DataDependentOutputException,
                                               DynamicOutputShapeException,
                                               UnsupportedOperatorException)

    if isinstance(exc, DataDependentOutputException):
        why = "it needs a tensor's value (.item(), .tolist(), bool() or an if on a tensor)"
        return CannotSimulate(str(exc) or op, module, why, _STATIC)
    if isinstance(exc, DynamicOutputShapeException):
        why = "its output shape depends on tensor values (nonzero, unique, masked_select, ...)"
        return CannotSimulate(str(exc) or op, module, why, _STATIC)
    text = str(exc)
    if isinstance(exc, UnsupportedOperatorException) or (
            isinstance(exc, (RuntimeError, NotImplementedError))
            and ("no fake impl" in text or "'Meta' backend" in text)):
        return CannotSimulate(op, module, "it has no fake (meta) kernel",
                              "register one with torch.library.register_fake (output shapes from "
                              "input shapes)")
    return None


class RayClusterLost(RuntimeError):
    """A process the run depends on (the local Ray's GCS or raylet, or a joined cluster's GCS)
    died during the run. One line naming it."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what

    def __str__(self) -> str:
        return f"{self.what}; the run stopped, nothing was written"
