"""DICOM networking on pynetdicom and dicomweb-client.

Owns the node's AEs and TLS (``network``), the storage SCP (``acceptor``: who may
associate and for how long; ``scp``: contexts and the durable C-STORE; ``spool``: datasets
to disk as they arrive), pulling studies (``pull``: C-FIND + C-GET/C-MOVE; ``dicomweb``:
QIDO/WADO). Workers and the web UI never import the SCP modules (import-linter).
"""
