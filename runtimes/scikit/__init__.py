"""The scikit-learn runtime kind: serves joblib-saved estimators (``python -m runtimes.scikit``)."""
