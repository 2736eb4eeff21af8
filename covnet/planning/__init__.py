"""Planning: fingerprint the labelled data and choose spacing, patch, batch size and topology."""
