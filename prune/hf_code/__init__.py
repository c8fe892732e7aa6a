"""Modeling code written into every checkpoint whose layers have different widths.

``modeling_pruned.py`` is copied verbatim next to ``config.json`` and loaded by transformers'
``auto_map`` mechanism (``trust_remote_code=True``). It imports only torch and transformers, never
this toolkit.
"""
