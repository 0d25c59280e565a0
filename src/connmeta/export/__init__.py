"""Exporters: what the sidecar knows, in the formats pipelines read.

They sit at the edge, read the store, the watch hub and the counters the
sidecar keeps (``connmeta.stats``), and never stand in a write path.
"""
