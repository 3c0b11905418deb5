"""Self-supervised pretraining (DINO) of feature backbones: the maths, free of Ray and MLflow."""
