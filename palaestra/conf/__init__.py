"""Hydra config groups shipped with palaestra (model/, task/, algo/, experiment/)."""
