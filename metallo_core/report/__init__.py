"""`metallo report`: one self-contained HTML (and markdown) report of an MLflow experiment.

`collect` reads MLflow (runs, metric histories, artifacts, registry lineage), `lineage` names what each
evaluated model is made of, `tables` and `figures` (matplotlib) turn that into tables and plots, `sections`
lays them out as a `document`, `html_page` and `markdown_page` render it, and `build` writes the files.
"""
