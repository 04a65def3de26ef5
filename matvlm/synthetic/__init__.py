"""The embedded default: a procedurally generated visual-QA world, the recipe that trains its small teacher,
the shipped models and the demo."""
