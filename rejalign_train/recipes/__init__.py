"""Sweep configurations shipped with rejalign: ``rejalign-sweep --recipe NAME --set KEY=VALUE``.

Package data (the ``.yaml`` files beside this module), read through ``importlib.resources``.
"""
