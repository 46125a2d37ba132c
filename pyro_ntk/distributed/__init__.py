r"""Data-parallel NTK products, solves and GP regression with ``torch.distributed``.

.. math::

    J^\top u = \sum_r J(X_r)^\top u_r \quad(\text{all-reduce of } P \cdot k \text{ numbers}),
    \qquad (K V)_r = J(X_r)\,\mathrm{diag}(\sigma^2)\,J^\top V

Each rank holds a row shard of the data; see ``docs/distributed.rst`` and
``examples/distributed_regression.py``.
"""

from pyro_ntk.distributed.cg import sharded_conjugate_gradient as sharded_conjugate_gradient
from pyro_ntk.distributed.comm import CommStats as CommStats
from pyro_ntk.distributed.comm import Communicator as Communicator
from pyro_ntk.distributed.comm import DistributedError as DistributedError
from pyro_ntk.distributed.comm import init_from_env as init_from_env
from pyro_ntk.distributed.comm import shard_rows as shard_rows
from pyro_ntk.distributed.linearization import ShardedLinearization as ShardedLinearization
from pyro_ntk.distributed.preconditioner import (
    ShardedEigenPreconditioner as ShardedEigenPreconditioner,
)
from pyro_ntk.distributed.preconditioner import (
    ShardedFisherPreconditioner as ShardedFisherPreconditioner,
)
from pyro_ntk.distributed.regression import ShardedNTKRegression as ShardedNTKRegression

__all__ = [
    "CommStats",
    "Communicator",
    "DistributedError",
    "ShardedEigenPreconditioner",
    "ShardedFisherPreconditioner",
    "ShardedLinearization",
    "ShardedNTKRegression",
    "init_from_env",
    "shard_rows",
    "sharded_conjugate_gradient",
]
