"""Datasets that ship inside metallo, so a fresh clone or install scores real images offline.

`x_sdd/`: X-SDD, 1,360 real steel-surface images of 7 classes, 128 x 128 px, Apache-2.0 (its README and
LICENSE sit beside the images). Laid out as `x_sdd/images/<class>/<image>.jpg`.
"""

from __future__ import annotations

from pathlib import Path

from metallo_core.errors import DataError

XSDD_CLASSES = 7
XSDD_IMAGES = 1360


def xsdd_images() -> Path:
    """The built-in X-SDD folder (`<root>/<class>/<image>`); DataError if the installation lacks it."""
    root = Path(__file__).resolve().parent / "x_sdd" / "images"
    if not root.is_dir():
        raise DataError(f"the built-in X-SDD images are missing from this installation ({root}); reinstall metallo "
                        "or pass a labelled folder of your own")
    return root
