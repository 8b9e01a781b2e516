"""Storage: what outlives a process.

Device fingerprints (``device``), the SQLite cache of winners and trial history (``store``), portable
read-only bundles (``bundles``), shape recording for offline tuning (``record``) and the fleet's shared
result tables (``fleet``). Storage knows the kernel families (to validate what it reads) but nothing of
tuning or the runtime.
"""
