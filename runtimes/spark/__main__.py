"""``python -m runtimes.spark``: serve Spark ML pipelines over OIP v2 gRPC."""

from runtimes.sdk.app import main
from runtimes.spark.model import load

if __name__ == "__main__":
    main("spark", load)
