"""The ``sam-optax`` program: the paper's experiments, small on a laptop, full size on accelerators.

Modules, top down: ``cli`` (the command line), ``compare`` (grids of runs and
the paper-style report), ``train`` (one run: ``train_and_evaluate``),
``configs`` (defaults and the paper's recipes), ``models`` (Flax Linen
networks), ``input_pipeline`` (datasets and label noise), ``augment``
(on-device augmentation).
"""
