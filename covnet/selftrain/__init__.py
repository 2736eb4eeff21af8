"""Iterative student–teacher self-training on the unlabelled pool (``covnet_selftrain``).

``settings``: the recipe and the student's training settings (the flags); ``teacher``: who labels round 1 and
which expert cases are trained on or held out; ``candidates``: a round's predictions of the pool and their
scores; ``labels``: pseudo-label policies and scores (pure functions); ``selection``: which cases a round trains
on, stored like expert cases; ``rounds``: the loop (``SelfTrainingRun``); ``run``: starting, resuming and
sharding it; ``report``: ``summary.json``, ``progress.png`` and the validation table.
"""
