"""Auditing what a run did: privacy spent (from the sites' ledgers) and privacy leaked
(measured against canaries)."""
