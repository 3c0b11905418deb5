"""Fixtures of the classify tests."""

import pytest

from metallo_core.models.backbones import BackboneSpec
from tests.fewshot_fixtures import register_untrained_protonet

# The smallest backbone classify's tests register: their images are 16-48 px textures.
CLASSIFY_SPEC = BackboneSpec(arch="resnet18", small_input=True, image_size=16)


@pytest.fixture
def registered_protonet() -> str:
    """models:/ URI of an untrained ProtoNet of CLASSIFY_SPEC, registered in the test's own store."""
    return register_untrained_protonet(CLASSIFY_SPEC)
