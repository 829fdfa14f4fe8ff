"""A shard's bookkeeping: the ledger that decides each document's fate (see ledger.py)."""
