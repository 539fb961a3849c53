"""The lmms-eval plugin: ``lmms-eval --model tc_llava --model_args pretrained=EXPORT ...``.

Installed with the ``lmms`` extra (``pip install -e .[lmms]``, or the separate environment of
``scripts/setup_lmms.sh``) and found by lmms-eval through the ``lmms_eval.models`` entry point,
which names :func:`manifest`. The model itself is :class:`tc_llava.lmms.model.TCLlavaLMM`. This
room sits above the model, data and eval rooms and none of them imports it; importing this
module costs nothing until lmms-eval asks for the manifest.
"""

from __future__ import annotations

from typing import Any

MODEL_ID = "tc_llava"
CLASS_PATH = "tc_llava.lmms.model.TCLlavaLMM"


def manifest() -> Any:
    """The registration lmms-eval's ``ModelRegistryV2`` reads from the entry point."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)
