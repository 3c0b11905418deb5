"""Ray Tune searches, as Ray job entrypoints: `python -m tuning.search_metatrain --config ...` and
`python -m tuning.search_finetune --config ...` (also `metallo tune metatrain|finetune`). Search spaces
and settings live in tuning/configs/*.yaml; the code is in metallo_core.tuning."""
