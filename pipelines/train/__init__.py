"""Training: ``python -m pipelines.train`` (``__main__``: the command line); ``job`` drives a Ray Train run tracked
and registered in MLflow; ``worker`` is what each Ray Train worker runs (the training loop, validation, checkpoints).
"""
