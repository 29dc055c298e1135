"""Retrieval (MARK's RAG target): an embedder, a dense / BM25 / hybrid index, data readers and metrics; the
shipped Python-docs index that an agent's search tool reads."""

from palaestra.retrieval.data import Document, Query, RetrievalDataError, faq_retrieval_set, read_documents, read_queries
from palaestra.retrieval.docs_index import docs_documents, search_docs, shipped_docs_index
from palaestra.retrieval.metrics import KS, ranked, retrieval_metrics

__all__ = [
    "KS",
    "Document",
    "Query",
    "RetrievalDataError",
    "docs_documents",
    "faq_retrieval_set",
    "ranked",
    "read_documents",
    "read_queries",
    "retrieval_metrics",
    "search_docs",
    "shipped_docs_index",
]
