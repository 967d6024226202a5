"""Layering: the model zoo and the quantization core never import the harness (checked in a fresh
interpreter, so nothing an earlier test imported can hide an import)."""

from __future__ import annotations

import subprocess
import sys


def test_models_and_methods_quant_load_no_harness_module() -> None:
    code = ("import sys, models, models.registry, models.loading, methods.quant.layers, methods.quant.recon, "
            "methods.envelope; models.registry.MODELS.names(); "
            "print(sorted(m for m in sys.modules if m == 'harness' or m.startswith('harness.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout
