"""The mesh on one machine: ``meshlet up`` / ``run`` / ``status`` / ``down``.

``state`` is the state directory (where things run, pid files, logs),
``procs`` starts and stops detached processes by pid file, ``plane`` is the
control-plane mount the mesh adds (SVIDs from the mesh CA over SDS, the sync
status endpoint), ``client`` talks to the control plane, ``workload`` is the
supervisor that runs one application beside its sidecar, and ``lifecycle``
puts them together.
"""
