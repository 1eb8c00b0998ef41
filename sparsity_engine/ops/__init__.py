"""Op families: one sub-package each (validate + dispatch in __init__, one module per backend)."""
