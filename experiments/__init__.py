"""The papers' experiments: configs (``experiments.configs``), the sweep runner (``experiments.run``)
and the results page (``experiments.report``)."""
