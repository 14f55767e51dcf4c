"""The ``sam-optax`` program: the paper's experiments, small on a laptop, full size on accelerators.

Modules, top down: ``cli`` (the command line, generated from ``configs.Config``),
``compare`` (grids of runs and the paper-style report), ``analyze`` (the
sharpness of a finished run), ``train`` (one run: ``train_and_evaluate``),
``trainer`` (what a step is made of), ``rundir`` (the run's files and
checkpoints), ``configs`` (the settings, the methods, the paper's recipes),
``models`` (Flax Linen networks), ``input_pipeline`` (datasets and label
noise), ``augment`` (on-device augmentation).
"""
