"""Iterative student–teacher self-training on the unlabelled pool (``covnet_selftrain``).

``teacher``: which trained fold(s) start it and how a model's validation is scored; ``pseudo_labels``: the
teacher's predictions of the pool, their confidence, and the pseudo-labelled cases (stored like expert cases);
``rounds``: the loop (pseudo-label, fine-tune a student with the trainer, measure it on held-out expert cases);
``report``: ``summary.json``, ``progress.png`` and the validation table.
"""
