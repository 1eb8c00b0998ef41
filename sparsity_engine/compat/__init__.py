"""Drop-in replacements for what other tools import: ``compat.mergekit`` mirrors mergekit.sparsify / get_mask."""
