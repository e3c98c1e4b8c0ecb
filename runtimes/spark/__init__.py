"""The Spark ML runtime kind: serves saved Spark ML PipelineModels.

``model.load(artifact)`` picks, per model, the native NumPy evaluator (``native/``) when
every stage is covered, else real pyspark on one shared local SparkSession with
micro-batched requests.
"""
