"""torchvision and timm for the tests, imported from a directory of their own.

``scripts/setup.sh`` installs them with ``pip install --no-deps --target .venv/vision-libs``, a
directory that is not on ``sys.path``: the torchvision wheel that matches torch 2.13 is a CUDA
build whose compiled ops (``_C.so``) cannot load beside the CPU torch, and its import then fails
with ``operator torchvision::nms does not exist`` (its fake-tensor registrations for ``nms`` and
``qnms`` need the op schemas the extension would have defined). transformers imports torchvision
whenever it can find it, so a torchvision on the default path would break every HuggingFace model
in every process. Here the two schemas are defined first (with the signatures of torchvision's
``csrc/ops/nms.cpp`` and ``csrc/ops/quantized/cpu/qnms_kernel.cpp``), then the directory is put on
``sys.path``, only in a process whose tests ask for these libraries. Nothing the models in the
tests run needs the compiled ops: without them torchvision's detection ops are unavailable, its
models are not.
"""
import importlib
import sys
from pathlib import Path

import pytest
import torch

#: where scripts/setup.sh installs them: inside the environment of the running interpreter
VISION_LIBS = Path(sys.prefix) / "vision-libs"

#: schemas of the compiled ops torchvision's Python code registers fake kernels for at import
_OP_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library = None     # the torch.library fragment holding them; must stay alive with the process


def _define_missing_op_schemas():
    global _library
    missing = [name for name in _OP_SCHEMAS if not torch._C._jit_get_schemas_for_operator(f"torchvision::{name}")]
    if missing:
        _library = _library or torch.library.Library("torchvision", "FRAGMENT")
        for name in missing:
            _library.define(_OP_SCHEMAS[name])


def vision_lib(name):
    """Import ``torchvision`` or ``timm`` from ``VISION_LIBS``; fail the calling test with what to
    do when they are not installed."""
    if not (VISION_LIBS / name).is_dir():
        pytest.fail(f"{name} is not installed in {VISION_LIBS}: run scripts/setup.sh (it installs "
                    "torchvision and timm there, outside the default import path)", pytrace=False)
    _define_missing_op_schemas()
    if str(VISION_LIBS) not in sys.path:
        sys.path.insert(0, str(VISION_LIBS))
    return importlib.import_module(name)
