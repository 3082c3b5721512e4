"""The MLflow side: tracking runs, the pyfunc model, versions and aliases, model cards, integrity, promotion, export."""
