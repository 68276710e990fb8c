"""The base layer: what every other layer may use and that uses nothing of diskrsync.

Errors with their exit codes, the worker pool, size units, the progress sink and the shape of
the Merkle tree (shared by the image index and the sync protocol). See docs/architecture.md.
"""
