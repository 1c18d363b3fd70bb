"""specdraft: retrieval-based drafting for speculative decoding."""

from retriever import __version__

__all__ = ["__version__"]
