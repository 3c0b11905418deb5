"""Built-in synthetic microstructures (pixels and labels only): seed 002's morphology x volume-fraction
set and a many-class few-shot benchmark of metallographic textures."""

from metallo_core.data.synthetic.fewshot import (
    FEWSHOT_SPLIT_SIZES,
    REFERENCE_SIZE,
    FewShotClass,
    fewshot_classes,
    render_images,
    split_classes,
)
from metallo_core.data.synthetic.nfurcated import (
    MORPHOLOGIES,
    VOLUME_FRACTIONS,
    Morphology,
    NfurcatedBatch,
    nfurcated_batches,
)

__all__ = [
    "FEWSHOT_SPLIT_SIZES",
    "MORPHOLOGIES",
    "REFERENCE_SIZE",
    "VOLUME_FRACTIONS",
    "FewShotClass",
    "Morphology",
    "NfurcatedBatch",
    "fewshot_classes",
    "nfurcated_batches",
    "render_images",
    "split_classes",
]
