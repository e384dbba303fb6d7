"""The chaos soak (`make soak`): every service run as real processes behind
small proxies, driven by the real npm clients and a real Synapse, under a
seeded schedule of faults and hostile traffic, with the invariants of
docs/operations.md ("What survives what") checked at the end."""
