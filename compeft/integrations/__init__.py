"""Thin adapters between compressed experts and other libraries (PEFT, Transformers)."""
