"""Analysis: stored instances in, a study answer out; no queue, no database, no network.

Owns the science: HU and windows (``imaging``), which series and slices are read and the
run of the model over them (``analyze``), model bundles and their runtimes (``bundle``,
``model_info``, ``keras_model``, ``runtimes``), the study answer from slice probabilities
(``result``) and classifying files given by hand (``classify``). Imports neither celery,
flask, pynetdicom nor SQLAlchemy (import-linter).
"""
