"""A multi-label network's predictions as table rows: for each image, each classification property's
predicted class name and `<property>_probability`, and each regression property's value.

Pure: the network comes already built (`metallo multilabel predict` loads it from the registry,
`commands/multilabel_predict.py`).
"""

from __future__ import annotations

import numpy as np
import torch

from metallo_core.multilabel.model import MultilabelNet, decode_outputs, images_to_unit_tensor
from metallo_core.multilabel.properties import PropertyInfo


def property_columns(properties: list[PropertyInfo]) -> list[str]:
    """The keys of each row `predict_rows` returns, in property order: `<name>`, `<name>_probability` for
    a classification property, `<name>` for a regression one."""
    columns = []
    for prop in properties:
        columns += [prop.name, f"{prop.name}_probability"] if prop.is_class else [prop.name]
    return columns


def predict_rows(network: MultilabelNet, properties: list[PropertyInfo], images: np.ndarray) -> list[dict[str, object]]:
    """(N, S, S, 3) uint8 images -> N dicts keyed by `property_columns(properties)`: class names with their
    probabilities, and values (both rounded to 6 decimals). Puts `network` in eval mode."""
    with torch.inference_mode():
        decoded = decode_outputs(network.eval()(images_to_unit_tensor(torch.from_numpy(images))), properties)
    rows: list[dict[str, object]] = [{} for _ in range(len(images))]
    for prop in properties:
        output = decoded[prop.name]
        if prop.is_class:
            probability, index = output.max(-1)
            for row, class_id, p in zip(rows, index.tolist(), probability.tolist()):
                row[prop.name] = prop.classes[class_id]
                row[f"{prop.name}_probability"] = round(p, 6)
        else:
            for row, value in zip(rows, output.tolist()):
                row[prop.name] = round(value, 6)
    return rows
