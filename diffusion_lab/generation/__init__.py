"""Drawing many samples from a trained module (seeds, devices, sharding) and what they are written as: sample
files, image grids and pictures of the reverse chain."""
