"""Synthetic chest CTs with known truth: the anatomy (``anatomy``) and whole datasets in the raw format
(``generate``)."""
