"""unified_train."""
