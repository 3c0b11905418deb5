"""Dataset lineage of a run: the tags that name the dataset it read, and the same dataset as an MLflow dataset
input (source URI, manifest digest, split), which the MLflow UI shows in the run's Datasets column.

The tags stay: registered model versions copy them and `metallo report` reads them. The dataset input is
what MLflow itself understands (search, UI, comparison of runs on the same data).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

DATASET_URI_TAG = "metallo.dataset_uri"
MANIFEST_SHA256_TAG = "metallo.dataset_manifest_sha256"
SPLIT_TAG = "metallo.split"
STAGE_TAG = "metallo.stage"
# Input tags on the dataset input (MLflow's own context tag is the run's stage: pretrain, evaluate, ...).
INPUT_MANIFEST_SHA256 = "manifest_sha256"
INPUT_SPLIT = "split"
# MLflow stores a dataset digest in 36 characters at most (MAX_DATASET_DIGEST_SIZE; its own digests
# are 8): the digest is the manifest sha256 cut to that, the full sha256 is an input tag beside it.
MAX_DIGEST_LENGTH = 36


def dataset_tags(uri: str, split: str | None = None) -> dict[str, str]:
    """The lineage tags of a run that reads dataset `uri` (absolute path or s3://...; its manifest is read
    now, so a missing dataset fails here with DataError): URI, manifest sha256 and, if given, the split."""
    from metallo_core.data.manifest import manifest_sha256

    tags = {DATASET_URI_TAG: uri, MANIFEST_SHA256_TAG: manifest_sha256(uri)}
    if split is not None:
        tags[SPLIT_TAG] = split
    return tags


def dataset_input(tags: Mapping[str, Any]):
    """The MLflow `DatasetInput` for the dataset a run's tags name, or None when they name none.

    Name: the dataset folder's name; source: its URI (local path or s3://); digest: the manifest sha256
    (cut to MLflow's 36 characters, full value in the `manifest_sha256` input tag); context: the stage."""
    uri, sha256 = tags.get(DATASET_URI_TAG), tags.get(MANIFEST_SHA256_TAG)
    if not uri or not sha256:
        return None
    from mlflow.data.meta_dataset import MetaDataset

    # Registered by mlflow.data at import time, so invisible to a type checker.
    from mlflow.data.sources import LocalArtifactDatasetSource, S3ArtifactDatasetSource  # type: ignore[attr-defined]
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    uri, sha256 = str(uri), str(sha256)
    # metallo's datasets are local folders or s3:// prefixes (storage.locate); named here, not guessed by
    # MLflow's resolver, which warns that a local path matches two equivalent sources.
    source = (S3ArtifactDatasetSource if uri.startswith("s3://") else LocalArtifactDatasetSource)(uri)
    # MetaDataset leaves `profile` abstract in MLflow 3.17 but is instantiated as is (it has no profile).
    dataset = MetaDataset(source, name=PurePosixPath(uri.rstrip("/")).name or uri,  # type: ignore[abstract]
                          digest=sha256[:MAX_DIGEST_LENGTH])
    input_tags = [InputTag(INPUT_MANIFEST_SHA256, sha256)]
    if tags.get(SPLIT_TAG):
        input_tags.append(InputTag(INPUT_SPLIT, str(tags[SPLIT_TAG])))
    if tags.get(STAGE_TAG):
        input_tags.append(InputTag(MLFLOW_DATASET_CONTEXT, str(tags[STAGE_TAG])))
    return DatasetInput(dataset._to_mlflow_entity(), input_tags)


def log_dataset_input(mlflow_client, run_id: str, tags: Mapping[str, Any]) -> bool:
    """Log the dataset that `tags` name (see `dataset_input`) as an input of run `run_id`; False if none."""
    entry = dataset_input(tags)
    if entry is None:
        return False
    mlflow_client.log_inputs(run_id, datasets=[entry])
    return True
