"""Records: the database and what is kept in it.

Owns the schema (``db``, Alembic through ``schema``), the study lifecycle (``lifecycle``:
the one place ``Study.status`` moves), labels and keywords (``labels``), accounts
(``users``), the model registry (``registry``) and de-identified exports (``export``).
"""
