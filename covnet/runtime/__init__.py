"""Runtime plumbing every stage shares: verified atomic writes, locks, worker pools, logging, the one error
type and sharding work across processes or machines."""
