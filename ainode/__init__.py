"""The composition root: the ``ainode`` command line, the only place that wires the node,
the web UI and training together (``ainode serve`` runs the SCP, the sweeper, the web UI
and a worker; other commands build what they need and no more)."""
