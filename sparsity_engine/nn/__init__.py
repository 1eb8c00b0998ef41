"""Neural-network modules built on the ops: CSRLinear, BitmapLinear and in-place model conversion."""
from .bitmap_linear import BitmapLinear
from .convert import sparsify_linears_
from .csr_linear import CSRLinear

__all__ = ["BitmapLinear", "CSRLinear", "sparsify_linears_"]
