"""Data: LLaVA JSON records, chat templates, tokenizers, and the synthetic visual-QA world."""
