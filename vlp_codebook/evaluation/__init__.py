"""Metrics registered in vlp_codebook.registry.METRICS."""
from vlp_codebook.evaluation.retrieval import RetrievalMetric, format_retrieval_table, retrieval_recalls

__all__ = ['RetrievalMetric', 'format_retrieval_table', 'retrieval_recalls']
