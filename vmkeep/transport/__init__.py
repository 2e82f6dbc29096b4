"""Moving disk data over NBD: exports, connections, extent maps."""
