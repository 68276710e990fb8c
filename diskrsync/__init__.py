"""diskrsync: block-level disk backups over SSH into crash-safe, mountable compressed images."""

__version__ = "0.1.0"
