"""Agents that call tools over several turns: the tools (:mod:`.tools`), how a model writes a call and reads a result
(:mod:`.formats`) and the episode loop that keeps the sampled tokens exact (:mod:`.episodes`)."""
