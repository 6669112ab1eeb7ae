"""Black-box prompt tuning (Fed-BBPT): the job, its tasks and models, and the scoring
endpoint the frozen model's owner serves."""
