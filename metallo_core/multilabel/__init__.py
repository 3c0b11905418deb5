"""Multi-label microstructure quantification (seed 002): a frozen feature extractor, a shared fc layer and
one head per property (classification or regression), trained on cached features.

The maths only: nothing here imports Ray, MLflow or the application layer. The stages that use it are
`train.multilabel` (`metallo multilabel train`), `tuning.multilabel_grid` (`metallo multilabel experiments`,
the grid on Ray Tune) and `commands.multilabel_predict`; the registry side is `tracking.multilabel_store`
(logging, registering and loading the trained model) and `tracking.multilabel_backbone` (a registered
backbone as the feature extractor).

Pieces: `config` (typed settings), `properties` (declared properties checked against the dataset's label
columns), `model` (n-furcated head, multi-task loss), `features` (backbone resolution, extraction, cache),
`feature_layers` (which backbone features the heads read, and the rule that picks them on the validation rows),
`split` (stratified test split), `train` (the head-training loop, error rates, epochs to saturation),
`predict` (a loaded model's predictions as rows), `baseline_cnn` (the from-scratch CNN baseline), `grid`
(the seed-002 grid's trials) and `tables` (its tables next to the paper's numbers).
"""
