"""State: what the coordinator knows of etcd and how it changes it.

Keys, records and changes as data, the synchronous view state and batch decisions (pure),
and the three modules that do I/O: the store (the only etcd client), the view (a watch
over the store) and registration (node records).
"""
