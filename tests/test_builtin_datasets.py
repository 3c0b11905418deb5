"""The shipped X-SDD copy is whole: every class folder, every image decodable, licence and source beside it."""

from metallo_core.data.images import decode_rgb
from metallo_core.data.listing import list_folder
from metallo_core.datasets import XSDD_CLASSES, XSDD_IMAGES, xsdd_images


def test_the_shipped_xsdd_has_every_class_and_image_with_its_licence():
    root = xsdd_images()
    groups, loose = list_folder(root).by_top_folder()
    assert not loose
    assert len(groups) == XSDD_CLASSES
    assert sum(len(files) for files in groups.values()) == XSDD_IMAGES
    assert min(len(files) for files in groups.values()) == 63  # oxide_scale_of_plate_system
    assert "Apache License" in (root.parent / "LICENSE").read_text()
    assert "Fighter20092392/X-SDD-A-New-benchmark" in (root.parent / "README.md").read_text()
    first = groups["red_iron"][0]
    assert decode_rgb((root / first).read_bytes(), first).shape == (128, 128, 3)
