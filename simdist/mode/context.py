"""Where in the step we are: phase (fwd / bwd / optim), micro-batch weight, and whether the
current dispatch belongs to simdist's bookkeeping rather than to the simulated program.

Shared by the recording modes so that each stays one concern."""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch.autograd.graph import register_multi_grad_hook
from torch.distributed._tools.mod_tracker import ModTracker
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.utils._pytree import tree_flatten

PHASES = ("init", "fwd", "bwd", "optim")


@functools.lru_cache(maxsize=4096)  # called for every parent on every op: names repeat
def _module_order(name: str) -> tuple:
    return (name.count("."),
            tuple((0, int(seg), "") if seg.isdigit() else (1, 0, seg) for seg in name.split(".")))


def _grad_tensors(tree: Any) -> list[torch.Tensor]:
    return [a for a in tree_flatten(tree)[0] if isinstance(a, torch.Tensor) and a.requires_grad]


class KeywordModTracker(ModTracker):
    """torch's ModTracker, also closing a module in backward when its tensor inputs are keyword
    arguments. ModTracker learns a module's inputs from a global forward pre-hook, which gets no
    keyword arguments; a module called with keyword tensors only (Hugging Face's
    `self_attn(hidden_states=...)`) then stays open until backward ends, and every backward op
    after it is attributed to it (the deepest open module). Here such a call's exit is hooked
    on its keyword tensors, from the forward hook, which gets them. Calls with positional
    tensor inputs are tracked exactly as ModTracker tracks them."""

    def __init__(self) -> None:
        super().__init__()
        self._deferred: list[bool] = []  # per open forward call: exit hook left to the post hook

    def _fw_pre_hook(self, mod: Any, input: Any) -> None:  # noqa: A002 - torch's name
        if torch._dynamo.eval_frame._is_in_optimized_module():
            return
        if self.is_bw or _grad_tensors(input):
            self._deferred.append(False)
            super()._fw_pre_hook(mod, input)
            return
        # ModTracker's pre-hook, less the exit callback it would queue for a call without
        # positional tensor inputs: the post hook decides, seeing the keyword ones.
        name = self._get_mod_name(mod)
        self._get_append_fn(weakref.ref(mod), name, False)()
        if self._user_pre_fw_hook is not None:
            self._user_pre_fw_hook(mod, input)
        self._deferred.append(True)

    def _fw_post_hook_kw(self, mod: Any, input: Any, *rest: Any) -> None:  # noqa: A002
        # (kwargs, output); (output) where forward raised (torch calls always_call hooks so,
        # e.g. on checkpoint's early stop of a recomputation)
        kwargs, output = rest if len(rest) == 2 else ({}, rest[0])
        if torch._dynamo.eval_frame._is_in_optimized_module():
            return
        if self._deferred.pop():
            pop = self._get_pop_fn(weakref.ref(mod), self._get_mod_name(mod), True)
            tensors = _grad_tensors(kwargs)
            if tensors:
                register_multi_grad_hook(tensors, pop)
            else:
                self._post_bw_callbacks_to_enqueue.append(pop)
        self._fw_post_hook(mod, input, output)

    def __enter__(self) -> KeywordModTracker:
        self._fw_pre_handle = register_module_forward_pre_hook(self._fw_pre_hook)
        self._fw_post_handle = register_module_forward_hook(
            self._fw_post_hook_kw, with_kwargs=True, always_call=True)
        return self


class StepContext:
    """Mutable cursor read by every recorder on every op."""

    def __init__(self, track_modules: bool = True) -> None:
        self.phase = "init"
        # How many identical micro-batches the op being executed stands for (see step.py).
        self.weight = 1
        # ModTracker hooks module inputs with multi-grad hooks, which autograd.grad(inputs=...)
        # rejects for leaf inputs (zero-bubble pipelines split backward that way): such runs
        # attribute ops to no module.
        self.mod_tracker = KeywordModTracker() if track_modules else contextlib.nullcontext()
        self._excluded = threading.local()
        # The GPU stream ops are issued on (mode/kernels.py), and the recorder of the kernel
        # stream that the op and collective recorders notify (None: not recorded).
        self.stream = "compute"
        self.kernels: Any = None
        # Work done for a module outside its forward and backward (a pipeline schedule's FSDP
        # unshard of a stage's blocks): the module it is for (mode/pipeline.py).
        self._on_behalf: list[str] = []

    @contextlib.contextmanager
    def in_phase(self, phase: str, weight: int = 1) -> Iterator[None]:
        prev = self.phase, self.weight
        self.phase, self.weight = phase, weight
        try:
            yield
        finally:
            self.phase, self.weight = prev

    @contextlib.contextmanager
    def on_stream(self, stream: str) -> Iterator[None]:
        prev, self.stream = self.stream, stream
        try:
            yield
        finally:
            self.stream = prev

    @contextlib.contextmanager
    def for_module(self, fqn: str) -> Iterator[None]:
        """Ops issued inside, where no module runs, are attributed to module `fqn`."""
        self._on_behalf.append(fqn)
        try:
            yield
        finally:
            self._on_behalf.pop()

    def module(self) -> str:
        """Innermost module FQN that is running (forward or backward); outside every module,
        the one `for_module` names, if any."""
        fqn = self._running_module()
        return self._on_behalf[-1] if not fqn and self._on_behalf else fqn

    def _running_module(self) -> str:
        parents = getattr(self.mod_tracker, "parents", None)
        if not parents:
            return ""
        # Deepest module; ties (sibling modules whose backward hooks are open together, e.g.
        # wq/wk/wv sharing one input, or two blocks in backward) break by name, numbers compared
        # as numbers (layers.10 after layers.9), so attribution is deterministic and does not
        # depend on how many digits a block index has.
        best = max(parents, key=_module_order)
        # ModTracker names the root module by its class ("FSDPLlama3.layers.0"); report FQNs
        # relative to the model, without wrapper segments.
        _, _, fqn = best.partition(".")
        return fqn.replace("._checkpoint_wrapped_module", "")

    @property
    def excluded(self) -> bool:
        return getattr(self._excluded, "depth", 0) > 0

    @contextlib.contextmanager
    def exclude(self) -> Iterator[None]:
        """Ops run inside are simdist's or torch's bookkeeping, not the simulated program."""
        self._excluded.depth = getattr(self._excluded, "depth", 0) + 1
        try:
            yield
        finally:
            self._excluded.depth -= 1
