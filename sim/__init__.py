"""The swarm simulator: N nodes in one process on a virtual clock.

A second driver of the product's pure code (wire, picker, choker,
scheduling, the tracker's index), outside the product: it may import
``peerd`` and ``tracker``; ``peerd``, ``tracker`` and ``cli`` never import
it (``tests/test_simulate.py`` checks). Its speed is its own business:
caches and compiled builds (``scripts/_native.py``) live here and in
``scripts/``, never in the product.
"""

from .simulation import MiB, SimConfig, SimResult, Simulation, leecher_rates, run, t_min

__all__ = ["MiB", "SimConfig", "SimResult", "Simulation", "leecher_rates", "run", "t_min"]
