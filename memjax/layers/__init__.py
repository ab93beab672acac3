"""Flax NNX building blocks of the language model."""
