"""What the synthetic task suite shares (docs/tasks.md): the recipe checks every suite task applies
(`spec.py`, torch-free), a fixed training set with a test set disjoint from it and the batches drawn from
them (`data.py`), and the `Task` base class that scores accuracy over the scored positions (`task.py`).

Each task of the suite is its own package beside this one (`recall`, `fuzzy_recall`, `noisy_recall`,
`selective_copy`, `compression`, `memorization`), holding its generator, its `Task` and its spec.
"""
