"""The third-party baselines bench.py measures against: peft's LoRA and sparsify's SparseCoder. They live
beside the tests because, like the tests, they use peft and sparsify as independent references; the
product (every file outside tests/) never imports either."""
from __future__ import annotations

import importlib.util
import os
import sys
import types


def peft_lora(hf, r: int, alpha: float, dropout: float, targets):
    """transformers model `hf` wrapped with peft's LoRA (rank r, alpha, dropout) on the named linears."""
    from peft import LoraConfig, get_peft_model
    return get_peft_model(hf, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets)))


def sparsify_coder(device):
    """sparsify's SparseCoder and its config. The package __init__ imports sparsify's trainer, which needs
    `datasets`; where that is missing (the GPU image), load the coder's modules without the __init__."""
    if device.type != "cuda":
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    try:
        from sparsify import SparseCoder, SparseCoderConfig
    except ImportError:
        spec = importlib.util.find_spec("sparsify")
        if spec is None:
            raise SystemExit("the sae benchmark's baseline needs eai-sparsify (pip install eai-sparsify)") from None
        pkg = types.ModuleType("sparsify")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["sparsify"] = pkg
        from sparsify.config import SparseCoderConfig
        from sparsify.sparse_coder import SparseCoder
    return SparseCoder, SparseCoderConfig
