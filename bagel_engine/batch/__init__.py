"""Batch jobs: one task over every row of a CSV, JSONL or Parquet input, resumable and data parallel.

    from bagel_engine.batch import BatchJob, run_batch
    summary = run_batch(BatchJob(input="edits.csv", task="edit", output_dir="out", model="/models/BAGEL-7B-MoT"))

The command line is ``bagel batch`` (:mod:`bagel_engine.cli.batch_cmd`). Every model call goes
through the public API (``bagel_engine.load`` and the pipeline's task methods).
"""

from bagel_engine.batch.runner import BatchJob, Summary, exit_code, run_batch

__all__ = ["BatchJob", "Summary", "run_batch", "exit_code"]
