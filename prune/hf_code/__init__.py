"""Configuration and modeling code written into every checkpoint whose layers have different widths.

These two files are copied verbatim next to ``config.json`` and loaded by transformers' ``auto_map``
mechanism (``trust_remote_code=True``). They import only torch and transformers, never this toolkit.
"""
