"""Attachments of the specdraft retriever to other serving stacks (HF transformers, vLLM)."""
