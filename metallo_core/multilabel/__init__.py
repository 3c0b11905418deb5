"""Multi-label microstructure quantification (seed 002): a frozen feature extractor, a shared fc layer and
one head per property (classification or regression), trained on cached features.

Pieces: `config` (typed settings), `properties` (declared properties checked against the dataset's label
columns), `model` (n-furcated head, multi-task loss), `features` (backbone resolution, extraction, cache),
`feature_layers` (which backbone features the heads read, and the rule that picks them on the validation rows),
`split` (stratified test split), `train` (the head-training loop, error rates, epochs to saturation),
`model_store` (logging, registering and loading the trained model), `pipeline` (the `train` stage),
`predict`, `baseline_cnn` (the from-scratch CNN baseline), `grid` (the seed-002 grid's trials), `experiments`
(the grid on Ray Tune, through `tuning.runner`) and `tables` (its tables next to the paper's numbers).
"""
