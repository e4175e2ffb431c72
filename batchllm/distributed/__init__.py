"""Scale-out on Ray: engine actors fed whole prefix groups (DESIGN 6, docs/ray.md).

cluster.py joins or starts the cluster and sizes the actors; worker.py is the
engine actor; pool.py leases actors to shards and replaces dead ones;
dispatch.py runs one attempt at one shard and records it. The Prefect flow
(flows/enrich.py) runs one task per shard, retries failed shards, stages each
finished shard at once and alone writes to the warehouse. Ray is imported only
when a job's ``executor.kind`` is ``ray``.
"""
