"""The MLflow side: the store, tracking runs, versions and aliases, model cards, fetching adapters, integrity, promotion, export."""
