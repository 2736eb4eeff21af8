"""Scoring segmentations: Dice and normalized surface Dice (``metrics``), and a folder of predictions against
its references into ``summary.json`` (``folders``)."""
