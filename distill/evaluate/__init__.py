"""Retrieval evaluation (``ddx evaluate``): eval sets and vectors, search per mode, metrics, TREC run files.

Entry point: :func:`distill.evaluate.evaluate.evaluate_retrieval`.
"""
