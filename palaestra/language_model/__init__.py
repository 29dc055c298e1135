"""Language modelling from scratch (MARK's mamba target): corpora, a BPE tokenizer, transformers' Mamba, perplexity."""

from palaestra.language_model.corpus import Corpus, CorpusError, Document, read_corpus, split_documents, write_corpus
from palaestra.language_model.model import build_model, collate, generate_samples, held_out_figures, perplexity
from palaestra.language_model.tokenizer import chunk, load_tokenizer, save_tokenizer, token_stream, train_tokenizer

__all__ = [
    "Corpus",
    "CorpusError",
    "Document",
    "build_model",
    "chunk",
    "collate",
    "generate_samples",
    "held_out_figures",
    "load_tokenizer",
    "perplexity",
    "read_corpus",
    "save_tokenizer",
    "split_documents",
    "token_stream",
    "train_tokenizer",
    "write_corpus",
]
