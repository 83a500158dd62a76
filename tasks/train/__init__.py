"""Training: the one loop (loop.py) and what it runs on.

    config.py     FitConfig: a fit's frozen configuration, built by orchestrator/configs.py
    sources.py    where a worker's rows come from (the soft-target store, Ray's object store, a source)
    stream.py     a share too large to hold, read block by block
    step.py       one optimizer step, one epoch of steps
    sessions.py   where the loop runs (Ray Train, a warm process) and how it reports
    loop.py       train_loop: setup, resume, per epoch train + validate + decide + checkpoint
    result.py     FitResult
    ray_train.py  fit: a Ray Train run of the loop
    warm.py       fit_here: the loop in a warm process
"""
