"""Product engines behind :class:`pyro_ntk.Linearization` (internal).

An engine computes Jacobian products for *one chunk* of inputs; the chunk loop, validation
and shape handling live in :class:`~pyro_ntk.Linearization`, in one place.
"""

from pyro_ntk._engines.base import Engine as Engine
from pyro_ntk._engines.functorch import FuncTorchEngine as FuncTorchEngine
