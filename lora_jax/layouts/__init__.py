"""Weight layouts: which axes of a kernel are its input, its output, or a stack of kernels.

A layout is a *roles* string with one character per kernel axis:

* ``"i"``: an input axis (a matmul contracts it; LoRA's A spans the input axes),
* ``"o"``: an output axis (B spans the output axes),
* ``"s"``: a stack axis (an independent adapter per index: ``nn.scan`` layers, the block axis
  of a block-diagonal kernel, a fused axis the model indexes).

A Dense kernel ``(in, out)`` is ``"io"``; Gemma's ``q_einsum`` ``(N, D, H)`` used as
``BTD,NDH->BTNH`` is ``"oio"``; a block-diagonal ``(Nb, Bs, Bs)`` gate used with the block
axis as a ``dot_general`` batch dimension is ``"sio"``.

:func:`trace` learns every weight's layout from how a model function uses it, by reading the
function's jaxpr: the axes a ``dot_general`` (or ``conv_general_dilated``, or
``ragged_dot_general``) contracts on the weight are its input axes, the axes that are batch
dimensions of that use, or its expert (group) axis, or that a ``scan`` slices, or that the
model indexes with a constant or picks per token (``w[expert_ids]``), are stack axes, and the
rest are output axes, wherever each sits in the shape. Weights read by a row lookup
(``gather``) are embeddings.

>>> import jax, jax.numpy as jnp
>>> from lora_jax.layouts import trace
>>> def attn(params, x):  # heads-first kernels, as Google's gemma library writes them
...     q = jnp.einsum("BTD,NDH->BTNH", x, params["q"])
...     return jnp.einsum("BTNH,NHD->BTD", q, params["o"])
>>> params = {"q": jnp.ones((2, 8, 4)), "o": jnp.ones((2, 4, 8))}
>>> layouts = trace(attn, params, jnp.ones((1, 3, 8)))
>>> layouts["q"].roles, layouts["o"].roles
('oio', 'iio')
"""

from lora_jax.layouts.roles import (
    IN,
    OUT,
    STACK,
    block_order,
    canonical,
    check,
    from_canonical,
    from_names,
    split,
    to_canonical,
)
from lora_jax.layouts.trace import Layouts, WeightLayout, check_layouts, trace
from lora_jax.layouts.views import (
    CALL_PRIMS,
    REMAT_PRIMS,
    VIEW_PRIMS,
    View,
    pick_view,
    reshape_axes,
    view_after,
)

__all__ = [
    "CALL_PRIMS",
    "IN",
    "Layouts",
    "OUT",
    "REMAT_PRIMS",
    "STACK",
    "VIEW_PRIMS",
    "View",
    "WeightLayout",
    "block_order",
    "canonical",
    "check",
    "check_layouts",
    "from_canonical",
    "from_names",
    "pick_view",
    "reshape_axes",
    "split",
    "to_canonical",
    "trace",
    "view_after",
]
