"""The application layer: each stage of the pipeline done once, as a plain function over typed records.

    ingest ─▶ encode ─▶ preflight ─▶ train a run folder ─▶ score ─▶ compare and decide ─▶ publish the files

`records` holds what passes between stages (paths, hashes and small models, never big arrays); `data`
reads and encodes a corpus; `training` trains a run folder (its lock, resume and overwrite rules) and a
sweep's trial; `scoring` measures models on the validation text; `promotion` finds the current model and
decides; `publishing` writes metrics.json, loss.png and report.md (`report` renders them); `sweeping` holds
a sweep's rules (search space, rungs, halving, fates); `bento` builds a Bento of a promoted model.

No Prefect here: the flows (`flows/`) wrap these in tasks, the CLI (`cli.py`) calls them directly, and tests
call them as they are. Stages log to the `char_rnn` logger; the callers decide what to show.
"""
