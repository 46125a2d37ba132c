"""Product engines behind :class:`pyro_ntk.Linearization` (internal).

An engine computes Jacobian products for *one chunk* of inputs; the chunk loop, validation
and shape handling live in :class:`~pyro_ntk.Linearization`, in one place.

- ``functorch``: ``torch.func`` vjp + jvp under ``vmap`` (generic, nothing cached);
- ``cached``: the same closures, built once per (chunk, θ*) and reused;
- ``structured``: per-layer factors of Linear/Conv2d layers, generic closures for the rest.
"""

from pyro_ntk._engines.base import Engine as Engine
from pyro_ntk._engines.cached import CachedEngine as CachedEngine
from pyro_ntk._engines.functorch import FuncTorchEngine as FuncTorchEngine
from pyro_ntk._engines.structured import LayerFactors as LayerFactors
from pyro_ntk._engines.structured import StructuredEngine as StructuredEngine
from pyro_ntk._engines.structured import make_plan as make_plan
