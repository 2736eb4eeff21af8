"""Converters from public datasets and plain CT folders into covnet's raw format."""
