"""The swarm simulator: N nodes in one process on a virtual clock.

The second driver of the node's content engine (peerd.engine), outside the
product: it may import ``peerd`` and ``tracker``; ``peerd``, ``tracker`` and
``cli`` never import it (``tests/test_simulate.py`` checks). Its speed is its
own business: whatever makes it faster lives here, never in the product.
"""

from .simulation import MiB, SimConfig, SimResult, Simulation, leecher_rates, run, t_min

__all__ = ["MiB", "SimConfig", "SimResult", "Simulation", "leecher_rates", "run", "t_min"]
