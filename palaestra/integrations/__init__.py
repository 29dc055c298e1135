"""Integrations with other frameworks: LangChain (:mod:`palaestra.integrations.langchain`)."""
