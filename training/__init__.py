"""Switchboard's offline training package (``switchboard-train``).

Everything here runs offline and writes into the adapter store that the server reads
(``adapters/<name>/`` PEFT folders, ``adapters/_routers/<name>/``). It depends on
``router_core`` for embedders, routers, complexity features and the store's rules
(``router_core.store_rules``), and never on ``server``:
the store on disk is the only interface between training and serving.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
