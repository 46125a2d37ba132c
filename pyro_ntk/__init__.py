"""pyro_ntk: trained neural networks as Gaussian processes with their empirical NTK, in Pyro."""

from pyro_ntk.linearization import Linearization as Linearization
from pyro_ntk.linearization import NTKImplementation as NTKImplementation

__version__ = "0.1.0"

__all__ = ["Linearization", "NTKImplementation", "__version__"]
