"""The peer tracker: a swarm index (``index``), manifest storage (``manifests``)
and the serve loop (``server``); ``peer tracker`` (``cli``) runs one."""
