"""Feature backbones and heads."""
