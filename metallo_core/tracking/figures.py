"""Figures on the MLflow run that produced them, so the run page shows pictures and not only JSON."""

from __future__ import annotations

from collections.abc import Mapping

from matplotlib.figure import Figure

from metallo_core import tracking

FIGURE_DPI = 120  # sharp enough on the run page, a few tens of kB per chart


def log_figures(run_id: str | None, figures: Mapping[str, Figure]) -> None:
    """Save each figure as the run artifact it is keyed by, e.g. {"confusion/protonet.png": figure}.

    The extension picks the format (.png shows as an image in the MLflow UI's artifact view; .svg, .pdf
    also work). `run_id` None logs nothing: that is what ranks other than 0 hold (`tracking.NullLogger`).
    Raises what MLflow raises for an unknown run or an unwritable artifact store."""
    if run_id is None or not figures:
        return
    client = tracking.client()
    for artifact_file, figure in figures.items():
        client.log_figure(run_id, figure, artifact_file, save_kwargs={"dpi": FIGURE_DPI, "facecolor": "#ffffff",
                                                                    "bbox_inches": "tight"})
