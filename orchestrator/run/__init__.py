"""A whole run, phase by phase: ``job.py`` is the job, ``state.py`` the run directory and
the types every phase shares, ``warmup.py`` and ``zo.py`` the phases."""
