"""Inference over (whole-slide) images: ``python -m pipelines.infer`` (``__main__``: the command line).

``job`` drives a job (set-up, segment, report); ``cohort`` says which slides; ``slide`` is one slide's progress
(open it, plan its output, finish it); ``output`` is one output's whole life on storage (layout, lock, new /
resume / skip, create, objects table, lineage, finalize); ``spec`` is what a worker needs (picklable);
``stream`` feeds the chunks of every slide to Dask as one bounded stream and runs each slide's passes;
``tasks`` are what workers run; ``batch`` is a cohort's summary and MLflow run; ``cluster`` is where the tasks
run (local or remote Dask, TLS).
"""
