"""Context parallelism with torch's ring attention (torch.distributed.tensor.experimental).

Each rank holds `seq / cp` tokens (load-balanced head-tail chunks, so causal work is even); the
attention kernel runs on Shard(seq) DTensors and torch's CP dispatcher turns it into ring
attention, exchanging K/V shards (all-gathers, or all-to-alls, recorded as collectives).

torch's `context_parallel()` patches `torch.nn.functional.scaled_dot_product_attention` by name.
Our models call the GPU flash kernel through `simdist.models.kernels.scaled_dot_product_attention`
(a fake cpu SDPA would pick the CPU kernel, which has no CP sharding rule), so the same input and
output conversion is installed on that function, in every module that imported it (a family's
registration names them: simdist/families.py)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.experimental._context_parallel import _attention as cp_attention

from simdist.models import kernels

@contextlib.contextmanager
def context_parallel(cp_mesh: DeviceMesh, attention_modules: tuple[str, ...] = (),
                     rotate_method: str = "allgather") -> Iterator[None]:
    sdpa = kernels.scaled_dot_product_attention
    style = cp_attention._ContextParallel(
        seq_dim=2, attention_type=cp_attention._ContextParallel.AttentionType.SDPA)

    def ring_sdpa(*args: Any, **kwargs: Any) -> Any:
        args, kwargs = style.sdpa_input_fn(None, args, kwargs, cp_mesh)
        return style.sdpa_output_fn(None, (args, kwargs), sdpa(*args, **kwargs), cp_mesh)

    patched = [m for m in map(sys.modules.get, (kernels.__name__, *attention_modules))
               if m is not None and getattr(m, "scaled_dot_product_attention", None) is sdpa]
    options = cp_attention._cp_options
    old = (options.enable_load_balance, options.rotate_method)
    options.enable_load_balance = True  # head-tail chunks: what torch's context_parallel uses
    cp_attention.set_rotate_method(rotate_method)
    for module in patched:
        module.scaled_dot_product_attention = ring_sdpa
    cp_attention._enable_cp_dtensor_dispatcher()
    try:
        yield
    finally:
        cp_attention._disable_cp_dtensor_dispatcher()
        for module in patched:
            module.scaled_dot_product_attention = sdpa
        options.enable_load_balance, options.rotate_method = old
