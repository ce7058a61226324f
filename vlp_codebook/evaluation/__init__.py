"""Metrics registered in vlp_codebook.registry.METRICS."""
from vlp_codebook.evaluation.itm_rerank import itm_rerank
from vlp_codebook.evaluation.retrieval import RetrievalMetric, format_retrieval_table, retrieval_recalls

__all__ = ['itm_rerank', 'RetrievalMetric', 'format_retrieval_table', 'retrieval_recalls']
