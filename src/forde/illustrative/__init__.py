"""The paper's illustrative experiments (Sec. 5.1): 1-D regression and 2-D classification with
ensembles of 16 small networks, comparing DE, weight-RDE, function-RDE and FoRDE."""
