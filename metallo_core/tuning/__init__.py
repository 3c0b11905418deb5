"""Ray Tune searches over meta-training and meta-test fine-tuning hyperparameters (entrypoints in tuning/)."""
