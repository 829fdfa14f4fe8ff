"""One shard end to end (run.py); the ledger that decides each document's fate is pipeline/ledger.py."""
