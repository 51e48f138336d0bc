"""vllm_lk: the part of vllm-lk that runs inside vLLM processes.

Loaded by vLLM through the ``vllm.general_plugins`` entry point (see :mod:`vllm_lk.plugin`).
This package imports neither ``training`` nor ``server``.
"""

__version__ = "0.1.0"
