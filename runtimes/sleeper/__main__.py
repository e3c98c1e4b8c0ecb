"""``python -m runtimes.sleeper``: serve ``sleeper`` models over OIP v2 gRPC (tests, benchmarks)."""

from runtimes.sdk.app import main
from runtimes.sleeper.model import load

if __name__ == "__main__":
    main("sleeper", load)
