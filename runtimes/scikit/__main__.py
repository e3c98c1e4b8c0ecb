"""``python -m runtimes.scikit``: serve scikit-learn models over OIP v2 gRPC."""

from runtimes.sdk.app import main
from runtimes.scikit.model import load

if __name__ == "__main__":
    main("scikit", load)
