"""The shared cache: FakeTensorMode dispatch-cache entries and op cost rows in Arrow.

schema.py   Arrow schemas (versioned by torch version + schema version in the metadata)
codec.py    FakeTensorMode.cache entries <-> Arrow rows, verified round trip, validation
costs.py    cost rows: (op key, hardware) -> FLOPs, bytes, the kernel model's time, measured time
store.py    Arrow IPC files under the cache dir: atomic, concurrent-safe, checksummed, bounded
service.py  CacheService: the Ray actor that shares the store with the workers of a run
warm.py     worker side: warm FakeTensorMode's cache, collect a rank's new entries
session.py  coordinator side: start the service, merge, write back, plan.json `cache`
commands.py `simdist cache info | clear | path`

Importing this package imports nothing; schema/store/service/commands need only pyarrow.
"""
