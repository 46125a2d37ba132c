r"""The structured engine: per-layer factors of Linear, Conv1d/2d, BatchNorm, Embedding, per chunk.

For a layer :math:`z = W a + b` applied at positions :math:`s` (one position for a plain
Linear layer, the output pixels for a convolution, whose :math:`a_s` are the input patches),
the per-example gradient of output :math:`f_o(x_n)` is a sum of outer products of the layer
input :math:`A_{n,s}` and the output sensitivity :math:`B_{n,o,s} = \partial f_o(x_n)/\partial z_{n,s}`:

.. math::

    \frac{\partial f_o(x_n)}{\partial W} = \sum_s B_{n,o,s} A_{n,s}^\top, \qquad
    \frac{\partial f_o(x_n)}{\partial b} = \sum_s B_{n,o,s}.

With :math:`A` and :math:`B` cached (one forward pass and ``O`` backward passes per chunk),
every product is a pair of forward-sized matrix products per layer:

.. math::

    (J V)_{n,o} = \sum_l \sum_s B_{n,o,s}^\top (V_W A_{n,s} + V_b), \qquad
    J^\top U = \sum_{n,o} U_{n,o} \sum_s B_{n,o,s} A_{n,s}^\top,

and the dense kernel of plain Linear layers needs no Jacobian at all:

.. math::

    K_l = \big(\sigma_W^2 A_1 A_2^\top + \sigma_b^2\big) \odot \big(B_1 B_2^\top\big).

A BatchNorm in eval mode is a per-channel diagonal layer of its normalized input
(:mod:`.norm`), whose per-example gradients are reduced from each backward pass as it comes
(:mod:`.reduction`, as for early convolutions); an ``nn.Embedding`` keeps its token ids and
sensitivities, and its products are a gather, an ``index_add`` and a Gram by token equality
(:mod:`.embedding`).

Parameters outside such layers (other normalizations, custom modules) and layers the
engine cannot factor (a module called more than once, a weight shared between modules, a
module whose ``forward`` is overridden, a BatchNorm using batch statistics) go through the
cached ``torch.func`` closures of :mod:`pyro_ntk._engines.cached`, restricted to those
parameters, in the same product; the reason is kept in the plan.

One module per step: :mod:`.plan` (which layers are factored, and the example dimension of
each), :mod:`.factors` (the per-chunk ``A`` and ``B``), :mod:`.products` (the products from
them), :mod:`.gram` (the dense kernel, the cheaper of two routes per layer),
:mod:`.separable` (the dense Gram of layers whose sensitivities are rank one per (example,
channel)) and :mod:`.separable_layers` (which layers take it, proven on each batch);
:mod:`.engine` ties them to the generic remainder and the proof.
"""

from pyro_ntk._engines.structured.engine import StructuredEngine as StructuredEngine
from pyro_ntk._engines.structured.factors import LayerFactors as LayerFactors
from pyro_ntk._engines.structured.plan import make_plan as make_plan
