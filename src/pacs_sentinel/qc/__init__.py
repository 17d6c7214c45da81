"""The error detector: judges whether an AI output can be trusted."""
