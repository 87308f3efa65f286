"""Captured attention, aggregated online (see :mod:`daami2i.storage.store`)."""

from .store import CrossAttentionStore, Generation, SelfAttentionStore

__all__ = ["CrossAttentionStore", "Generation", "SelfAttentionStore"]
