"""``python -m sparsity_engine`` runs the ``sparsity-engine`` command (and ``torchrun -m sparsity_engine``)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
