"""Neural-network modules built on the ops: CSRLinear and in-place model conversion."""
from .csr_linear import CSRLinear, sparsify_linears_

__all__ = ["CSRLinear", "sparsify_linears_"]
