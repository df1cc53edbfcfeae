"""From finished runs to the paper's figures and tables: load results (run directories, Optuna
storage, W&B), aggregate over seeds, draw, tabulate, and `report` everything for a study."""
