"""metallo: few-shot microstructure recognition (DINO pretraining, ProtoNet, meta-test fine-tuning) on Ray."""

__version__ = "0.1.0"
