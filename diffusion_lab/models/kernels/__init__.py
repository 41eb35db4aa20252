"""Hand-written kernels the networks can use where they beat the stock ones (chosen per CPU)."""
