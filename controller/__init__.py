"""Controller tier, one subpackage per stage of the data path.

``pipeline`` (stream -> batch -> worker pool -> commit -> publish, verdicts, undo, compaction), ``rollout`` (router,
canary-first rolling rollout, zero-downtime restarts), ``api`` (the HTTP doors), ``security`` (who may use them) and
``cli`` (the ``editq`` command line and ``make demo``). Imports point down: cli -> api -> pipeline -> rollout.
"""
