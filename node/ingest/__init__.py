"""Ingest: a received instance becomes a durable file plus its committed rows.

Owns the instance store (``store``: atomic writes, fsync, the spool folder), reading and
checking a received file's header (``part10``) and the ingestor every receiving path
shares (``ingestor``: SCP, C-GET, C-MOVE and DICOMweb pulls).
"""
